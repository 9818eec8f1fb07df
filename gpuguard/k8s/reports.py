"""Least privilege: a training pod reports a bad GPU on its own pod; the node agent marks the node.

The training pod runs user code, so it holds no node rights. It writes what it found into its own
pod's annotation ``gpuguard.io/unhealthy-gpus`` (JSON: UUID -> verdict, reasons, the DRA device), through
the pods/status subresource that it already patches for its condition (pkg/registry/core/pod/strategy.go:
the status strategy resets only spec, deletionTimestamp and ownerReferences, so metadata annotations go
through). The node agent — the node-check DaemonSet, under its own service account — lists the pods on
its node, marks the node (taint or label, and the DeviceTaintRule), and answers each report with a
``GPUNodeMarked`` Event regarding the pod. The pod waits for that Event within its deadline: a node is
marked before anything leaves it with exit 75.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

from gpuguard.errors import KubernetesError
from gpuguard.k8s.cluster import Cluster
from gpuguard.k8s.dra import DeviceRef
from gpuguard.k8s.node_marks import RECORD_ANNOTATION, now_rfc3339

log = logging.getLogger("gpuguard.k8s")

REPORT_ANNOTATION: Final = RECORD_ANNOTATION
MARKED_REASON: Final = "GPUNodeMarked"
ACK_POLL_S: Final = 0.5


def read_report(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report on ``pod``; an unreadable one is treated as none."""
    raw = (pod.get("metadata", {}).get("annotations") or {}).get(REPORT_ANNOTATION)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def report(
    cluster: Cluster,
    device: str,
    *,
    state: str,
    reasons: list[str],
    dra: DeviceRef | None,
    deadline: float | None,
) -> str:
    """Add ``device`` to the pod's report (read-modify-write on the pod, 409 re-read)."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api)
    for _ in range(5):
        pod = cluster.get_pod_json(deadline)
        entries = read_report(pod)
        entries[device] = {
            "state": state.upper(),
            "reasons": reasons[:20],
            "at": now_rfc3339(),
            "node": cluster.node,
            **({"dra": {"driver": dra.driver, "pool": dra.pool, "device": dra.device}} if dra else {}),
        }
        patch = {
            "metadata": {
                "resourceVersion": pod["metadata"]["resourceVersion"],
                "annotations": {REPORT_ANNOTATION: json.dumps(entries, separators=(",", ":"), sort_keys=True)},
            }
        }
        try:
            cluster.call(
                "patch",
                "pods/status",
                core.patch_namespaced_pod_status,
                cluster.pod,
                cluster.namespace,
                patch,
                deadline=deadline,
                _content_type="application/strategic-merge-patch+json",
            )
            return f"reported {device} on pod {cluster.pod}"
        except KubernetesError as exc:
            if exc.status != 409:
                raise
    raise KubernetesError(
        "patch pods/status: still conflicting after 5 tries", status=409, verb="patch", resource="pods/status"
    )


def wait_marked(cluster: Cluster, device: str, deadline: float) -> str:
    """Wait until the node agent's ``GPUNodeMarked`` Event for ``device`` regards this pod.

    Raises:
        KubernetesError: no such Event before ``deadline`` (status 504): the node is not known to be marked.
    """
    from kubernetes import client

    events = client.EventsV1Api(cluster.api)
    selector = f"regarding.name={cluster.pod},reason={MARKED_REASON}"
    while True:
        found = cluster.call_json(
            "list",
            "events",
            events.list_namespaced_event,
            cluster.namespace,
            group="events.k8s.io",
            field_selector=selector,
            deadline=deadline,
        )
        for event in found.get("items", []):
            if device in str(event.get("note", "")):
                return f"marked by the node agent ({event.get('reportingInstance', '?')}): {event.get('note', '')}"[
                    :300
                ]
        if time.monotonic() + ACK_POLL_S >= deadline:
            raise KubernetesError(
                f"the node agent did not mark node {cluster.node or '?'} for {device} in time: is the node-check "
                "DaemonSet running on that node?",
                status=504,
                verb="list",
                resource="events",
            )
        time.sleep(ACK_POLL_S)
