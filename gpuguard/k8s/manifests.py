"""The manifests a guarded training job needs: an indexed Job that understands gpuguard's exit codes,
a ServiceAccount, RBAC derived from the Kubernetes actions enabled, and the node check that gives a
healed node back.

Everything is generated for one Kubernetes release (``kubernetes_version``, default the oldest one
supported). A feature that the release does not have on by default is either refused, or generated
only when the operator says the feature gate is on, and then explained in a comment; never dropped
silently by the API server.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from gpuguard.errors import ConfigError
from gpuguard.k8s import rbac
from gpuguard.k8s.config import KubernetesConfig

SUPPORTED_VERSIONS: Final = ("1.34", "1.35", "1.36", "1.37")
# apimachinery/pkg/util/validation/validation.go: IsDNS1123Label, IsDNS1035Label
_DNS1123_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL: Final = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_GATE: Final = re.compile(r"^[A-Z][A-Za-z0-9]*$")


@dataclass(frozen=True)
class Feature:
    """A feature that a release may not have on by default (pkg/features/kube_features.go)."""

    gates: tuple[str, ...]  # what the operator must turn on, before ``default_in``
    default_in: str  # the first release where it is on by default
    how: str  # what turning it on takes, said in the output's comment


FEATURES: Final = {
    # ContainerRestartRules: alpha (off) 1.34, beta (on) 1.35. Off, the API server drops the fields
    # without an error (pkg/api/pod/util.go dropDisabledFields) and exit 76 counts against backoffLimit.
    "restart-in-place": Feature(
        ("ContainerRestartRules",), "1.35", "the ContainerRestartRules feature gate on the API server and kubelets"
    ),
    # DeviceTaintRule: DRADeviceTaints alpha 1.33, beta 1.36, GA 1.37; DRADeviceTaintRules alpha 1.35,
    # an off-by-default beta API in 1.36, GA 1.37. Served at resource.k8s.io/v1alpha3 (1.34, 1.35),
    # v1beta2 (1.36), v1 (1.37).
    "device-taint-rules": Feature(
        ("DRADeviceTaints", "DRADeviceTaintRules"),
        "1.37",
        "the DRADeviceTaints gate (and from 1.35 DRADeviceTaintRules) and --runtime-config for the "
        "resource.k8s.io version that serves DeviceTaintRule (v1alpha3 on 1.34-1.35, v1beta2 on 1.36)",
    ),
}


def _at_least(version: str, other: str) -> bool:
    return tuple(map(int, version.split("."))) >= tuple(map(int, other.split(".")))


# Beyond the guard's preemption deadline: the Kubernetes actions' own 10 s deadline and the exit.
GRACE_MARGIN_S = 15.0


@dataclass(frozen=True)
class JobSpec:
    """What to generate.

    Attributes:
        name: the Job's name (and its ServiceAccount's, Role's, ...). A DNS-1123 label; with ``nodes``
            > 1 a DNS-1035 label (it names the headless Service), short enough that ``NAME-INDEX``,
            each pod's hostname, stays a 63-character label.
        image: the container image, with gpuguard and the training script in it.
        gpus: GPUs per node (``nvidia.com/gpu`` and torchrun's ``--nproc-per-node``).
        nodes: pods (one per node), as an indexed Job.
        checkpoint_dir: ``GPUGUARD_CHECKPOINT_DIR``.
        namespace: where the namespaced objects go.
        kubernetes: the actions gpuguard takes in the pods; the RBAC grants exactly what they need,
            and the pods get the same settings through ``GPUGUARD_KUBERNETES_*``.
        restart_in_place: restart the trainer container in place on exit 76 (ContainerRestartRules).
        script: the training script and its arguments, run by ``gpuguard-run``.
        reschedule_exit_code: exits that the Job ignores (the pod is replaced elsewhere).
        restart_exit_code: exits that restart the container in place.
        kubernetes_version: the release to generate for, ``1.34`` to ``1.37``.
        feature_gates: gates the operator has turned on (and the API versions they need).
        node_check: with a node mark, a DaemonSet that removes it once the GPUs stay healthy.
        node_check_quiet_period_s: how long the GPUs must stay healthy before that.
        preemption_deadline_s: the guard's time from SIGTERM to a committed checkpoint; the pod's
            ``terminationGracePeriodSeconds`` covers it plus ``GRACE_MARGIN_S``.
    """

    name: str
    image: str
    gpus: int
    nodes: int = 1
    checkpoint_dir: str | None = None
    namespace: str = "default"
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    restart_in_place: bool = False
    script: Sequence[str] = field(default_factory=lambda: ["train.py"])
    reschedule_exit_code: int = 75
    restart_exit_code: int = 76
    kubernetes_version: str = SUPPORTED_VERSIONS[0]
    feature_gates: frozenset[str] = frozenset()
    node_check: bool = True
    node_check_quiet_period_s: int = 600
    preemption_deadline_s: float = 25.0

    def __post_init__(self) -> None:
        if self.kubernetes_version not in SUPPORTED_VERSIONS:
            raise ConfigError(
                "--kubernetes-version", self.kubernetes_version, "supported: " + ", ".join(SUPPORTED_VERSIONS)
            )
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or not 1 <= self.nodes <= 10_000:
            raise ConfigError("--nodes", self.nodes, "must be a whole number from 1 to 10000")
        longest = 63 - len(f"-{self.nodes - 1}")  # the last pod's hostname, NAME-INDEX, is a DNS label
        if self.nodes > 1 and not _DNS1035_LABEL.match(self.name):
            raise ConfigError(
                "--name",
                self.name,
                "must be a DNS-1035 label (it names the headless Service): lowercase letters, digits and '-', "
                "starting with a letter",
            )
        if not _DNS1123_LABEL.match(self.name) or len(self.name) > longest:
            raise ConfigError(
                "--name",
                self.name,
                f"must be a DNS label: lowercase letters, digits and '-', {longest} characters at most "
                f"(pod hostnames are NAME-INDEX, 63 at most)",
            )
        if not _DNS1123_LABEL.match(self.namespace) or len(self.namespace) > 63:
            raise ConfigError("--namespace", self.namespace, "must be a DNS label (63 at most)")
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError("--image", self.image, "must be an image reference such as registry/trainer:1.0")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or not 1 <= self.gpus <= 64:
            raise ConfigError("--gpus", self.gpus, "must be a whole number from 1 to 64")
        for gate in self.feature_gates:
            if not _GATE.match(gate):
                raise ConfigError("--feature-gate", gate, "must be a feature gate's name, e.g. ContainerRestartRules")
        quiet = self.node_check_quiet_period_s
        if isinstance(quiet, bool) or not isinstance(quiet, int) or quiet < 0:
            raise ConfigError("--node-check-quiet-period", quiet, "must be a whole number of seconds, 0 or more")
        if self.restart_in_place and not self.feature_on("restart-in-place"):
            raise ConfigError(
                "--restart-in-place",
                True,
                f"Kubernetes {self.kubernetes_version} drops restartPolicyRules silently unless "
                f"{FEATURES['restart-in-place'].how} is on: pass --feature-gate ContainerRestartRules "
                "if it is, or --kubernetes-version 1.35 or later",
            )

    def feature_on(self, name: str) -> bool:
        feature = FEATURES[name]
        if _at_least(self.kubernetes_version, feature.default_in):
            return True
        return any(gate in self.feature_gates for gate in feature.gates)

    @property
    def actions(self) -> KubernetesConfig:
        """The actions as they will run: DeviceTaintRules only where the release serves them."""
        import dataclasses

        if self.kubernetes.dra and not self.feature_on("device-taint-rules"):
            return dataclasses.replace(self.kubernetes, dra=False)
        return self.kubernetes


def notes(spec: JobSpec) -> list[str]:
    """What the operator must know about this output on this release: the comments above the YAML."""
    lines = [f"Generated by gpuguard for Kubernetes {spec.kubernetes_version}."]
    if spec.kubernetes.dra and not spec.actions.dra:
        lines.append(
            f"DeviceTaintRules are off: Kubernetes {spec.kubernetes_version} serves them only with "
            f"{FEATURES['device-taint-rules'].how}; pass --feature-gate DRADeviceTaints (1.34) or "
            "DRADeviceTaintRules (1.35, 1.36) once they are on. The node taint still keeps new pods off."
        )
    elif spec.actions.dra and not _at_least(spec.kubernetes_version, FEATURES["device-taint-rules"].default_in):
        lines.append(f"DeviceTaintRules need {FEATURES['device-taint-rules'].how} (said to be on).")
    if spec.restart_in_place and not _at_least(spec.kubernetes_version, FEATURES["restart-in-place"].default_in):
        lines.append(f"restartPolicyRules need {FEATURES['restart-in-place'].how} (said to be on).")
    if spec.kubernetes.pod_health and not _at_least(spec.kubernetes_version, "1.36"):
        lines.append(
            "Pod device health (KEP-4680 allocatedResourcesStatus) needs the ResourceHealthStatus gate "
            "(alpha, off) before 1.36; without it gpuguard reads nothing there and relies on NVML."
        )
    if spec.kubernetes.mark == "label":
        lines.append(
            f"Label mode: the Job keeps off nodes labelled {spec.kubernetes.taint_key}=failing (node affinity); "
            "other workloads need the same affinity, since a label alone keeps nothing off a node."
        )
    if spec.node_check and spec.kubernetes.mark != "none":
        lines.append(
            "The node-check DaemonSet runs on nodes labelled nvidia.com/gpu.present=true (GPU feature "
            "discovery) and removes gpuguard's mark once the node's GPUs stayed healthy for "
            f"{spec.node_check_quiet_period_s}s."
        )
    return lines


def render(spec: JobSpec) -> list[dict[str, Any]]:
    """The objects, in the order ``kubectl apply`` wants them."""
    labels = {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/managed-by": "gpuguard"}
    meta = {"name": spec.name, "namespace": spec.namespace, "labels": labels}
    namespaced, cluster = rbac.split(rbac.guard_permissions(spec.actions))
    subjects = [{"kind": "ServiceAccount", "name": spec.name, "namespace": spec.namespace}]
    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}]
    if namespaced:
        objects += _role_and_binding("Role", meta, rbac.rules(namespaced), subjects)
    if cluster:
        cluster_meta = {"name": f"{spec.name}-{spec.namespace}-gpuguard", "labels": labels}
        objects += _role_and_binding("ClusterRole", cluster_meta, rbac.rules(cluster), subjects)
    if spec.nodes > 1:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta,
                "spec": {
                    "clusterIP": "None",
                    "selector": {"batch.kubernetes.io/job-name": spec.name},
                    # rank 0's name must resolve before its startup probe passes: the other ranks
                    # rendezvous with it while it is still starting
                    "publishNotReadyAddresses": True,
                    "ports": [{"name": "rendezvous", "port": 29400}],
                },
            }
        )
    if spec.node_check and spec.kubernetes.mark != "none":
        objects += _node_check(spec, labels)
    objects.append(_job(spec, labels))
    return objects


def to_yaml(spec: JobSpec) -> str:
    """The notes as comments, then the objects, as ``kubectl apply -f -`` reads them."""
    import textwrap

    comments = "".join(f"# {part}\n" for line in notes(spec) for part in textwrap.wrap(line, 100))
    return comments + yaml.dump_all(render(spec), Dumper=_PlainDumper, sort_keys=False)


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases: manifests are read by people."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _role_and_binding(
    kind: str, meta: dict[str, Any], rules: list[dict[str, Any]], subjects: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": f"{kind}Binding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": meta["name"]},
            "subjects": subjects,
        },
    ]


def _node_check(spec: JobSpec, labels: dict[str, str]) -> list[dict[str, Any]]:
    """A DaemonSet, least privilege (nodes get/patch under its own account), that untaints healed nodes."""
    name = f"{spec.name}-node-check"
    meta = {"name": name, "namespace": spec.namespace, "labels": labels}
    subjects = [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}]
    cluster_meta = {"name": f"{spec.name}-{spec.namespace}-node-check", "labels": labels}
    c = spec.kubernetes
    selector = {"app.kubernetes.io/name": name}
    container = {
        "name": "node-check",
        "image": spec.image,
        "command": [
            "gpuguard",
            "k8s",
            "node-check",
            f"--quiet-period={spec.node_check_quiet_period_s}",
            f"--taint-key={c.taint_key}",
            *(["--dra"] if spec.actions.dra else []),
        ],
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            # NVML needs the node's GPUs without allocating them (the NVIDIA container runtime's way)
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    }
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**labels, **selector}},
                "spec": {
                    "serviceAccountName": name,
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    # it must run exactly where gpuguard's taint keeps everything else off
                    "tolerations": [{"key": c.taint_key, "operator": "Exists"}],
                    "containers": [container],
                },
            },
        },
    }
    permissions = rbac.rules(rbac.node_check_permissions(spec.actions.dra))
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        *_role_and_binding("ClusterRole", cluster_meta, permissions, subjects),
        daemonset,
    ]


def _settings_env(c: KubernetesConfig) -> list[dict[str, Any]]:
    """The actions the RBAC was generated for, so that the pods run exactly those."""
    values = {
        "CONDITION": c.condition,
        "EVENT": c.event,
        "POD_HEALTH": c.pod_health,
        "MARK": c.mark,
        "DRA": c.dra,
        "LEAVE": c.leave,
    }
    text = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in values.items()}
    return [{"name": f"GPUGUARD_KUBERNETES_{k}", "value": v} for k, v in text.items()]


def _job(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    field_env = [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
        ("NODE_NAME", "spec.nodeName"),
    ]
    env: list[dict[str, Any]] = [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}} for n, p in field_env]
    env += _settings_env(spec.actions)
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
        "resources": {"limits": {"nvidia.com/gpu": str(spec.gpus)}},  # a quantity: a string
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
        # same image, no rescheduling. JobSpec refuses it where ContainerRestartRules is off.
        container["restartPolicy"] = "Never"
        container["restartPolicyRules"] = [
            {"action": "Restart", "exitCodes": {"operator": "In", "values": [spec.restart_exit_code]}}
        ]
    pod_spec: dict[str, Any] = {"serviceAccountName": spec.name, "restartPolicy": "Never", "containers": [container]}
    pod_spec["terminationGracePeriodSeconds"] = grace
    if spec.nodes > 1:
        pod_spec["subdomain"] = spec.name
    if spec.kubernetes.mark == "label":
        # A label keeps nothing off a node by itself: the Job asks for nodes without gpuguard's
        # "failing" label (NotIn also matches nodes without the label), and prefers no "degraded".
        key = spec.kubernetes.taint_key
        not_failing = {"matchExpressions": [{"key": key, "operator": "NotIn", "values": ["failing"]}]}
        not_degraded = {"matchExpressions": [{"key": key, "operator": "NotIn", "values": ["degraded"]}]}
        pod_spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [not_failing]},
                "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": not_degraded}],
            }
        }
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
