"""The manifests a guarded training job needs: an indexed Job that understands gpuguard's exit codes,
a ServiceAccount, and least-privilege RBAC."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gpuguard.errors import ConfigError

# Beyond the guard's preemption deadline: the Kubernetes actions' own 10 s deadline and the exit.
GRACE_MARGIN_S = 15.0
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")


@dataclass(frozen=True)
class JobSpec:
    """What to generate.

    Attributes:
        name: the Job's name (and its ServiceAccount's, Role's, ...): a DNS label of at most 52 characters.
        image: the container image, with gpuguard and the training script in it.
        gpus: GPUs per node (``nvidia.com/gpu`` and torchrun's ``--nproc-per-node``).
        nodes: pods (one per node), as an indexed Job.
        checkpoint_dir: ``GPUGUARD_CHECKPOINT_DIR``.
        namespace: where the namespaced objects go.
        taint: grant the node and DeviceTaintRule permissions that marking bad hardware needs.
        restart_in_place: restart the trainer container in place on exit 76 (Kubernetes 1.34+).
        script: the training script and its arguments, run by ``gpuguard-run``.
        reschedule_exit_code: exits that the Job ignores (the pod is replaced elsewhere).
        restart_exit_code: exits that restart the container in place.
        preemption_deadline_s: the guard's time from SIGTERM to a committed checkpoint; the pod's
            ``terminationGracePeriodSeconds`` covers it plus ``GRACE_MARGIN_S``.
    """

    name: str
    image: str
    gpus: int
    nodes: int = 1
    checkpoint_dir: str | None = None
    namespace: str = "default"
    taint: bool = True
    restart_in_place: bool = False
    script: Sequence[str] = field(default_factory=lambda: ["train.py"])
    reschedule_exit_code: int = 75
    restart_exit_code: int = 76
    preemption_deadline_s: float = 25.0

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError("--name", self.name, "must be a DNS label: lowercase letters, digits and '-', 52 at most")
        if not _NAME.match(self.namespace):
            raise ConfigError("--namespace", self.namespace, "must be a DNS label")
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError("--image", self.image, "must be an image reference such as registry/trainer:1.0")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or not 1 <= self.gpus <= 64:
            raise ConfigError("--gpus", self.gpus, "must be a whole number from 1 to 64")
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or not 1 <= self.nodes <= 10_000:
            raise ConfigError("--nodes", self.nodes, "must be a whole number from 1 to 10000")


def render(spec: JobSpec) -> list[dict[str, Any]]:
    """The objects, in the order ``kubectl apply`` wants them."""
    labels = {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/managed-by": "gpuguard"}
    meta = {"name": spec.name, "namespace": spec.namespace, "labels": labels}
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": _role_rules(spec),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": spec.name},
            "subjects": [{"kind": "ServiceAccount", "name": spec.name, "namespace": spec.namespace}],
        },
    ]
    if spec.taint:
        cluster_name = f"{spec.name}-{spec.namespace}-gpuguard"
        objects += [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": cluster_name, "labels": labels},
                "rules": [
                    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
                    {"apiGroups": ["resource.k8s.io"], "resources": ["devicetaintrules"], "verbs": ["create"]},
                    {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"], "verbs": ["list"]},
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": cluster_name, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
                "subjects": [{"kind": "ServiceAccount", "name": spec.name, "namespace": spec.namespace}],
            },
        ]
    if spec.nodes > 1:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta,
                "spec": {
                    "clusterIP": "None",
                    "selector": {"batch.kubernetes.io/job-name": spec.name},
                    "ports": [{"name": "rendezvous", "port": 29400}],
                },
            }
        )
    objects.append(_job(spec, labels))
    return objects


def _role_rules(spec: JobSpec) -> list[dict[str, Any]]:
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    ]
    if spec.taint:
        rules.append({"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]})
    return rules


def _job(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    field_env = [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
        ("NODE_NAME", "spec.nodeName"),
    ]
    env: list[dict[str, Any]] = [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}} for n, p in field_env]
    if spec.checkpoint_dir:
        env.append({"name": "GPUGUARD_CHECKPOINT_DIR", "value": spec.checkpoint_dir})
    # SIGTERM → agreed step → committed checkpoint within the deadline; then the Kubernetes actions
    # (their own 10 s deadline) and the exit, before the kubelet's SIGKILL at the grace period's end.
    grace = math.ceil(spec.preemption_deadline_s + GRACE_MARGIN_S)
    env.append({"name": "GPUGUARD_PREEMPTION_DEADLINE_S", "value": f"{spec.preemption_deadline_s:g}"})
    env.append({"name": "GPUGUARD_TERMINATION_GRACE_S", "value": str(grace)})
    command = ["gpuguard-run", f"--nproc-per-node={spec.gpus}", f"--nnodes={spec.nodes}"]
    if spec.nodes > 1:
        command += [
            "--node-rank=$(JOB_COMPLETION_INDEX)",
            "--rdzv-backend=c10d",
            f"--rdzv-id={spec.name}",
            f"--rdzv-endpoint={spec.name}-0.{spec.name}:29400",
        ]
    else:
        command.append("--standalone")
    container: dict[str, Any] = {
        "name": "trainer",
        "image": spec.image,
        "command": [*command, *spec.script],
        "env": env,
        "resources": {"limits": {"nvidia.com/gpu": spec.gpus}},
        # The pod starts only on GPUs that are healthy now.
        "startupProbe": {
            "exec": {"command": ["gpuguard", "status", "--check"]},
            "periodSeconds": 10,
            "timeoutSeconds": 30,
            "failureThreshold": 3,
        },
    }
    if spec.restart_in_place:
        # Exit 76 (a fault that a fresh process clears) restarts the trainer where it is: same node,
        # same image, no rescheduling. Needs Kubernetes 1.34+ (ContainerRestartRules).
        container["restartPolicy"] = "Never"
        container["restartPolicyRules"] = [
            {"action": "Restart", "exitCodes": {"operator": "In", "values": [spec.restart_exit_code]}}
        ]
    pod_spec: dict[str, Any] = {"serviceAccountName": spec.name, "restartPolicy": "Never", "containers": [container]}
    pod_spec["terminationGracePeriodSeconds"] = grace
    if spec.nodes > 1:
        pod_spec["subdomain"] = spec.name
    ignore = sorted({spec.reschedule_exit_code})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,
            "backoffLimit": 3,
            # A pod that gpuguard evacuated is replaced once it has failed, never beside it.
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [
                    # gpuguard's evacuations do not count against backoffLimit...
                    {
                        "action": "Ignore",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": ignore},
                    },
                    # ...nor do evictions and other disruptions...
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    # ...while any other failure does.
                    {
                        "action": "Count",
                        "onExitCodes": {
                            "containerName": "trainer",
                            "operator": "NotIn",
                            "values": sorted({0, spec.reschedule_exit_code}),
                        },
                    },
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
