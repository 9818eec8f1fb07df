"""The gang as the unit, end to end: the generated manifests applied to the emulated cluster, whose
controllers (Job, JobSet, Kubeflow Trainer, scheduler) and kubelets run every pod as a real
``gpuguard-run`` process (gloo, CPU) with its node's fake NVML, and a node agent per node.

- an XID on one node -> every pod exits 75 -> the gang restarts on other nodes without counting;
- one ordinary crash -> the gang restarts once, counted once;
- a GPU bad at start -> the node is marked, the replacement goes elsewhere: no loop;
- the health-evacuation budget spent -> the gang stops, with a clear Event.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.kube_controllers import condition
from helpers.kube_emulator import KubeEmulator, write_kubeconfig
from helpers.kube_kubelet import Cluster, Processes

from gpuguard.errors import KubernetesError
from gpuguard.k8s import JobSpec, KubernetesConfig, connect, render
from gpuguard.k8s.node_check import NodeCheck

WORKER = Path(__file__).parent / "helpers" / "kube_gang_worker.py"
NS = "ml"
HEALTHY = {"gpus": 1, "events": []}
BAD_AT_START = {"gpus": 1, "events": [{"at": 0.0, "gpu": 0, "field": "ecc_dbe_volatile", "set": 1}]}


def xid_at(seconds: float) -> dict[str, Any]:
    return {"gpus": 1, "events": [{"at": seconds, "gpu": 0, "xid": 48}]}


@dataclass
class Gang:
    """A running emulated cluster: its API server, the job's folder, and what happened."""

    kube: KubeEmulator
    folder: Path
    cluster: Cluster
    runner: Processes
    spec: JobSpec
    agents: list[NodeCheck] = field(default_factory=list)

    def workload(self) -> dict[str, Any]:
        kind = {"job": "Job", "jobset": "JobSet", "trainjob": "JobSet"}[self.spec.resolved_kind]
        return self.kube.objects[(kind, NS, self.spec.name)]

    def wait_finished(self, timeout: float = 240) -> dict[str, Any]:
        def done() -> Any:
            obj = self.kube.objects.get(("Job" if self.spec.resolved_kind == "job" else "JobSet", NS, self.spec.name))
            return obj if obj and any(condition(obj, t) for t in ("Complete", "Completed", "Failed")) else None

        try:
            found: dict[str, Any] = self.cluster.wait(done, timeout, f"{self.spec.name} to finish")
        except AssertionError:
            raise AssertionError(self.logs()) from None
        return found

    def ranks(self) -> list[dict[str, Any]]:
        path = self.folder / "job" / "ranks.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{path.read_text()[-2500:]}" for name, path in self.runner.logs.items())

    def taints(self, node: str) -> list[tuple[str, str, str]]:
        return [(t["key"], t.get("value", ""), t["effect"]) for t in self.kube.nodes[node]["spec"]["taints"]]

    def pods_by_node(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name in self.runner.logs:
            node = self.runner.nodes_of.get(name, "?")
            found.setdefault(node, []).append(name)
        return found


class _Runner(Processes):
    nodes_of: dict[str, str]

    def __call__(self, pod: dict[str, Any], container_env: dict[str, str]) -> Any:
        self.nodes_of[pod["metadata"]["name"]] = pod["spec"]["nodeName"]
        return super().__call__(pod, container_env)


@contextlib.contextmanager
def gang(
    tmp_path: Path, spec: JobSpec, scenarios: dict[str, dict[str, Any]], *, release: str = "1.36"
) -> Iterator[Gang]:
    """``spec`` applied to a cluster of the nodes in ``scenarios`` (node -> its GPUs' fake NVML scenario)."""
    kube = KubeEmulator(release=release)
    url = kube.start()
    kube.authorize([])
    for node, scenario in scenarios.items():
        kube.add_node(node)
        (tmp_path / f"{node}.json").write_text(json.dumps(scenario))
    for doc in render(spec):
        code, answer = kube.create(doc)
        assert code == 201, answer
    (tmp_path / "job").mkdir()
    tokens: dict[tuple[str, str], Path] = {}

    def kubeconfig(pod: dict[str, Any]) -> Path:
        key = (pod["spec"]["serviceAccountName"], pod["spec"]["nodeName"])
        if key not in tokens:  # a pod's bound token names its node (KEP-4193)
            token = kube.token_for(f"system:serviceaccount:{NS}:{key[0]}", node=key[1])
            tokens[key] = write_kubeconfig(tmp_path / f"kc-{key[0]}-{key[1]}", url, token)
        return tokens[key]

    # generous timeouts for the pods' API calls: the emulator shares this machine's two cores with them
    slack = {"GPUGUARD_KUBERNETES_REQUEST_TIMEOUT_S": "20", "GPUGUARD_KUBERNETES_DEADLINE_S": "60"}
    runner = _Runner(
        folder=tmp_path, kubeconfig=kubeconfig, nvml=lambda node: str(tmp_path / f"{node}.json"), extra_env=slack
    )
    runner.nodes_of = {}
    agents = []
    for node in scenarios:
        token = kube.token_for(f"system:serviceaccount:{NS}:{spec.name}-node-check", node=node)
        path = write_kubeconfig(tmp_path / f"kc-agent-{node}", url, token)
        config = KubernetesConfig(kubeconfig=str(path), dra=False, request_timeout_s=20.0)
        cluster = connect(config, env={"NODE_NAME": node}, need_pod=False)
        assert cluster is not None
        agents.append(NodeCheck(cluster, dict, quiet_period_s=1e9))  # the agent's way in; no give-back here
    stop = threading.Event()

    def run_agents() -> None:
        while not stop.is_set():
            for agent in agents:
                with contextlib.suppress(KubernetesError):
                    agent.once()
            stop.wait(0.3)

    thread = threading.Thread(target=run_agents, name="node-agents", daemon=True)
    thread.start()
    try:
        with Cluster(kube, runner) as cluster:
            yield Gang(kube, tmp_path, cluster, runner, spec, agents)
    finally:
        stop.set()
        thread.join(10)
        kube.stop()


def spec_for(kind: str, nodes: int, *, budget: int | None = 10, steps: int = 40, **extra: Any) -> JobSpec:
    return JobSpec(
        name="llm",
        image="trainer:1",
        gpus=1,
        nodes=nodes,
        kind=kind,
        namespace=NS,
        kubernetes=KubernetesConfig(marker="agent", dra=False, pod_health=False),
        kubernetes_version="1.36",
        jobset_version="0.12",
        evacuation_budget=budget,
        script=[str(WORKER), "--dir", "job", "--steps", str(steps), *extra.pop("worker_args", [])],
        **extra,
    )


def budget_incidents(g: Gang) -> list[dict[str, Any]]:
    data = g.kube.objects[("ConfigMap", NS, g.spec.budget_name)]["data"]
    return list(json.loads(data.get("incidents", "[]")))


# -- main suite: one process, the fast representative --------------------------------------------------


@pytest.mark.slow  # two gpuguard-run processes and a training worker: 15-90 s on 2 cores
@pytest.mark.timeout(900)
def test_a_gpu_bad_at_start_marks_the_node_and_the_replacement_goes_elsewhere(tmp_path: Path) -> None:
    """One node's GPU fails before the first step: gpuguard-run's preflight reports it, the node agent
    marks the node, the pod exits 75 (not counted), and the Job's replacement lands on a healthy node."""
    with gang(tmp_path, spec_for("job", 1, steps=10), {"node-0": BAD_AT_START, "node-1": HEALTHY}) as g:
        job = g.wait_finished()
        assert condition(job, "Complete"), g.logs()
        assert g.taints("node-0") == [("gpuguard.io/unhealthy-gpu", "gpuguard", "NoSchedule")]
        assert g.taints("node-1") == []
        assert sorted(g.pods_by_node()) == ["node-0", "node-1"]  # once each: no loop on node-0
        assert job["status"].get("failed", 0) == 0 and job["status"]["ignored"] == 1  # 75: not counted
        (incident,) = budget_incidents(g)
        assert incident["node"] == "node-0" and incident["incident"].startswith("pod-")
        marked = [e for e in g.kube.events if e["reason"] == "GPUNodeMarked"]
        assert len(marked) == 1 and marked[0]["regarding"]["name"].startswith("llm-0-")
        assert {r["exit_code"] for r in g.ranks()} == {0}  # the replacement trained to the end


def test_a_spent_budget_stops_the_gang_with_a_clear_event(tmp_path: Path) -> None:
    """With no health evacuation left, the pod exits 77 once the node is marked: the JobSet's
    gpuguardBudgetSpent rule (v0.10+) fails it at once, and one Event says why."""
    with gang(tmp_path, spec_for("jobset", 1, budget=0), {"node-0": BAD_AT_START, "node-1": HEALTHY}) as g:
        jobset = g.wait_finished()
        failed = condition(jobset, "Failed")
        assert failed is not None and failed["reason"] == "FailJobSetFailurePolicyAction", g.logs()
        assert g.kube.controller_events == [("llm", "FailJobSet", "gpuguardBudgetSpent")]
        assert jobset["status"]["restarts"] == 0
        (spent,) = [e for e in g.kube.events if e["reason"] == "GPUEvacuationBudgetSpent"]
        assert "health-evacuation budget spent: incident 1 of 0 allowed" in spent["note"]
        assert "ConfigMap llm-gpuguard-budget" in spent["note"]
        assert g.taints("node-0") == [("gpuguard.io/unhealthy-gpu", "gpuguard", "NoSchedule")]
        assert list(g.pods_by_node()) == ["node-0"]  # never started again


# -- slow: four-node gangs ----------------------------------------------------------------------------


@pytest.mark.slow  # four pods, four ranks, two attempts: 1-5 minutes on 2 cores
@pytest.mark.timeout(900)
def test_an_xid_on_one_node_restarts_the_whole_gang_elsewhere_without_counting(tmp_path: Path) -> None:
    nodes = {"node-0": HEALTHY, "node-1": HEALTHY, "node-2": xid_at(4.0), "node-3": HEALTHY, "node-4": HEALTHY}
    with gang(tmp_path, spec_for("jobset", 4, steps=200), nodes) as g:
        jobset = g.wait_finished(780)
        assert condition(jobset, "Completed"), g.logs()
        assert jobset["status"]["restarts"] == 1 and jobset["status"]["restartsCountTowardsMax"] == 0
        assert g.kube.controller_events == [("llm", "RestartJobSetAndIgnoreMaxRestarts", "gpuguardEvacuation")]
        assert g.taints("node-2") == [("gpuguard.io/unhealthy-gpu", "gpuguard", "NoSchedule")]
        by_node = g.pods_by_node()
        assert len(by_node["node-2"]) == 1 and len(by_node["node-4"]) == 1  # the second attempt avoided node-2
        ranks = g.ranks()
        evacuated = [r for r in ranks if r["exit_code"] == 75]
        assert len(evacuated) == 4 and len({r["evacuated_at"] for r in evacuated}) == 1  # every pod left at one step
        finished = [r for r in ranks if r["exit_code"] == 0]
        assert len(finished) == 4 and {r["resumed_at"] for r in finished} == {evacuated[0]["evacuated_at"] + 1}
        assert len(budget_incidents(g)) == 1, g.logs()  # four pods, one incident


@pytest.mark.slow  # four pods, four ranks, two attempts
@pytest.mark.timeout(900)
def test_one_ordinary_crash_is_counted_once_for_the_whole_gang(tmp_path: Path) -> None:
    nodes = {f"node-{i}": HEALTHY for i in range(4)}
    spec = spec_for("jobset", 4, steps=60, worker_args=["--crash-rank", "1", "--crash-step", "12"])
    with gang(tmp_path, spec, nodes) as g:
        jobset = g.wait_finished(780)
        assert condition(jobset, "Completed"), g.logs()
        # every pod of the first attempt failed (the peers' collectives broke), and it counted once
        assert jobset["status"]["restarts"] == 1 and jobset["status"]["restartsCountTowardsMax"] == 1
        assert g.kube.controller_events == [("llm", "RestartJobSet", "")]
        assert budget_incidents(g) == []  # not a health evacuation
        assert all(not g.taints(node) for node in nodes)


@pytest.mark.slow  # a TrainJob: Kubeflow Trainer's JobSet, PET_* rendezvous, two attempts
@pytest.mark.timeout(900)
def test_a_trainjob_moves_off_a_bad_node_without_counting(tmp_path: Path) -> None:
    nodes = {"node-0": BAD_AT_START, "node-1": HEALTHY, "node-2": HEALTHY}
    with gang(tmp_path, spec_for("trainjob", 2, steps=20), nodes) as g:
        jobset = g.wait_finished(780)
        assert condition(jobset, "Completed"), g.logs()
        assert jobset["status"]["restarts"] == 1 and jobset["status"]["restartsCountTowardsMax"] == 0
        assert g.taints("node-0") == [("gpuguard.io/unhealthy-gpu", "gpuguard", "NoSchedule")]
        assert {r["exit_code"] for r in g.ranks()} == {0} and len(g.ranks()) == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
