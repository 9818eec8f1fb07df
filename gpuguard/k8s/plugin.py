"""Kubernetes as a gpuguard plugin: pod device health in, evacuation actions out."""

from __future__ import annotations

import os
from typing import Any

from gpuguard.guard.policy import Decision
from gpuguard.health.model import HealthSnapshot, Reason
from gpuguard.k8s.actions import ActionOutcome, KubernetesActions
from gpuguard.k8s.cluster import Cluster
from gpuguard.k8s.pod_health import PodDeviceHealth
from gpuguard.plugins import hookimpl


class KubernetesPlugin:
    """Registered by the guard when it runs in (or can reach) a cluster."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.actions = KubernetesActions(cluster)
        self.pod_health = PodDeviceHealth(cluster) if cluster.config.pod_health else None
        self.outcomes: list[ActionOutcome] = []

    def start(self) -> None:
        if self.pod_health:
            self.pod_health.start()

    def stop(self) -> None:
        if self.pod_health:
            self.pod_health.stop()

    @hookimpl
    def gpuguard_health_reasons(self, snapshot: HealthSnapshot) -> dict[str, list[Reason]]:
        if not self.pod_health:
            return {}
        watched = {d.uuid for d in snapshot.devices}
        return {uuid: reasons for uuid, reasons in self.pod_health.reasons.items() if uuid in watched}

    @hookimpl
    def gpuguard_on_evacuation(self, decision: Decision, exit_code: int, checkpoint: Any) -> None:
        evidence = dict(decision.evidence)
        state = str(evidence.get("state") or ("FAILING" if decision.device else "UNKNOWN"))
        checkpoint_id = getattr(checkpoint, "id", None)
        message = decision.message + (f"; emergency checkpoint {checkpoint_id}" if checkpoint_id else "")
        # The rank whose GPU failed marks it; one process per pod (local rank 0) does the leaving.
        # After a peer's sudden loss one survivor per pod reports it, and nothing is marked: the survivors'
        # GPUs are healthy, and the lost rank's node is marked only on health evidence (its own preflight,
        # the node check), never on a peer's word.
        sudden = "sudden_loss" in evidence
        if sudden:
            message = decision.message
        self.outcomes = self.actions.evacuate(
            device=decision.device,
            state=state,
            message=message,
            evidence={"reasons": evidence.get("reasons", []), "exit_code": exit_code, "rung": decision.rung},
            action=decision.action.name.lower(),
            exit_code=exit_code,
            report=bool(evidence.get("report")) if sudden else decision.device is not None,
            mark=decision.device is not None and not sudden,
            leave=os.environ.get("LOCAL_RANK", "0") == "0",
            condition=False if sudden else None,
            event_reason="PeerLost" if sudden else "GPUUnhealthy",
        )
