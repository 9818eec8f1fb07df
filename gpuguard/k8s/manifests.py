"""The manifests a guarded training job needs: the workload (an indexed Job for one node, a JobSet or a
Kubeflow Trainer TrainJob for a gang) that understands gpuguard's exit codes, a ServiceAccount, RBAC
derived from the Kubernetes actions enabled, the node agent that marks and gives back its own node,
the ConfigMap that budgets health evacuations, and the ValidatingAdmissionPolicy that keeps node
patches to the patcher's own node and gpuguard's own marks.

Everything is generated for one Kubernetes release (``kubernetes_version``, default the oldest one
supported) and, for gangs, one JobSet release (``jobset_version``). A feature that the release does
not have on by default is either refused, or generated only when the operator says the feature gate is
on, and then explained in a comment; never dropped silently by the API server.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import yaml

from gpuguard.errors import ConfigError
from gpuguard.k8s import _guardrails, _workloads, rbac
from gpuguard.k8s._versions import FEATURES, JOBSET_FIELDS, JOBSET_VERSIONS, KUBERNETES_VERSIONS, at_least
from gpuguard.k8s.config import KubernetesConfig
from gpuguard.k8s.node_marks import RECORD_ANNOTATION

SUPPORTED_VERSIONS: Final = KUBERNETES_VERSIONS
KINDS: Final = ("auto", "job", "jobset", "trainjob", "pytorchjob")
# apimachinery/pkg/util/validation/validation.go: IsDNS1123Label, IsDNS1035Label
_DNS1123_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL: Final = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_GATE: Final = re.compile(r"^[A-Z][A-Za-z0-9]*$")
# Kubeflow Training Operator v1 (kubeflow/trainer v1.9.4 pkg/util/train/train_util.go): under
# restartPolicy ExitCode, IsRetryableExitCode is exitCode >= 128, so 1-127 are permanent.
PYTORCHJOB_REFUSED: Final = (
    "Kubeflow's PyTorchJob (Training Operator v1) treats exit codes 1-127 as permanent under restartPolicy "
    "ExitCode (kubeflow/trainer v1.9.4 pkg/util/train/train_util.go: IsRetryableExitCode is exitCode >= 128), so "
    "gpuguard's 75 would fail the whole job instead of moving it; use --kind trainjob (Kubeflow Trainer v2, the "
    "same torchrun contract) or --kind jobset"
)
RESTART_MODES: Final = ("off", "container", "pod")


_QUANTITY: Final = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


@dataclass(frozen=True)
class JobSpec:
    """What to generate.

    Attributes:
        name: the workload's name (and its ServiceAccount's, Role's, ...). A DNS-1123 label; for a gang a
            DNS-1035 label (it names the headless Service), short enough for the pods' hostnames.
        image: the container image, with gpuguard and the training script in it.
        gpus: GPUs per node (``nvidia.com/gpu`` and torchrun's ``--nproc-per-node``).
        nodes: pods, one per node.
        kind: ``job`` (one node), ``jobset`` or ``trainjob`` (a gang); ``auto``: a Job for one node, a
            JobSet for more. ``pytorchjob`` is refused, with the reason.
        checkpoint_dir: ``GPUGUARD_CHECKPOINT_DIR``.
        namespace: where the namespaced objects go.
        kubernetes: the actions gpuguard takes in the pods; the RBAC grants exactly what they need,
            and the pods get the same settings through ``GPUGUARD_KUBERNETES_*``.
        restart_in_place: what exit 76 restarts in place: ``container`` (restartPolicyRules Restart,
            KEP-5307), ``pod`` (RestartAllContainers, KEP-5532) or ``off`` (76 counts as a failure).
        script: the training script and its arguments, run by ``gpuguard-run``.
        reschedule_exit_code: exits that move the job off the node.
        restart_exit_code: exits that restart in place.
        kubernetes_version: the release to generate for, ``1.34`` to ``1.37``.
        feature_gates: gates the operator has turned on (and the API versions they need).
        jobset_version: the JobSet release installed (gangs), ``0.6`` to ``0.12``.
        max_restarts: counted restarts: the Job's ``backoffLimit``, the JobSet's ``maxRestarts``.
        evacuation_budget: health evacuations allowed across every restart and recreation (None: no budget).
        node_check: a node agent DaemonSet that marks its node on the pods' reports and gives it back.
        node_agent_image: the node agent's image (default: ``image``); a small one without torch will do.
        node_check_quiet_period_s: how long the GPUs must stay healthy before the mark goes.
        runtime_kind: for ``trainjob``, ``TrainingRuntime`` (namespaced) or ``ClusterTrainingRuntime``.
        preemption_deadline_s: the guard's time from SIGTERM to a committed checkpoint; the pod's
            ``terminationGracePeriodSeconds`` covers it plus a margin.
        local_dir: the guard's node-local tier (``GPUGUARD_LOCAL_DIR``): an ``emptyDir`` mounted there,
            memory-backed (``medium: Memory``) under ``/dev/shm``, on the node's disk elsewhere. It lives
            as long as the pod: a container restarted in place (exit 76) finds it again; a new pod does not.
        local_size: the ``emptyDir``'s ``sizeLimit`` (a quantity such as ``64Gi``); a memory-backed one
            counts against the container's memory limit.
    """

    name: str
    image: str
    gpus: int
    nodes: int = 1
    kind: str = "auto"
    checkpoint_dir: str | None = None
    namespace: str = "default"
    kubernetes: KubernetesConfig = field(default_factory=lambda: KubernetesConfig(marker="agent"))
    restart_in_place: Literal["off", "container", "pod"] | bool = "off"
    script: Sequence[str] = field(default_factory=lambda: ["train.py"])
    reschedule_exit_code: int = 75
    restart_exit_code: int = 76
    kubernetes_version: str = SUPPORTED_VERSIONS[0]
    feature_gates: frozenset[str] = frozenset()
    jobset_version: str = "0.10"
    max_restarts: int = 3
    evacuation_budget: int | None = 10
    node_check: bool = True
    node_agent_image: str | None = None
    node_check_quiet_period_s: int = 600
    runtime_kind: str = "TrainingRuntime"
    preemption_deadline_s: float = 25.0
    local_dir: str | None = None
    local_size: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.restart_in_place, bool):  # True: the container, as before KEP-5532
            object.__setattr__(self, "restart_in_place", "container" if self.restart_in_place else "off")
        self._check_kind()
        if self.kubernetes_version not in SUPPORTED_VERSIONS:
            raise ConfigError(
                "--kubernetes-version", self.kubernetes_version, "supported: " + ", ".join(SUPPORTED_VERSIONS)
            )
        if self.jobset_version.removeprefix("v") not in JOBSET_VERSIONS:
            raise ConfigError(
                "--jobset-version",
                self.jobset_version,
                "supported: " + ", ".join(JOBSET_VERSIONS) + " (failurePolicy rules, which gpuguard needs, came in "
                "v0.6: " + JOBSET_FIELDS["failurePolicy.rules"].source + ")",
            )
        object.__setattr__(self, "jobset_version", self.jobset_version.removeprefix("v"))
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or not 1 <= self.nodes <= 10_000:
            raise ConfigError("--nodes", self.nodes, "must be a whole number from 1 to 10000")
        self._check_names()
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError("--image", self.image, "must be an image reference such as registry/trainer:1.0")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or not 1 <= self.gpus <= 64:
            raise ConfigError("--gpus", self.gpus, "must be a whole number from 1 to 64")
        for gate in self.feature_gates:
            if not _GATE.match(gate):
                raise ConfigError("--feature-gate", gate, "must be a feature gate's name, e.g. ContainerRestartRules")
        for name, flag, low in (
            ("node_check_quiet_period_s", "--node-check-quiet-period", 0),
            ("max_restarts", "--max-restarts", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(flag, value, f"must be a whole number, {low} or more")
        budget = self.evacuation_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ConfigError("--evacuation-budget", budget, "must be a whole number, 0 or more (-1: no budget)")
        if self.runtime_kind not in ("TrainingRuntime", "ClusterTrainingRuntime"):
            raise ConfigError("--runtime-kind", self.runtime_kind, "allowed: TrainingRuntime, ClusterTrainingRuntime")
        if self.kubernetes.marker == "agent" and self.kubernetes.mark != "none" and not self.node_check:
            raise ConfigError(
                "--no-node-check",
                True,
                "the node agent marks the node for the pods (--marker agent); without it, pass --marker pod "
                "(the pods patch their own node, kept to it by the generated ValidatingAdmissionPolicy)",
            )
        self._check_restart_in_place()
        self._check_local_tier()

    def _check_local_tier(self) -> None:
        if self.local_dir is not None and (
            not self.local_dir.startswith("/")
            or self.local_dir.rstrip("/") in ("", "/dev/shm")
            or ":" in self.local_dir
        ):
            raise ConfigError(
                "--local-dir",
                self.local_dir,
                "must be an absolute path in the container below the root, e.g. /dev/shm/gpuguard (memory) or "
                "/local/gpuguard (the node's disk); not /dev/shm itself, which the runtime mounts",
            )
        if self.local_size is not None:
            if self.local_dir is None:
                raise ConfigError("--local-size", self.local_size, "needs --local-dir")
            if not _QUANTITY.match(self.local_size):
                raise ConfigError("--local-size", self.local_size, "must be a Kubernetes quantity such as 64Gi or 500M")

    def _check_kind(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("--kind", self.kind, "allowed: " + ", ".join(k for k in KINDS if k != "pytorchjob"))
        if self.kind == "pytorchjob":
            raise ConfigError("--kind", self.kind, PYTORCHJOB_REFUSED)
        if self.kind == "job" and self.nodes > 1:
            raise ConfigError(
                "--kind",
                self.kind,
                "a plain Job restarts pods, not the gang: one rank's crash fails its peers too and each is counted, "
                "and exit 75 replaces only the pods that left; for more than one node use --kind jobset "
                "(or --kind trainjob with Kubeflow Trainer)",
            )

    def _check_names(self) -> None:
        gang = self.resolved_kind != "job"
        # pod hostnames: NAME-INDEX (Job), NAME-node-JOBINDEX-0 (JobSet and Trainer's JobSet)
        longest = 63 - len(f"-node-{self.nodes - 1}-0") if gang else 63 - len("-0")
        if gang and not _DNS1035_LABEL.match(self.name):
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
                "(the pods' hostnames are built from it, 63 at most)",
            )
        if not _DNS1123_LABEL.match(self.namespace) or len(self.namespace) > 63:
            raise ConfigError("--namespace", self.namespace, "must be a DNS label (63 at most)")

    def _check_restart_in_place(self) -> None:
        mode = self.restart_in_place
        if mode not in RESTART_MODES:
            raise ConfigError("--restart-in-place", mode, "allowed: " + ", ".join(RESTART_MODES))
        needed = {"container": ["restart-container"], "pod": ["restart-container", "restart-pod"]}.get(str(mode), [])
        for name in needed:
            feature = FEATURES[name]
            if not at_least(self.kubernetes_version, feature.since):
                raise ConfigError(
                    "--restart-in-place",
                    mode,
                    f"Kubernetes {self.kubernetes_version} does not have it: {feature.source}",
                )
        for name in needed:
            feature = FEATURES[name]
            if not self.feature_on(name):
                raise ConfigError(
                    "--restart-in-place",
                    mode,
                    f"Kubernetes {self.kubernetes_version} drops restartPolicyRules silently unless {feature.how} "
                    f"is on: pass --feature-gate {feature.gates[0]} if it is, or --kubernetes-version "
                    f"{feature.default_in} or later ({feature.source})",
                )

    @property
    def resolved_kind(self) -> str:
        if self.kind == "auto":
            return "job" if self.nodes == 1 else "jobset"
        return self.kind

    @property
    def runtime_name(self) -> str:
        return f"{self.name}-gpuguard"

    @property
    def budget_name(self) -> str:
        return f"{self.name}-gpuguard-budget"

    def feature_on(self, name: str) -> bool:
        feature = FEATURES[name]
        if at_least(self.kubernetes_version, feature.default_in):
            return True
        return any(gate in self.feature_gates for gate in feature.gates)

    @property
    def actions(self) -> KubernetesConfig:
        """The actions as they will run: DeviceTaintRules only where the release serves them, the budget."""
        c = self.kubernetes
        if c.dra and not self.feature_on("device-taint-rules"):
            c = dataclasses.replace(c, dra=False)
        budget = self.budget_name if self.evacuation_budget is not None else None
        return dataclasses.replace(c, evacuation_budget=budget)


def notes(spec: JobSpec) -> list[str]:
    """What the operator must know about this output on this release: the comments above the YAML."""
    lines = [f"Generated by gpuguard for Kubernetes {spec.kubernetes_version} ({spec.resolved_kind})."]
    lines += _workloads.notes(spec)
    if spec.kubernetes.dra and not spec.actions.dra:
        lines.append(
            f"DeviceTaintRules are off: Kubernetes {spec.kubernetes_version} serves them only with "
            f"{FEATURES['device-taint-rules'].how}; pass --feature-gate DRADeviceTaints (1.34) or "
            "DRADeviceTaintRules (1.35, 1.36) once they are on. The node taint still keeps new pods off."
        )
    elif spec.actions.dra and not at_least(spec.kubernetes_version, FEATURES["device-taint-rules"].default_in):
        lines.append(f"DeviceTaintRules need {FEATURES['device-taint-rules'].how} (said to be on).")
    if spec.kubernetes.pod_health and not at_least(spec.kubernetes_version, "1.36"):
        lines.append(
            "Pod device health (KEP-4680 allocatedResourcesStatus) needs the ResourceHealthStatus gate "
            "(alpha, off) before 1.36; without it gpuguard reads nothing there and relies on NVML."
        )
    if spec.kubernetes.mark == "label":
        lines.append(
            f"Label mode: the pods keep off nodes labelled {spec.kubernetes.taint_key}=failing or =degraded (node "
            "affinity); other workloads need the same affinity, since a label alone keeps nothing off a node."
        )
    if spec.kubernetes.mark != "none":
        who = (
            "the node agent (DaemonSet, its own service account) marks its own node on the pods' reports; "
            "the training pods hold no node rights"
            if spec.kubernetes.marker == "agent"
            else "the training pods patch their own node"
        )
        lines.append(
            f"Marking: {who}. The ValidatingAdmissionPolicy keeps node patches to the patcher's own node (its "
            "token's authentication.kubernetes.io/node-name, KEP-4193, GA 1.32) and to gpuguard's taint "
            f"{spec.kubernetes.taint_key}=gpuguard, label and record; other taints are never touched."
        )
    if spec.node_check and spec.kubernetes.mark != "none":
        lines.append(
            "The node agent runs on nodes labelled nvidia.com/gpu.present=true (GPU feature discovery), is not "
            "ready while it sees no GPU, and removes gpuguard's mark once the node's GPUs stayed healthy for "
            f"{spec.node_check_quiet_period_s}s."
        )
    if spec.local_dir:
        where = (
            "in memory (counted against the container's memory limit)"
            if spec.local_dir.startswith("/dev/shm/")
            else "on the node's disk"
        )
        survives = (
            "a container restarted in place (exit 76) finds it again"
            if spec.restart_in_place != "off"
            else "exit 76 is not restarted in place here (--restart-in-place), so a new pod starts without it"
        )
        lines.append(
            f"Local tier: an emptyDir at {spec.local_dir}, {where}, "
            + (
                f"{spec.local_size} (each of the {spec.gpus} ranks keeps at most half its share: "
                "GPUGUARD_LOCAL_KEEP_BYTES)"
                if spec.local_size
                else "with no size limit"
            )
            + "; "
            f"{survives}; a pod on another node resumes from object storage."
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
    if spec.evacuation_budget is not None:
        objects.append(_guardrails.budget(spec, labels))
    node_patchers = []
    if spec.node_check and spec.kubernetes.mark != "none":
        objects += _guardrails.node_agent(spec, labels, _role_and_binding)
        node_patchers.append(f"{spec.name}-node-check")
    if spec.kubernetes.mark != "none" and spec.actions.marker == "pod":
        node_patchers.append(spec.name)
    if node_patchers:
        objects += _guardrails.node_patch_policy(spec, labels, node_patchers)
    kind = spec.resolved_kind
    if kind == "job":
        objects.append(_workloads.job(spec, labels))
    elif kind == "jobset":
        objects.append(_workloads.jobset(spec, labels))
    else:
        objects += [_workloads.training_runtime(spec, labels), _workloads.train_job(spec, labels)]
    return objects


def to_yaml(spec: JobSpec) -> str:
    """The notes as comments, then the objects, as ``kubectl apply -f -`` reads them."""
    import textwrap

    comments = "".join(f"# {part}\n" for line in notes(spec) for part in textwrap.wrap(line, 100))
    return comments + yaml.dump_all(render(spec), Dumper=_PlainDumper, sort_keys=False, width=120)


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


__all__ = ["KINDS", "PYTORCHJOB_REFUSED", "RECORD_ANNOTATION", "JobSpec", "notes", "render", "to_yaml"]
