"""The workload objects: an indexed Job (one node), a JobSet (a gang), or a Kubeflow Trainer v2
TrainingRuntime and TrainJob (a gang run by Trainer) — each saying what gpuguard's exit codes mean.

Exit codes, per workload (the README's table):

- 75 (reschedule): the node is marked first, so the replacement lands elsewhere. Job: ``Ignore``
  (not counted). JobSet and TrainJob: the child Job fails with ``FailJob`` (reason PodFailurePolicy),
  and the JobSet rule ``RestartJobSetAndIgnoreMaxRestarts`` restarts the whole gang without counting.
- 76 (restart in place): the container restarts where it is (``restartPolicyRules``, KEP-5307) or the
  whole pod's containers do (``RestartAllContainers``, KEP-5532), where the release has them; without,
  it counts as an ordinary failure.
- 77 (health-evacuation budget spent): Job: ``FailJob``. JobSet/TrainJob from v0.10: ``FailJobSet``
  through a message pattern; before v0.10 JobSet cannot tell 77 from 75 by reason, so 77 counts as an
  ordinary failure there and the JobSet stops at ``maxRestarts``.
- anything else: counted once per gang incident. Job: ``backoffLimit``. JobSet: every child Job has
  ``backoffLimit: 0``, the first failed Job restarts the whole gang (default ``RestartJobSet``, counted
  once), and the others' failures belong to the attempt that is being torn down.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Final

from gpuguard.k8s._versions import FEATURES, JOBSET_FIELDS, at_least, jobset_has
from gpuguard.k8s.config import KubernetesConfig

if TYPE_CHECKING:
    from gpuguard.k8s.manifests import JobSpec

BUDGET_SPENT_EXIT_CODE: Final = 77
RENDEZVOUS_PORT: Final = 29400
JOBSET_API: Final = "jobset.x-k8s.io/v1alpha2"
TRAINER_API: Final = "trainer.kubeflow.org/v1alpha1"
# jobset api/jobset/v1alpha2/jobset_types.go: ExclusiveKey, JobIndexKey (annotations on child pods)
EXCLUSIVE_KEY: Final = "alpha.jobset.sigs.k8s.io/exclusive-topology"
JOB_INDEX_KEY: Final = "jobset.sigs.k8s.io/job-index"
JOBSET_NAME_KEY: Final = "jobset.sigs.k8s.io/jobset-name"
# kubeflow/trainer pkg/constants/constants.go: LabelTrainJobAncestor, AncestorTrainer, Node
ANCESTOR_KEY: Final = "trainer.kubeflow.org/trainjob-ancestor-step"
# pkg/controller/job/pod_failure_policy.go: the Job's failure message for a FailJob rule
FAIL_JOB_EXIT: Final = "failed with exit code {code} matching FailJob rule"
FAIL_JOB_CONDITION: Final = "has condition {type} matching FailJob rule"
GRACE_MARGIN_S: Final = 15.0  # beyond the preemption deadline: the Kubernetes actions' own 10 s and the exit


def container_name(spec: JobSpec) -> str:
    # Trainer's torch plugin finds the trainer container by its name, "node" (constants.Node)
    return "node" if spec.resolved_kind == "trainjob" else "trainer"


def settings_env(c: KubernetesConfig) -> list[dict[str, Any]]:
    """The actions the RBAC was generated for, so that the pods run exactly those."""
    values: dict[str, object] = {
        "CONDITION": c.condition,
        "EVENT": c.event,
        "POD_HEALTH": c.pod_health,
        "MARK": c.mark,
        "MARKER": c.marker,
        "DRA": c.dra,
        "LEAVE": c.leave,
    }
    if c.evacuation_budget:
        values["EVACUATION_BUDGET"] = c.evacuation_budget
    text = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in values.items()}
    return [{"name": f"GPUGUARD_KUBERNETES_{k}", "value": v} for k, v in text.items()]


def _command(spec: JobSpec) -> list[str]:
    if spec.resolved_kind == "trainjob":
        # Trainer injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT
        # (pkg/runtime/framework/plugins/torch/torch.go), which torchrun's arguments read as defaults.
        return ["gpuguard-run"]
    command = ["gpuguard-run", f"--nproc-per-node={spec.gpus}", f"--nnodes={spec.nodes}"]
    if spec.resolved_kind == "jobset":
        # child pods' hostnames are JOBSET-node-JOBINDEX-0 under the JobSet's headless Service
        return [
            *command,
            "--node-rank=$(NODE_RANK)",
            "--rdzv-backend=c10d",
            f"--rdzv-id={spec.name}",
            f"--rdzv-endpoint={spec.name}-node-0-0.{spec.name}:{RENDEZVOUS_PORT}",
        ]
    return [*command, "--standalone"]


def restart_rules(spec: JobSpec) -> list[dict[str, Any]]:
    """The container's restart rules for exit 76, per release (empty: 76 counts as a failure)."""
    if spec.restart_in_place == "off":
        return []
    action = "Restart" if spec.restart_in_place == "container" else "RestartAllContainers"
    return [{"action": action, "exitCodes": {"operator": "In", "values": [spec.restart_exit_code]}}]


LOCAL_TIER_VOLUME = "gpuguard-local"
_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_SUFFIXES |= {f"{k.upper()}i": 2 ** (10 * n) for n, k in enumerate(("k", "M", "G", "T", "P", "E"), start=1)}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity (``64Gi``, ``500M``, ``1.5Gi``) in bytes, rounded down."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", quantity)
    if match is None or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a quantity: {quantity!r}")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2)])


def local_tier_volume(spec: JobSpec) -> dict[str, Any]:
    """The local tier's emptyDir: in memory under /dev/shm (tmpfs, counted against the container's memory
    limit), on the node's disk elsewhere; bounded by ``local_size`` when given."""
    assert spec.local_dir is not None
    volume: dict[str, Any] = {}
    if spec.local_dir.startswith("/dev/shm/"):
        volume["medium"] = "Memory"
    if spec.local_size:
        volume["sizeLimit"] = spec.local_size
    return volume


def pod_template(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    field_env = [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_UID", "metadata.uid"),
        ("NODE_NAME", "spec.nodeName"),
    ]
    if spec.resolved_kind == "jobset":
        field_env.append(("NODE_RANK", f"metadata.annotations['{JOB_INDEX_KEY}']"))
    env: list[dict[str, Any]] = [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": p}}} for n, p in field_env]
    env += settings_env(spec.actions)
    if spec.checkpoint_dir:
        env.append({"name": "GPUGUARD_CHECKPOINT_DIR", "value": spec.checkpoint_dir})
    if spec.local_dir:
        env.append({"name": "GPUGUARD_LOCAL_DIR", "value": spec.local_dir})
        if spec.local_size:
            # The kubelet evicts a pod whose emptyDir outgrows its sizeLimit. Each of the pod's ranks keeps at
            # most half its share committed, leaving room for the save in flight beside them.
            share = quantity_bytes(spec.local_size) // spec.gpus // 2
            env.append({"name": "GPUGUARD_LOCAL_KEEP_BYTES", "value": str(max(1, share))})
    # SIGTERM -> agreed step -> committed checkpoint within the deadline; then the Kubernetes actions
    # (their own 10 s deadline) and the exit, before the kubelet's SIGKILL at the grace period's end.
    grace = math.ceil(spec.preemption_deadline_s + GRACE_MARGIN_S)
    env.append({"name": "GPUGUARD_PREEMPTION_DEADLINE_S", "value": f"{spec.preemption_deadline_s:g}"})
    env.append({"name": "GPUGUARD_TERMINATION_GRACE_S", "value": str(grace)})
    container: dict[str, Any] = {
        "name": container_name(spec),
        "image": spec.image,
        "command": [*_command(spec), *spec.script],
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
    if rules := restart_rules(spec):
        # Exit 76 (a fault that a fresh process clears) restarts in place: same node, no rescheduling.
        # JobSpec refuses it where the release would drop the fields.
        container["restartPolicy"] = "Never"
        container["restartPolicyRules"] = rules
    pod_spec: dict[str, Any] = {
        "serviceAccountName": spec.name,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
        "containers": [container],
    }
    if spec.local_dir:
        # The guard's local tier: an emptyDir lives as long as the pod, so a container restarted in place
        # (exit 76) finds its checkpoints again; a pod on another node resumes from object storage.
        container["volumeMounts"] = [{"name": LOCAL_TIER_VOLUME, "mountPath": spec.local_dir}]
        pod_spec["volumes"] = [{"name": LOCAL_TIER_VOLUME, "emptyDir": local_tier_volume(spec)}]
    affinity: dict[str, Any] = {}
    if spec.kubernetes.mark == "label":
        # A label keeps nothing off a node by itself: the pods ask for nodes without gpuguard's label
        # (NotIn also matches nodes without it). An escalated DEGRADED node is left too.
        key = spec.kubernetes.taint_key
        term = {"matchExpressions": [{"key": key, "operator": "NotIn", "values": ["failing", "degraded"]}]}
        affinity["nodeAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
    if spec.resolved_kind == "trainjob" and spec.nodes > 1:
        # Trainer runs the gang as one Job of numNodes pods; one pod per node, no other JobSet's pod beside it
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchExpressions": [{"key": JOBSET_NAME_KEY, "operator": "Exists"}]},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    if affinity:
        pod_spec["affinity"] = affinity
    return {"metadata": {"labels": labels}, "spec": pod_spec}


def _exit_rule(action: str, spec: JobSpec, operator: str, values: list[int]) -> dict[str, Any]:
    return {
        "action": action,
        "onExitCodes": {"containerName": container_name(spec), "operator": operator, "values": sorted(values)},
    }


def job(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    """One node: an indexed Job of one pod. 75 and disruptions are not counted; 77 stops it."""
    reschedule, spent = spec.reschedule_exit_code, BUDGET_SPENT_EXIT_CODE
    counted = {0, reschedule, spent} | ({spec.restart_exit_code} if restart_rules(spec) else set())
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": spec.max_restarts,
            # A pod that gpuguard evacuated is replaced once it has failed, never beside it.
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [
                    # gpuguard's evacuations do not count against backoffLimit (the node is marked first)...
                    _exit_rule("Ignore", spec, "In", [reschedule]),
                    # ...unless the health-evacuation budget is spent: then the Job stops...
                    _exit_rule("FailJob", spec, "In", [spent]),
                    # ...evictions and other disruptions do not count either...
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    # ...while any other failure does.
                    _exit_rule("Count", spec, "NotIn", sorted(counted)),
                ]
            },
            "template": pod_template(spec, labels),
        },
    }


def _child_job(spec: JobSpec, labels: dict[str, str], pods: int) -> dict[str, Any]:
    """A gang member Job: it fails on the first failure, and says why (the JobSet's rules read that)."""
    rules = [_exit_rule("FailJob", spec, "In", [spec.reschedule_exit_code])]
    if jobset_has(spec.jobset_version, "onJobFailureMessagePatterns"):
        rules.append(_exit_rule("FailJob", spec, "In", [BUDGET_SPENT_EXIT_CODE]))
    rules.append({"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]})
    return {
        "completionMode": "Indexed",
        "completions": pods,
        "parallelism": pods,
        # one failure fails the Job, and the JobSet restarts the gang once for the whole incident
        "backoffLimit": 0,
        "podFailurePolicy": {"rules": rules},
        "template": pod_template(spec, labels),
    }


def failure_policy(spec: JobSpec) -> dict[str, Any]:
    """The JobSet's failurePolicy, with only the fields ``jobset_version`` has."""
    v = spec.jobset_version
    patterns = jobset_has(v, "onJobFailureMessagePatterns")
    rules: list[dict[str, Any]] = []
    if patterns:
        rules.append(
            {
                "name": "gpuguardBudgetSpent",
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [FAIL_JOB_EXIT.format(code=BUDGET_SPENT_EXIT_CODE)],
            }
        )
    evacuation: dict[str, Any] = {
        "name": "gpuguardEvacuation",
        "action": "RestartJobSetAndIgnoreMaxRestarts",
        "onJobFailureReasons": ["PodFailurePolicy"],
    }
    if patterns:
        evacuation["onJobFailureMessagePatterns"] = [
            FAIL_JOB_EXIT.format(code=spec.reschedule_exit_code),
            FAIL_JOB_CONDITION.format(type="DisruptionTarget"),
        ]
    rules.append(evacuation)
    policy: dict[str, Any] = {"maxRestarts": spec.max_restarts}
    if jobset_has(v, "restartStrategy: BlockingRecreate"):
        # every pod of the old attempt is gone before the new one starts: no two gangs on one rendezvous
        policy["restartStrategy"] = "BlockingRecreate"
    policy["rules"] = rules
    return policy


def jobset(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    """A gang of one pod per node: one child Job per node, exclusive per node."""
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": labels,
            # one child Job per node, and no other JobSet's pods on it (pod webhook setExclusiveAffinities)
            "annotations": {EXCLUSIVE_KEY: "kubernetes.io/hostname"},
        },
        "spec": {
            "failurePolicy": failure_policy(spec),
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [
                {
                    "name": "node",
                    "replicas": spec.nodes,
                    "template": {"metadata": {"labels": labels}, "spec": _child_job(spec, labels, 1)},
                }
            ],
        },
    }


def training_runtime(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    """A (Cluster)TrainingRuntime: a JobSet template carrying the gang's failure semantics.

    A TrainJob cannot set them itself: its runtimePatches reach only the Jobs' pod templates, not the
    JobSet's failurePolicy nor a Job's podFailurePolicy (pkg/apis/trainer/v1alpha1/trainjob_types.go,
    JobSetSpecPatch, JobSpecPatch, v2.3.0).
    """
    meta: dict[str, Any] = {"name": spec.runtime_name, "labels": {**labels, "trainer.kubeflow.org/framework": "torch"}}
    if spec.runtime_kind == "TrainingRuntime":
        meta["namespace"] = spec.namespace
    child = _child_job(spec, labels, spec.nodes)
    return {
        "apiVersion": TRAINER_API,
        "kind": spec.runtime_kind,
        "metadata": meta,
        "spec": {
            # v2.3.0 has numProcPerNode on the TrainJob only (trainjob_types.go Trainer.NumProcPerNode)
            "mlPolicy": {"numNodes": spec.nodes, "torch": {}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "failurePolicy": failure_policy(spec),
                    "replicatedJobs": [
                        {
                            "name": "node",
                            "template": {"metadata": {"labels": {**labels, ANCESTOR_KEY: "trainer"}}, "spec": child},
                        }
                    ],
                },
            },
        },
    }


def train_job(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": spec.runtime_name, "apiGroup": "trainer.kubeflow.org", "kind": spec.runtime_kind},
            "trainer": {"numNodes": spec.nodes, "numProcPerNode": spec.gpus},
        },
    }


def notes(spec: JobSpec) -> list[str]:
    """What the output's exit codes do on this workload and release, with the sources."""
    kind, lines = spec.resolved_kind, []
    if kind in ("jobset", "trainjob"):
        v = spec.jobset_version
        lines.append(
            f"JobSet v{v}: exit 75 (or a disruption) fails the child Job (PodFailurePolicy) and the rule "
            "gpuguardEvacuation restarts the whole gang without counting against maxRestarts; any other "
            f"failure restarts it once, counted (maxRestarts {spec.max_restarts})."
        )
        for name, fact in JOBSET_FIELDS.items():
            if name == "restartStrategy: InPlaceRestart":
                continue
            state = "used" if jobset_has(v, name) else "not in this release"
            lines.append(f"JobSet {name}: {state} (kubernetes-sigs/jobset {fact.source}).")
        if not jobset_has(v, "onJobFailureMessagePatterns"):
            lines.append(
                f"Before v0.10 a rule cannot tell exit {BUDGET_SPENT_EXIT_CODE} (health-evacuation budget spent) "
                f"from 75: {BUDGET_SPENT_EXIT_CODE} counts as an ordinary failure, and the gang stops at maxRestarts."
            )
        if kind == "trainjob":
            lines.append(
                "Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1, v2.3.0): the runtime carries the failure "
                "policy; the TrainJob's runtimePatches cannot set it."
            )
    rules = restart_rules(spec)
    if rules:
        feature = FEATURES["restart-container" if spec.restart_in_place == "container" else "restart-pod"]
        said_on = "" if at_least(spec.kubernetes_version, feature.default_in) else " (said to be on)"
        lines.append(
            f"Exit {spec.restart_exit_code} restarts in place with restartPolicyRules action {rules[0]['action']}: "
            f"{feature.source}; needs {feature.how}{said_on}."
        )
    else:
        lines.append(
            f"Exit {spec.restart_exit_code} counts as an ordinary failure here (no --restart-in-place); "
            "gpuguard-run restarts its workers in place first, up to --max-restarts."
        )
    if spec.evacuation_budget is not None:
        lines.append(
            f"Health evacuations are budgeted ({spec.evacuation_budget}) in the ConfigMap {spec.budget_name}, "
            "outside the controller: recreating the JobSet or TrainJob does not reset it (kubeflow/trainer#3779). "
            f"When it is spent the pods exit {BUDGET_SPENT_EXIT_CODE} with a GPUEvacuationBudgetSpent Event."
        )
    return lines
