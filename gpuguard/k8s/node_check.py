"""The node agent: marks its own node on the pods' reports, and gives it back once its GPUs healed.

It runs on the node (the node-check DaemonSet of the generated manifests, under its own service
account, with a minimal entry point: ``python -m gpuguard.k8s.node_agent``, no torch), so the training
pods — which run user code — need no node rights at all:

- the way in: a training pod that leaves a bad GPU writes a report on its own pod
  (`gpuguard.k8s.reports`); the agent lists the pods on its node, marks the node (taint with the value
  ``gpuguard``, or label, and the DRA DeviceTaintRule), and answers with a ``GPUNodeMarked`` Event
  regarding the pod, which the pod waits for before it exits 75;
- the way back: a taint that nobody removes keeps a node out of service for good, even after a GPU
  reset or a reboot healed it. The agent reads the node's GPUs through NVML and removes gpuguard's own
  marks (never a taint it did not place) after every recorded GPU, and every other GPU it can see, has
  read HEALTHY for a quiet period without a break. A GPU it cannot see, UNKNOWN or worse restarts it.

A node check that sees no GPU at all is not ready (``ready`` False): on a GPU node that means NVML or
the device mounts are broken, and the agent could neither see a fault nor clear a mark.

Example:
    check = NodeCheck(cluster, read_health=lambda: monitor.poll().states())
    while True:
        print(check.once())
        time.sleep(30)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuguard.errors import KubernetesError
from gpuguard.k8s import node_marks, reports
from gpuguard.k8s.actions import NOTE_LIMIT_BYTES, micro_time, truncate_bytes
from gpuguard.k8s.cluster import Cluster
from gpuguard.k8s.dra import DeviceRef, Dra

log = logging.getLogger("gpuguard.k8s")

TERMINATED = ("Succeeded", "Failed")


@dataclass
class NodeCheck:
    """One node's agent. ``read_health`` answers {UUID: state name} for the GPUs NVML sees now.

    Attributes:
        quiet_period_s: how long every GPU must read HEALTHY, unbroken, before the marks go.
        mark_reports: mark the node on its pods' reports (the agent's way in); False: only give it back.
        clock: seconds, monotonic (injectable so that tests need not wait).
        ready: whether the last look saw at least one GPU and reached the API server.
        reason: why it is not ready, for the readiness probe's answer.
    """

    cluster: Cluster
    read_health: Callable[[], Mapping[str, str]]
    quiet_period_s: float = 600.0
    mark_reports: bool = True
    clock: Callable[[], float] = time.monotonic
    healthy_since: float | None = field(default=None, init=False)
    ready: bool = field(default=False, init=False)
    reason: str = field(default="not looked yet", init=False)
    _answered: set[tuple[str, str]] = field(default_factory=set, init=False)

    def once(self) -> str:
        """Look once: mark on new reports, then maybe give the node back; returns one line.

        Raises:
            KubernetesError: an API call failed (and the check is not ready until one look succeeds).
        """
        states = dict(self.read_health())
        try:
            line = self._look(states)
        except KubernetesError as exc:
            self.ready, self.reason = False, str(exc)
            raise
        self.ready, self.reason = bool(states), "" if states else "no GPU visible: NVML or the device mounts"
        return line

    def _look(self, states: dict[str, str]) -> str:
        from kubernetes import client

        cl = self.cluster
        marked_now = self.mark_reported() if self.mark_reports else []
        node = cl.call_json("get", "nodes", client.CoreV1Api(cl.api).read_node, cl.node)
        if marked_now:
            self.healthy_since = None
            return f"node {cl.node}: marked for " + "; ".join(marked_now)
        record = node_marks.read_record(node)
        if not node_marks.marked(node, cl.config.taint_key):
            self.healthy_since = None
            return f"node {cl.node}: no gpuguard mark" + ("" if states else "; no GPU visible")
        unwell = {uuid: states.get(uuid, "MISSING") for uuid in record if states.get(uuid) != "HEALTHY"}
        unwell |= {uuid: state for uuid, state in states.items() if state != "HEALTHY"}
        now = self.clock()
        if unwell or not states:
            self.healthy_since = None
            said = ", ".join(f"{u} {s}" for u, s in sorted(unwell.items())) or "no GPU visible"
            return f"node {cl.node}: still marked; {said}"
        if self.healthy_since is None:
            self.healthy_since = now
        healthy_for = now - self.healthy_since
        if healthy_for < self.quiet_period_s:
            return f"node {cl.node}: GPUs healthy for {healthy_for:.0f}s of {self.quiet_period_s:.0f}s"
        removed = node_marks.unmark(cl, cl.node)
        if cl.config.dra:
            removed += Dra(cl).remove_rules(cl.node)
        self.healthy_since = None
        line = f"node {cl.node}: GPUs healthy for {healthy_for:.0f}s; removed " + ("; ".join(removed) or "nothing")
        log.warning("%s", line)
        return line

    # -- the way in -------------------------------------------------------------------------------

    def mark_reported(self, deadline: float | None = None) -> list[str]:
        """Mark the node for every new report of a pod running on it; answer each with an Event."""
        from kubernetes import client

        cl = self.cluster
        pods = cl.call_json(
            "list",
            "pods",
            client.CoreV1Api(cl.api).list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={cl.node}",
            deadline=deadline,
        )
        done: list[str] = []
        for pod in pods.get("items", []):
            meta = pod.get("metadata", {})
            # a report is answered while its pod waits for the answer; a finished pod's is history
            if pod.get("status", {}).get("phase") in TERMINATED or meta.get("deletionTimestamp"):
                continue
            for uuid, entry in sorted(reports.read_report(pod).items()):
                key = (str(meta.get("uid", "")), uuid)
                if key in self._answered or entry.get("node") not in (None, cl.node):
                    continue
                what = node_marks.mark(
                    cl,
                    cl.node,
                    device=uuid,
                    state=str(entry.get("state", "FAILING")),
                    reasons=[str(r) for r in entry.get("reasons", [])],
                    deadline=deadline,
                    reporter=f"{meta.get('namespace')}/{meta.get('name')}",
                )
                dra = entry.get("dra")
                if cl.config.dra and isinstance(dra, dict):
                    ref = DeviceRef(str(dra.get("driver")), str(dra.get("pool")), str(dra.get("device")))
                    effect = node_marks.effect_for(str(entry.get("state", "FAILING")), cl.config.taint_effect)
                    what += "; " + Dra(cl).taint(ref, uuid, deadline, effect=effect)
                self._answer(pod, uuid, what, deadline)
                self._answered.add(key)
                done.append(f"{uuid} ({meta.get('namespace')}/{meta.get('name')}): {what}")
        return done

    def _answer(self, pod: dict[str, Any], uuid: str, what: str, deadline: float | None) -> None:

        cl, meta = self.cluster, pod["metadata"]
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name'][:40]}.gpuguard-node-", "namespace": meta["namespace"]},
            "eventTime": micro_time(),
            "type": "Warning",
            "reason": reports.MARKED_REASON,
            "action": "MarkNode",
            "note": truncate_bytes(f"node {cl.node} marked for GPU {uuid}: {what}", NOTE_LIMIT_BYTES),
            "regarding": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
            },
            "reportingController": "gpuguard.io/node-agent",
            "reportingInstance": f"gpuguard-node-agent-{cl.node}"[:128],
        }
        cl.create_event(meta["namespace"], body, deadline)
