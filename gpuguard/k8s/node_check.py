"""The way back: a node that gpuguard marked is given back once its GPUs have stayed healthy.

A taint that nobody removes keeps a node out of service for good, even after a GPU reset or a
reboot has healed it (the most common complaint in the NVIDIA device plugin's issues is devices that
never come back from Unhealthy). The node check runs on the node (a DaemonSet in the generated
manifests), reads the node's GPUs through NVML, and removes gpuguard's taint, label and record after
every recorded GPU, and every other GPU it can see, has read HEALTHY for a quiet period without a
break. A GPU it cannot see (gone from the node), UNKNOWN or worse restarts the quiet period.

Example:
    check = NodeCheck(cluster, read_health=lambda: {d.uuid: d.state.value for d in monitor.poll().devices})
    while True:
        print(check.once())
        time.sleep(30)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gpuguard.k8s import node_marks
from gpuguard.k8s.cluster import Cluster
from gpuguard.k8s.dra import Dra

log = logging.getLogger("gpuguard.k8s")


@dataclass
class NodeCheck:
    """One node's check. ``read_health`` answers {UUID: state name} for the GPUs NVML sees now.

    Attributes:
        quiet_period_s: how long every GPU must read HEALTHY, unbroken, before the marks go.
        clock: seconds, monotonic (injectable so that tests need not wait).
    """

    cluster: Cluster
    read_health: Callable[[], Mapping[str, str]]
    quiet_period_s: float = 600.0
    clock: Callable[[], float] = time.monotonic
    healthy_since: float | None = field(default=None, init=False)

    def once(self) -> str:
        """Look once; returns what it saw or did, one line."""
        from kubernetes import client

        cl = self.cluster
        node = cl.call_json("get", "nodes", client.CoreV1Api(cl.api).read_node, cl.node)
        record = node_marks.read_record(node)
        key = cl.config.taint_key
        marked = any(t.get("key") == key for t in node.get("spec", {}).get("taints") or []) or key in (
            node.get("metadata", {}).get("labels") or {}
        )
        if not marked and not record:
            self.healthy_since = None
            return f"node {cl.node}: no gpuguard mark"
        states = dict(self.read_health())
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
        line = f"node {cl.node}: GPUs healthy for {healthy_for:.0f}s; removed " + "; ".join(removed)
        log.warning("%s", line)
        return line
