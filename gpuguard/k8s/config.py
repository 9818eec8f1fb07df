"""What gpuguard asks of Kubernetes, and how long it may wait for it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from gpuguard.errors import ConfigError

# Effects a device taint may have: NoSchedule and NoExecute (the API's DeviceTaintEffect enum;
# PreferNoSchedule does not exist for devices).
DEVICE_TAINT_EFFECTS: Final = ("NoSchedule", "NoExecute")
_DNS1123_SUBDOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME: Final = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


@dataclass(frozen=True)
class KubernetesConfig:
    """Kubernetes actions on an evacuation, each switchable.

    Attributes:
        enabled: ``auto`` (on when in a cluster or a kubeconfig exists), ``on``, or ``off``.
        condition: set a pod condition (``condition_type`` = False) through pods/status.
        condition_type: the condition's type.
        event: create an events.k8s.io/v1 Event on the pod.
        mark: mark the node: ``taint`` (``taint_key`` = ``gpuguard``, ``taint_effect``), ``label``, or ``none``.
        marker: who marks the node. ``agent``: the pod reports on its own pod (condition, Event and the
            ``gpuguard.io/unhealthy-gpus`` annotation) and the node agent (the node-check DaemonSet, its own
            service account) marks the node it runs on, answering with a ``GPUNodeMarked`` Event; the
            training pods hold no node rights. ``pod``: the pod patches its node itself (the generated
            ValidatingAdmissionPolicy keeps it to its own node and gpuguard's key).
        taint_key: the taint's or label's key. gpuguard's taints carry the value ``gpuguard``: a taint with
            this key and another value is someone else's and is never removed.
        taint_effect: for FAILING or LOST GPUs: ``NoSchedule`` keeps new pods off; ``NoExecute`` would evict
            the others too; ``PreferNoSchedule`` only with ``dra=False`` (device taints do not have it).
            An escalated DEGRADED GPU (it works, but the job left it) taints ``NoSchedule`` at most, never
            ``NoExecute``: the replacement must not come back, the node's other pods may stay.
        dra: for DRA-allocated GPUs, create a DeviceTaintRule that taints just that device.
        dra_driver: the DRA driver whose devices are GPUs.
        leave: ``exit`` with the code (the Job's podFailurePolicy reads it), or ``evict`` (the pod gets
            DisruptionTarget), or ``delete`` the pod.
        delete_grace_period_s: with ``leave=delete``, the grace period to ask for; None (default) keeps the
            pod's own ``terminationGracePeriodSeconds``. At least 1: the process must exit with its own
            code, which the Job's podFailurePolicy reads, before it is killed.
        deadline_s: all actions together may take this long; evacuation never waits longer.
        request_timeout_s: one API call may take this long.
        pod_health: read the pod's own allocatedResourcesStatus (KEP-4680) as health evidence.
        pod_health_interval_s: how often to read it.
        kubeconfig: a kubeconfig file to use outside a cluster (else ``KUBECONFIG`` or ``~/.kube/config``).
        evacuation_budget: the ConfigMap (in the pod's namespace) that counts health evacuations across the
            gang's restarts and recreations; None: no budget. ``gpuguard k8s manifests`` creates it.
    """

    enabled: Literal["auto", "on", "off"] = "auto"
    condition: bool = True
    condition_type: str = "gpuguard.io/GPUHealthy"
    event: bool = True
    mark: Literal["taint", "label", "none"] = "taint"
    marker: Literal["pod", "agent"] = "pod"
    taint_key: str = "gpuguard.io/unhealthy-gpu"
    taint_effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"
    dra: bool = True
    dra_driver: str = "gpu.nvidia.com"
    leave: Literal["exit", "evict", "delete"] = "exit"
    delete_grace_period_s: int | None = None
    deadline_s: float = 10.0
    request_timeout_s: float = 3.0
    pod_health: bool = True
    pod_health_interval_s: float = 10.0
    kubeconfig: str | None = None
    evacuation_budget: str | None = None

    def __post_init__(self) -> None:
        choices = {
            "enabled": ("auto", "on", "off"),
            "mark": ("taint", "label", "none"),
            "marker": ("pod", "agent"),
            "taint_effect": ("NoSchedule", "PreferNoSchedule", "NoExecute"),
            "leave": ("exit", "evict", "delete"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"kubernetes.{name}", getattr(self, name), "allowed: " + ", ".join(allowed))
        for name in ("deadline_s", "request_timeout_s", "pod_health_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"kubernetes.{name}", value, "must be a number of seconds greater than 0")
        grace = self.delete_grace_period_s
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int) or grace < 1):
            raise ConfigError("kubernetes.delete_grace_period_s", grace, "must be a whole number of seconds, 1 or more")
        for name in ("condition", "event", "dra", "pod_health"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"kubernetes.{name}", getattr(self, name), "must be true or false")
        if self.dra and self.taint_effect not in DEVICE_TAINT_EFFECTS:
            # The API server rejects any other effect on a DeviceTaint (pkg/apis/resource/validation/
            # validation.go, validateDeviceTaint): better said now than as a 422 mid-evacuation.
            raise ConfigError(
                "kubernetes.taint_effect",
                self.taint_effect,
                "with dra=true the effect must be one a DeviceTaintRule accepts: "
                + ", ".join(DEVICE_TAINT_EFFECTS)
                + " (set dra=false to taint only the node with PreferNoSchedule)",
            )
        budget = self.evacuation_budget
        if budget is not None and not _DNS1123_SUBDOMAIN.match(budget):
            raise ConfigError("kubernetes.evacuation_budget", budget, "must be a ConfigMap's name (a DNS subdomain)")
        if not _QUALIFIED_NAME.match(self.taint_key) or len(self.taint_key.rsplit("/", 1)[-1]) > 63:
            # A taint's key and a label's key are qualified names (apimachinery validation.IsQualifiedName).
            raise ConfigError(
                "kubernetes.taint_key", self.taint_key, "must be a qualified name such as gpuguard.io/unhealthy-gpu"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> KubernetesConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"kubernetes.{key}", value, "unknown setting; allowed: " + ", ".join(sorted(known)))
        return cls(**dict(values))
