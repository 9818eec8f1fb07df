"""How a pod leaves, as one member of a gang: no restart loop on a bad node, and a budget for health
evacuations that no controller can reset.

``gpuguard-run`` (one per pod) calls `settle` with the exit code it is about to return:

1. a GPU found bad before the first step (the preflight) is reported and the node marked — by the pod
   or by the node agent, per ``marker`` — before the pod exits 75, so the replacement cannot land on
   the same node with the same free GPUs. When the mark cannot be confirmed, the pod exits 1 instead:
   a failure the controller counts (``backoffLimit``, ``maxRestarts``), so a loop is bounded.
2. every exit 75 (preflight or a guard's evacuation) counts one incident against the health-evacuation
   budget, a ConfigMap outside the controller: a JobSet that a TrainJob recreates starts again at
   ``restarts: 0`` (kubeflow/trainer#3779), the ConfigMap does not. The gang's pods all exit in the same
   incident and count it once: the incident is the JobSet's UID and restart attempt (the pod's labels),
   or for a one-pod Job the pod's UID. When the budget is spent the pods exit 77, which the generated
   manifests turn into a stopped Job/JobSet, and an Event says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from gpuguard.errors import GpuGuardError, KubernetesError
from gpuguard.health.model import DeviceHealth
from gpuguard.k8s._workloads import BUDGET_SPENT_EXIT_CODE
from gpuguard.k8s.actions import NOTE_LIMIT_BYTES, KubernetesActions, micro_time, truncate_bytes
from gpuguard.k8s.cluster import Cluster, connect
from gpuguard.k8s.config import KubernetesConfig

log = logging.getLogger("gpuguard.k8s")

UNMARKED_EXIT_CODE: Final = 1  # counted by every controller: a loop on an unmarked node is bounded
BUDGET_SPENT_REASON: Final = "GPUEvacuationBudgetSpent"
JOBSET_UID: Final = "jobset.sigs.k8s.io/jobset-uid"
RESTART_ATTEMPT: Final = "jobset.sigs.k8s.io/restart-attempt"
_TRIES: Final = 8


@dataclass(frozen=True)
class Verdict:
    """One incident's place in the budget: the same for every pod of the gang."""

    incident: str
    number: int  # 1 for the first incident ever counted
    limit: int

    @property
    def spent(self) -> bool:
        return self.number > self.limit


def incident_of(pod: Mapping[str, Any]) -> str:
    """The incident every pod of one gang attempt shares."""
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    if JOBSET_UID in labels and RESTART_ATTEMPT in labels:
        return f"jobset-{labels[JOBSET_UID]}-attempt-{labels[RESTART_ATTEMPT]}"
    return f"pod-{meta.get('uid', '')}"


def charge(cluster: Cluster, budget: str, incident: str, *, node: str, reason: str, deadline: float) -> Verdict:
    """Count ``incident`` in the ConfigMap ``budget`` (once, whoever comes first) and say where it stands.

    Raises:
        KubernetesError: the ConfigMap cannot be read or written (404: it was not applied).
    """
    from kubernetes import client

    core = client.CoreV1Api(cluster.api)
    for _ in range(_TRIES):
        cm = cluster.call_json(
            "get", "configmaps", core.read_namespaced_config_map, budget, cluster.namespace, deadline=deadline
        )
        data = dict(cm.get("data") or {})
        try:
            limit = int(data.get("limit", "0"))
            incidents = json.loads(data.get("incidents", "[]"))
        except ValueError:
            raise KubernetesError(
                f"ConfigMap {budget}: limit or incidents is not gpuguard's (limit {data.get('limit')!r})",
                status=422,
                verb="get",
                resource="configmaps",
            ) from None
        keys = [str(i.get("incident")) for i in incidents if isinstance(i, dict)]
        if incident in keys:
            return Verdict(incident, keys.index(incident) + 1, limit)
        incidents.append(
            {"incident": incident, "at": micro_time(), "node": node, "pod": cluster.pod, "reason": reason[:200]}
        )
        data["incidents"] = json.dumps(incidents, separators=(",", ":"))
        body = {**cm, "data": data}  # a replace with the resourceVersion read: a conflict is a 409
        try:
            cluster.call(
                "update",
                "configmaps",
                core.replace_namespaced_config_map,
                budget,
                cluster.namespace,
                body,
                deadline=deadline,
            )
            return Verdict(incident, len(incidents), limit)
        except KubernetesError as exc:
            if exc.status != 409:  # another pod of the gang counted first: read again
                raise
    raise KubernetesError(
        f"update configmaps {budget}: still conflicting", status=409, verb="update", resource="configmaps"
    )


def say_spent(cluster: Cluster, verdict: Verdict, pod: Mapping[str, Any], budget: str, deadline: float) -> None:
    """The Event that says why the gang stops, once: by the pod whose incident spent the budget."""

    note = (
        f"health-evacuation budget spent: incident {verdict.number} of {verdict.limit} allowed "
        f"({verdict.incident}); the pods exit {BUDGET_SPENT_EXIT_CODE} and the job stops instead of moving again. "
        f"The incidents are in ConfigMap {budget}; repair the nodes, then raise its limit or delete its incidents."
    )
    body = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"generateName": f"{cluster.pod[:40]}.gpuguard-budget-", "namespace": cluster.namespace},
        "eventTime": micro_time(),
        "type": "Warning",
        "reason": BUDGET_SPENT_REASON,
        "action": "Stop",
        "note": truncate_bytes(note, NOTE_LIMIT_BYTES),
        "regarding": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": cluster.pod,
            "namespace": cluster.namespace,
            "uid": str(pod.get("metadata", {}).get("uid", "")),
        },
        "reportingController": "gpuguard.io/guard",
        "reportingInstance": cluster.pod[:128],
    }
    cluster.create_event(cluster.namespace, body, deadline)


def _say(message: str) -> None:
    print(f"gpuguard-run: {message}", file=sys.stderr, flush=True)


PREFLIGHT_DEADLINE_S: Final = 30.0


def mark_bad_gpus(cluster: Cluster, bad: Sequence[DeviceHealth]) -> bool:
    """Report each bad GPU and mark the node (or have the node agent mark it); True when marked.

    Before the first step nothing is waiting to be saved and no grace period runs, so the node agent
    (which looks every few seconds) gets at least ``PREFLIGHT_DEADLINE_S`` to answer.
    """
    patient = dataclasses.replace(cluster.config, deadline_s=max(cluster.config.deadline_s, PREFLIGHT_DEADLINE_S))
    actions = KubernetesActions(dataclasses.replace(cluster, config=patient))
    marked = True
    for device in bad:
        reasons = [r.to_dict() for r in device.reasons]
        first = device.reasons[0].message if device.reasons else device.state.value
        outcomes = actions.evacuate(
            device=device.uuid or device.pci_bus_id,
            state=device.state.value,
            message=f"GPU {device.index} is {device.state.value} before the first step: {first}",
            evidence={"reasons": reasons, "exit_code": 75, "rung": "preflight"},
            action="reschedule",
            exit_code=75,
            leave=False,
        )
        # the node's taint or label, or the device's DeviceTaintRule: either keeps the replacement off it
        done = {o.action for o in outcomes if o.outcome == "done"}
        marked = marked and bool(done & {"node-taint", "node-label", "device-taint-rule"})
    return marked


def settle(
    code: int,
    *,
    bad: Sequence[DeviceHealth] = (),
    config: KubernetesConfig | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """The exit code to leave with, once the node is marked and the incident counted; never raises.

    Args:
        code: what the workers (or the preflight) asked for.
        bad: the GPUs the preflight found FAILING or LOST (empty after training ran).
        config: the Kubernetes settings (default: the environment's and the config file's).
    """
    if code != 75:
        return code
    try:
        config = config or _settings(env)
        cluster = connect(config, env)
    except GpuGuardError as exc:
        _say(f"Kubernetes is not reachable ({exc})")
        return UNMARKED_EXIT_CODE if bad else code
    if cluster is None:
        return code  # not in a cluster: nothing to mark, nothing restarts it
    if bad and not mark_bad_gpus(cluster, bad):
        _say(
            "the bad GPU's node could not be marked: leaving with exit 1, which the job's controller counts, "
            "so a replacement on the same node cannot loop for ever"
        )
        return UNMARKED_EXIT_CODE
    budget = config.evacuation_budget
    if not budget:
        return code
    deadline = time.monotonic() + config.deadline_s
    try:
        pod = cluster.get_pod_json(deadline)
        verdict = charge(
            cluster,
            budget,
            incident_of(pod),
            node=cluster.node,
            reason=", ".join(d.uuid for d in bad) or "evacuation",
            deadline=deadline,
        )
    except KubernetesError as exc:
        _say(f"the health-evacuation budget could not be counted ({exc}); leaving with {code}")
        return code
    if not verdict.spent:
        _say(f"health evacuation {verdict.number} of {verdict.limit} ({verdict.incident})")
        return code
    _say(
        f"health-evacuation budget spent ({verdict.number} > {verdict.limit}, ConfigMap {budget}): "
        f"exit {BUDGET_SPENT_EXIT_CODE}, the job stops"
    )
    if verdict.number == verdict.limit + 1 and _first_to_count(cluster, budget, verdict, deadline):
        try:
            say_spent(cluster, verdict, pod, budget, deadline)
        except KubernetesError as exc:
            _say(f"the {BUDGET_SPENT_REASON} Event could not be created: {exc}")
    return BUDGET_SPENT_EXIT_CODE


def _first_to_count(cluster: Cluster, budget: str, verdict: Verdict, deadline: float) -> bool:
    """Whether this pod recorded the incident (so exactly one pod of the gang says it with an Event)."""
    from kubernetes import client

    try:
        cm = cluster.call_json(
            "get", "configmaps", client.CoreV1Api(cluster.api).read_namespaced_config_map, budget, cluster.namespace,
            deadline=deadline,
        )  # fmt: skip
        incidents = json.loads((cm.get("data") or {}).get("incidents", "[]"))
        entry = next(i for i in incidents if i.get("incident") == verdict.incident)
        return bool(entry.get("pod") == cluster.pod)
    except (KubernetesError, ValueError, StopIteration):
        return False


def _settings(env: Mapping[str, str] | None) -> KubernetesConfig:
    from gpuguard.guard.config import GuardConfig

    # the checkpoint folder does not matter here; the Kubernetes section is what the pods were given
    return GuardConfig.load(env=os.environ if env is None else env, checkpoint_dir="memory://gpuguard-run").kubernetes
