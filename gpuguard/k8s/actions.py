"""What gpuguard asks of Kubernetes when a job leaves a bad GPU, in order, within one deadline:

1. a pod condition (``gpuguard.io/GPUHealthy`` = False) through the pods/status subresource;
2. an events.k8s.io/v1 Event on the pod, with the GPU's UUID and the evidence;
3. the hardware marked: a node taint or label, and for DRA-allocated GPUs a DeviceTaintRule;
4. leaving: the exit code (default), the Eviction API, or deleting the pod.

Each action is switchable and bounded. A failure is reported and the next action still runs: a 403
names the RBAC rule to add, a 404 (pod gone) is skipped, a 409 is re-read and retried, 429/5xx back
off; an unreachable API server skips everything left. The job leaves with its exit code regardless.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpuguard.errors import KubernetesError, KubernetesUnreachableError
from gpuguard.k8s.cluster import Cluster

log = logging.getLogger("gpuguard.k8s")

DRA_VERSIONS = ("v1", "v1beta2", "v1beta1", "v1alpha3")  # newest first


@dataclass(frozen=True)
class ActionOutcome:
    """One action's result: ``done``, ``skipped`` or ``failed``, and why."""

    action: str
    outcome: str
    detail: str = ""


def _now(micro: bool = False) -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if micro else now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _camel(text: str) -> str:
    return "".join(part[:1].upper() + part[1:].lower() for part in text.replace("-", "_").split("_") if part)


class KubernetesActions:
    """Runs the evacuation actions for one pod."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.config = cluster.config

    def evacuate(
        self,
        *,
        device: str | None,
        state: str,
        message: str,
        evidence: dict[str, Any],
        action: str,
        exit_code: int,
        report: bool = True,
        mark: bool = True,
        leave: bool = True,
    ) -> list[ActionOutcome]:
        """Run every enabled action within ``deadline_s``; never raises.

        Args:
            device: the GPU's UUID, when this rank's GPU is the cause.
            state: the GPU's state (``FAILING``, ...), for the condition's reason.
            message: one sentence for the condition and the Event.
            evidence: reasons and thresholds, summarised into the Event's note.
            action: ``reschedule`` or ``restart``.
            report: set the condition and create the Event (the rank that decided does).
            mark: mark the node or device (only the rank whose GPU is bad should).
            leave: run the leave action (once per pod).
        """
        c = self.config
        deadline = time.monotonic() + c.deadline_s
        steps: list[tuple[str, bool, Callable[[float], str]]] = [
            ("condition", report and c.condition, lambda d: self.set_condition(state, message, device, d)),
            ("event", report and c.event, lambda d: self.create_event(message, device, evidence, action, d)),
            (
                "node-" + c.mark,
                mark and c.mark != "none" and device is not None and action == "reschedule",
                lambda d: self.mark_node(device or "", d),
            ),
            (
                "device-taint-rule",
                mark and c.dra and device is not None and action == "reschedule",
                lambda d: self.taint_dra_device(device or "", d),
            ),
            ("leave-" + c.leave, leave and c.leave != "exit", self.leave),
        ]
        outcomes: list[ActionOutcome] = []
        unreachable = False
        for name, enabled, run in steps:
            if not enabled:
                continue
            if unreachable or time.monotonic() >= deadline:
                outcomes.append(ActionOutcome(name, "skipped", "API server unreachable" if unreachable else "deadline"))
                continue
            try:
                outcomes.append(ActionOutcome(name, "done", run(deadline)))
            except KubernetesUnreachableError as exc:
                unreachable = True
                outcomes.append(ActionOutcome(name, "failed", str(exc)))
            except KubernetesError as exc:
                outcomes.append(ActionOutcome(name, "skipped" if exc.status == 404 else "failed", str(exc)))
        for done in outcomes:
            level = logging.INFO if done.outcome == "done" else logging.WARNING
            log.log(level, "kubernetes %s: %s %s", done.action, done.outcome, done.detail)
        return outcomes

    # -- the actions ----------------------------------------------------------------------------

    def set_condition(self, state: str, message: str, device: str | None, deadline: float) -> str:
        from kubernetes import client

        cl = self.cluster
        condition = {
            "type": self.config.condition_type,
            "status": "False",
            "reason": f"GPU{_camel(state)}",
            "message": (f"GPU {device}: " if device else "") + message,
            "lastTransitionTime": _now(),
            "lastProbeTime": _now(),
        }
        # A strategic merge patch: conditions merge by type, so the kubelet's own are untouched.
        cl.call(
            "patch",
            "pods/status",
            client.CoreV1Api(cl.api).patch_namespaced_pod_status,
            cl.pod,
            cl.namespace,
            {"status": {"conditions": [condition]}},
            deadline=deadline,
            _content_type="application/strategic-merge-patch+json",
        )
        return f"{condition['type']}=False ({condition['reason']})"

    def create_event(
        self, message: str, device: str | None, evidence: dict[str, Any], action: str, deadline: float
    ) -> str:
        from kubernetes import client

        cl = self.cluster
        if not cl.pod_uid:
            cl.pod_uid = str(cl.get_pod_json(deadline).get("metadata", {}).get("uid", ""))
        summary = json.dumps(evidence, separators=(",", ":"), default=str)
        note = f"{message}. GPU {device or '-'} on node {cl.node or '-'}. Evidence: {summary}"
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": f"{cl.pod}.gpuguard-", "namespace": cl.namespace},
            "eventTime": _now(micro=True),
            "type": "Warning",
            "reason": "GPUUnhealthy",
            "action": "RestartInPlace" if action == "restart" else "Reschedule",
            "note": note[:1021] + "..." if len(note) > 1024 else note,
            "regarding": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": cl.pod,
                "namespace": cl.namespace,
                "uid": cl.pod_uid,
            },
            "reportingController": "gpuguard.io/guard",
            "reportingInstance": cl.pod[:128],
        }
        cl.call(
            "create",
            "events",
            client.EventsV1Api(cl.api).create_namespaced_event,
            cl.namespace,
            body,
            group="events.k8s.io",
            deadline=deadline,
        )
        return "Warning GPUUnhealthy"

    def mark_node(self, device: str, deadline: float) -> str:
        from kubernetes import client

        cl, c = self.cluster, self.config
        if not cl.node:
            raise KubernetesError(
                "NODE_NAME is not set: add it from the Downward API (fieldRef spec.nodeName)",
                status=404,
                verb="patch",
                resource="nodes",
            )
        core = client.CoreV1Api(cl.api)
        if c.mark == "label":
            cl.call(
                "patch",
                "nodes",
                core.patch_node,
                cl.node,
                {"metadata": {"labels": {c.taint_key: device}}},
                deadline=deadline,
                _content_type="application/strategic-merge-patch+json",
            )
            return f"label {c.taint_key}={device}"
        for _ in range(5):
            node = cl.call_json("get", "nodes", core.read_node, cl.node, deadline=deadline)
            taints = list(node.get("spec", {}).get("taints") or [])
            if any(t.get("key") == c.taint_key and t.get("value") == device for t in taints):
                return f"taint {c.taint_key}={device}:{c.taint_effect} already there"
            taints.append({"key": c.taint_key, "value": device, "effect": c.taint_effect, "timeAdded": _now()})
            patch = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}, "spec": {"taints": taints}}
            try:
                cl.call(
                    "patch",
                    "nodes",
                    core.patch_node,
                    cl.node,
                    patch,
                    deadline=deadline,
                    _content_type="application/strategic-merge-patch+json",
                )
                return f"taint {c.taint_key}={device}:{c.taint_effect}"
            except KubernetesError as exc:
                if exc.status != 409:  # someone else changed the node: re-read and try again
                    raise
        raise KubernetesError(
            "patch nodes: still conflicting after 5 tries", status=409, verb="patch", resource="nodes"
        )

    def taint_dra_device(self, device: str, deadline: float) -> str:
        """A DeviceTaintRule for the DRA device behind ``device``; skipped when GPUs are not DRA-allocated."""
        from kubernetes import client

        cl, c = self.cluster, self.config
        version = self._dra_version(deadline)
        if version is None:
            raise KubernetesError(
                "resource.k8s.io DeviceTaintRules are not served here",
                status=404,
                verb="create",
                resource="devicetaintrules",
            )
        target = self._dra_device(version, device, deadline)
        if target is None:
            raise KubernetesError(
                f"no DRA device of driver {c.dra_driver} allocated to this pod",
                status=404,
                verb="get",
                resource="resourceclaims",
            )
        name = f"gpuguard-{(cl.node or 'node')[:40]}-{device.removeprefix('GPU-')[:8]}".lower()
        body = {
            "apiVersion": f"resource.k8s.io/{version}",
            "kind": "DeviceTaintRule",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "gpuguard"}},
            "spec": {
                "deviceSelector": target,
                "taint": {"key": c.taint_key, "value": device, "effect": c.taint_effect},
            },
        }
        custom = client.CustomObjectsApi(cl.api)
        try:
            cl.call(
                "create",
                "devicetaintrules",
                custom.create_cluster_custom_object,
                "resource.k8s.io",
                version,
                "devicetaintrules",
                body,
                group="resource.k8s.io",
                deadline=deadline,
            )
        except KubernetesError as exc:
            if exc.status != 409:
                raise
            return f"DeviceTaintRule {name} already there"
        return f"DeviceTaintRule {name} for {target['driver']}/{target['pool']}/{target['device']}"

    def _dra_version(self, deadline: float) -> str | None:
        from kubernetes import client

        cl = self.cluster
        groups = cl.call_json("get", "apis", client.ApisApi(cl.api).get_api_versions, deadline=deadline)
        offered = set()
        for group in groups.get("groups", []):
            if group.get("name") == "resource.k8s.io":
                offered = {v["version"] for v in group.get("versions", [])}
        custom = client.CustomObjectsApi(cl.api)
        for version in DRA_VERSIONS:
            if version not in offered:
                continue
            resources = cl.call_json(
                "get", "resource.k8s.io", custom.get_api_resources, "resource.k8s.io", version, deadline=deadline
            )
            if any(r.get("name") == "devicetaintrules" for r in resources.get("resources", [])):
                return version
        return None

    def _dra_device(self, version: str, uuid: str, deadline: float) -> dict[str, str] | None:
        from kubernetes import client

        cl, c = self.cluster, self.config
        custom = client.CustomObjectsApi(cl.api)
        pod = cl.get_pod_json(deadline)
        allocated: list[dict[str, str]] = []
        for status in pod.get("status", {}).get("resourceClaimStatuses", []) or []:
            claim_name = status.get("resourceClaimName")
            if not claim_name:
                continue
            claim = cl.call_json(
                "get",
                "resourceclaims",
                custom.get_namespaced_custom_object,
                "resource.k8s.io",
                version,
                cl.namespace,
                "resourceclaims",
                claim_name,
                group="resource.k8s.io",
                deadline=deadline,
            )
            for result in claim.get("status", {}).get("allocation", {}).get("devices", {}).get("results", []):
                if result.get("driver") == c.dra_driver:
                    allocated.append({"driver": result["driver"], "pool": result["pool"], "device": result["device"]})
        if len(allocated) <= 1:
            return allocated[0] if allocated else None
        # Several GPUs: the ResourceSlices say which device has this UUID.
        slices = cl.call_json(
            "list",
            "resourceslices",
            custom.list_cluster_custom_object,
            "resource.k8s.io",
            version,
            "resourceslices",
            group="resource.k8s.io",
            field_selector=f"spec.nodeName={cl.node}",
            deadline=deadline,
        )
        for item in slices.get("items", []):
            pool = item.get("spec", {}).get("pool", {}).get("name")
            for dev in item.get("spec", {}).get("devices", []):
                attributes = dev.get("attributes") or dev.get("basic", {}).get("attributes", {})
                if attributes.get("uuid", {}).get("string") == uuid:
                    match = {"driver": c.dra_driver, "pool": pool, "device": dev["name"]}
                    if match in allocated:
                        return match
        return None

    def leave(self, deadline: float) -> str:
        from kubernetes import client

        cl = self.cluster
        core = client.CoreV1Api(cl.api)
        if self.config.leave == "evict":
            body = {
                "apiVersion": "policy/v1",
                "kind": "Eviction",
                "metadata": {"name": cl.pod, "namespace": cl.namespace},
            }
            cl.call(
                "create",
                "pods/eviction",
                core.create_namespaced_pod_eviction,
                cl.pod,
                cl.namespace,
                body,
                deadline=deadline,
            )
            return "evicted (DisruptionTarget)"
        cl.call("delete", "pods", core.delete_namespaced_pod, cl.pod, cl.namespace, deadline=deadline)
        return "deleted"
