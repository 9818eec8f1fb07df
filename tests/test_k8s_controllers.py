"""What gpuguard's exit codes do under each controller, on the emulated cluster with scripted
containers (fast): the generated Job, JobSet and TrainJob, the Job/JobSet/Trainer controllers played
from their source (tests/helpers/kube_controllers.py), one pod per node."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from helpers.kube_controllers import condition
from helpers.kube_emulator import KubeEmulator
from helpers.kube_kubelet import Cluster, Scripted

from gpuguard.k8s import JobSpec, render

NS = "ml"
Script = Callable[[str, str], int | None]  # (attempt, node) -> exit code, or None: runs until stopped


def run(spec: JobSpec, script: Script, *, nodes: int = 5, release: str = "1.36", until: str = "") -> KubeEmulator:
    kube = KubeEmulator(release=release)
    for index in range(nodes):
        kube.add_node(f"node-{index}")
    for doc in render(spec):
        code, answer = kube.create(doc)
        assert code == 201, answer
    started: list[tuple[str, str]] = []

    def runner(pod: dict[str, Any], env: dict[str, str]) -> Scripted:
        labels = pod["metadata"]["labels"]
        attempt = labels.get("jobset.sigs.k8s.io/restart-attempt", str(len(started)))
        started.append((attempt, pod["spec"]["nodeName"]))
        return Scripted(script(attempt, pod["spec"]["nodeName"]))

    kind = "Job" if spec.resolved_kind == "job" else "JobSet"
    with Cluster(kube, runner, interval=0.01) as cluster:

        def done() -> bool:
            obj = kube.objects.get((kind, NS, spec.name))
            return bool(obj and any(condition(obj, t) for t in ("Complete", "Completed", "Failed")))

        cluster.wait(done, 60, f"the {kind} to finish")
    kube.started = started  # type: ignore[attr-defined]
    return kube


def gang(kind: str = "jobset", nodes: int = 4, **extra: Any) -> JobSpec:
    return JobSpec(
        name="llm",
        image="t:1",
        gpus=8,
        nodes=nodes,
        kind=kind,
        namespace=NS,
        jobset_version=extra.pop("jobset", "0.12"),
        **extra,
    )


def jobset(kube: KubeEmulator) -> dict[str, Any]:
    return kube.objects[("JobSet", NS, "llm")]


def test_75_on_one_node_restarts_the_whole_gang_without_counting() -> None:
    kube = run(
        gang(), lambda attempt, node: 75 if (attempt, node) == ("0", "node-2") else (None if attempt == "0" else 0)
    )
    js = jobset(kube)
    assert condition(js, "Completed") and js["status"]["restarts"] == 1 and js["status"]["restartsCountTowardsMax"] == 0
    assert kube.controller_events == [("llm", "RestartJobSetAndIgnoreMaxRestarts", "gpuguardEvacuation")]
    assert sorted(n for a, n in kube.started if a == "0") == ["node-0", "node-1", "node-2", "node-3"]
    assert len([a for a, _ in kube.started if a == "1"]) == 4  # every pod of the gang restarted


def test_an_ordinary_failure_of_every_pod_counts_once() -> None:
    """One rank crashes, its peers' collectives fail: four failed pods, one counted restart."""
    kube = run(gang(), lambda attempt, node: 1 if attempt == "0" else 0)
    js = jobset(kube)
    assert condition(js, "Completed") and (js["status"]["restarts"], js["status"]["restartsCountTowardsMax"]) == (1, 1)
    assert kube.controller_events == [("llm", "RestartJobSet", "")]


def test_max_restarts_stops_a_gang_that_keeps_crashing_but_not_one_that_keeps_moving() -> None:
    crashing = run(gang(max_restarts=2), lambda attempt, node: 1)
    failed = condition(jobset(crashing), "Failed")
    assert failed is not None and failed["reason"] == "ReachedMaxRestarts"
    assert [e[1] for e in crashing.controller_events] == ["RestartJobSet", "RestartJobSet", "RestartJobSet"]
    moving = run(gang(max_restarts=0), lambda attempt, node: 75 if int(attempt) < 3 else 0)
    assert condition(jobset(moving), "Completed") and jobset(moving)["status"]["restarts"] == 3


@pytest.mark.parametrize(
    ("version", "reason"), [("0.12", "FailJobSetFailurePolicyAction"), ("0.9", "ReachedMaxRestarts")]
)
def test_77_stops_the_gang_at_once_from_jobset_0_10_and_counts_before(version: str, reason: str) -> None:
    kube = run(gang(jobset=version, max_restarts=1), lambda attempt, node: 77)
    failed = condition(jobset(kube), "Failed")
    assert failed is not None and failed["reason"] == reason
    assert len({a for a, _ in kube.started}) == (1 if version == "0.12" else 2)


def test_a_disrupted_pod_restarts_the_gang_without_counting() -> None:
    kube = KubeEmulator(release="1.36")
    for index in range(4):
        kube.add_node(f"node-{index}")
    for doc in render(gang(nodes=2)):
        kube.create(doc)
    with kube._lock:
        for _ in range(3):
            kube.reconcile()
        pod = next(p for p in kube.pods.values() if p["spec"].get("nodeName") == "node-1")
        # the node went away: the pod is failed with DisruptionTarget (pkg/controller/podgc, taint manager)
        pod["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC"})
        pod["status"]["phase"] = "Failed"
        for _ in range(3):
            kube.reconcile()
    assert jobset(kube)["status"]["restarts"] == 1 and jobset(kube)["status"]["restartsCountTowardsMax"] == 0


def test_a_one_node_job_ignores_75_counts_failures_and_stops_on_77() -> None:
    one = JobSpec(name="llm", image="t:1", gpus=8, namespace=NS, max_restarts=1)
    moved = run(one, lambda attempt, node: 75 if attempt in ("0", "1") else 0)
    job = moved.objects[("Job", NS, "llm")]
    assert condition(job, "Complete") and job["status"].get("failed", 0) == 0 and job["status"]["ignored"] == 2
    counted = run(one, lambda attempt, node: 1)
    failed = condition(counted.objects[("Job", NS, "llm")], "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded" and len(counted.started) == 2
    stopped = run(one, lambda attempt, node: 77)
    failed = condition(stopped.objects[("Job", NS, "llm")], "Failed")
    assert failed is not None and failed["reason"] == "PodFailurePolicy" and "exit code 77" in failed["message"]
    assert len(stopped.started) == 1


def test_a_trainjob_becomes_a_jobset_that_restarts_the_gang_without_counting() -> None:
    kube = run(
        gang("trainjob", 3),
        lambda attempt, node: 75 if (attempt, node) == ("0", "node-1") else (None if attempt == "0" else 0),
    )
    js = jobset(kube)
    assert js["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"
    assert condition(js, "Completed") and js["status"]["restarts"] == 1 and js["status"]["restartsCountTowardsMax"] == 0
    (rjob,) = js["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 1 and rjob["template"]["spec"]["parallelism"] == 3  # one Job of numNodes pods
    (container,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_MASTER_ADDR"]) == ("3", "8", "llm-node-0-0.llm")
    assert env["PET_NODE_RANK"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert len({n for a, n in kube.started if a == "0"}) == 3  # one pod per node (anti-affinity, GPUs)


@pytest.mark.parametrize(("release", "restarted"), [("1.35", True), ("1.34", False)])
def test_76_restarts_the_container_in_place_where_the_release_has_restart_rules(release: str, restarted: bool) -> None:
    spec = JobSpec(
        name="llm", image="t:1", gpus=8, namespace=NS, restart_in_place="container", max_restarts=0,
        kubernetes_version=release, feature_gates=frozenset({"ContainerRestartRules"}),
    )  # fmt: skip
    codes = iter([76, 0])
    kube = run(spec, lambda attempt, node: next(codes), release=release)
    job = kube.objects[("Job", NS, "llm")]
    # 1.34's API server dropped the rules (the gate is off by default): 76 failed the pod, counted
    assert bool(condition(job, "Complete")) == restarted
    assert len(kube.started) == (2 if restarted else 1)
