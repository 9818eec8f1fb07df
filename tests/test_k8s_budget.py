"""The health-evacuation budget and the preflight's way out (gpuguard.k8s.gang), against the emulated API
server under the generated RBAC: counted once per gang incident, kept across a recreated JobSet, spent
with one Event, and a bad GPU that cannot be marked leaves with a code the controller counts."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.kube_emulator import KubeEmulator, write_kubeconfig

from gpuguard.health.model import DeviceHealth, HealthState, Reason, Remedy
from gpuguard.k8s import JobSpec, KubernetesConfig, render
from gpuguard.k8s.gang import BUDGET_SPENT_EXIT_CODE, UNMARKED_EXIT_CODE, settle

NS = "ml"
SA = f"system:serviceaccount:{NS}:llm"
BAD = DeviceHealth(
    0, "GPU-0bad", "00000000:00:05.0", "H200", HealthState.FAILING,
    (Reason("ECC_DBE_VOLATILE", HealthState.FAILING, "1 volatile double-bit ECC error", Remedy.RESET_GPU),),
)  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[KubeEmulator]:
    emulator = KubeEmulator(release="1.36")
    emulator.url = emulator.start()  # type: ignore[attr-defined]
    yield emulator
    emulator.stop()


@pytest.fixture
def kube(server: KubeEmulator, tmp_path: Path) -> KubeEmulator:
    server.reset()
    spec = JobSpec(name="llm", image="t:1", gpus=1, nodes=2, kind="jobset", namespace=NS, evacuation_budget=2,
                   kubernetes=KubernetesConfig(marker="agent", dra=False), kubernetes_version="1.36")  # fmt: skip
    objects = render(spec)
    server.authorize(objects)
    for doc in objects:
        if doc["kind"] == "ConfigMap":
            assert server.create(doc)[0] == 201
    server.tmp = tmp_path  # type: ignore[attr-defined]
    server.spec = spec  # type: ignore[attr-defined]
    return server


def pod(kube: KubeEmulator, name: str, node: str, jobset_uid: str = "uid-js-1", attempt: str = "0") -> dict[str, str]:
    """A gang member's pod and its environment, as the generated JobSet gives it."""
    created = kube.add_pod(NS, name, node)
    created["metadata"]["labels"] = {
        "jobset.sigs.k8s.io/jobset-uid": jobset_uid,
        "jobset.sigs.k8s.io/restart-attempt": attempt,
    }
    kube.add_node(node)
    token = kube.token_for(SA, node=node)
    path = write_kubeconfig(kube.tmp / f"kc-{name}", kube.url, token)  # type: ignore[attr-defined]
    env = {"POD_NAME": name, "POD_NAMESPACE": NS, "NODE_NAME": node, "POD_UID": f"uid-{name}", "KUBECONFIG": str(path)}
    env |= {
        e["name"]: e["value"]
        for e in _container(kube)["env"]
        if "value" in e and e["name"].startswith("GPUGUARD_KUBERNETES")
    }
    return env


def _container(kube: KubeEmulator) -> dict[str, Any]:
    (jobset,) = [d for d in render(kube.spec) if d["kind"] == "JobSet"]  # type: ignore[attr-defined]
    (container,) = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    return container


def config(env: dict[str, str], **overrides: Any) -> KubernetesConfig:
    settings: dict[str, Any] = {
        "marker": "agent",
        "dra": False,
        "pod_health": False,
        "evacuation_budget": "llm-gpuguard-budget",
    }
    return KubernetesConfig(kubeconfig=env["KUBECONFIG"], **{**settings, **overrides})


def incidents(kube: KubeEmulator) -> list[dict[str, Any]]:
    return list(json.loads(kube.objects[("ConfigMap", NS, "llm-gpuguard-budget")]["data"].get("incidents", "[]")))


def quietly(code: int, **kwargs: Any) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = settle(code, **kwargs)
    return result, err.getvalue()


def test_every_pod_of_a_gang_counts_its_incident_once_and_gets_the_same_verdict(kube: KubeEmulator) -> None:
    envs = [pod(kube, f"llm-node-{i}-0-x", f"node-{i}") for i in range(2)]
    for env in envs:  # both pods left in the same incident (restart attempt 0)
        code, said = quietly(75, config=config(env), env=env)
        assert code == 75 and "health evacuation 1 of 2 (jobset-uid-js-1-attempt-0)" in said
    assert [i["incident"] for i in incidents(kube)] == ["jobset-uid-js-1-attempt-0"]
    assert kube.rbac is not None and kube.used(SA) <= kube.rbac.granted(SA, NS)


def test_a_recreated_jobset_does_not_reset_the_budget(kube: KubeEmulator) -> None:
    """Kubeflow Trainer recreates a JobSet (new UID, restarts back to 0, kubeflow/trainer#3779): the
    ConfigMap, owned by nobody, keeps counting; the third incident spends a budget of 2."""
    verdicts = []
    for index, (uid, attempt) in enumerate([("uid-js-1", "0"), ("uid-js-2", "0"), ("uid-js-3", "0")]):
        env = pod(kube, f"p{index}", "node-0", jobset_uid=uid, attempt=attempt)
        verdicts.append(quietly(75, config=config(env), env=env))
    assert [code for code, _ in verdicts] == [75, 75, BUDGET_SPENT_EXIT_CODE]
    assert "health-evacuation budget spent (3 > 2, ConfigMap llm-gpuguard-budget): exit 77" in verdicts[2][1]
    assert len(incidents(kube)) == 3
    (event,) = [e for e in kube.events if e["reason"] == "GPUEvacuationBudgetSpent"]
    assert event["regarding"]["name"] == "p2" and "incident 3 of 2 allowed (jobset-uid-js-3-attempt-0)" in event["note"]
    # the gang's other pod in the spending incident gets the same verdict, and no second Event
    other = pod(kube, "p3", "node-1", jobset_uid="uid-js-3", attempt="0")
    assert quietly(75, config=config(other), env=other)[0] == BUDGET_SPENT_EXIT_CODE
    assert len([e for e in kube.events if e["reason"] == "GPUEvacuationBudgetSpent"]) == 1


def test_a_budget_that_was_never_applied_is_said_and_the_pod_still_leaves_with_75(kube: KubeEmulator) -> None:
    del kube.objects[("ConfigMap", NS, "llm-gpuguard-budget")]
    env = pod(kube, "p0", "node-0")
    code, said = quietly(75, config=config(env), env=env)
    assert code == 75 and "the health-evacuation budget could not be counted (get configmaps: HTTP 404" in said


def test_a_bad_gpu_that_cannot_be_marked_leaves_with_a_code_the_controller_counts(
    kube: KubeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No node agent answers: the pod must not exit 75 (ignored, replaced, maybe on the same node)."""
    monkeypatch.setattr("gpuguard.k8s.gang.PREFLIGHT_DEADLINE_S", 1.5)  # how long the preflight waits for the agent
    env = pod(kube, "p0", "node-0")
    code, said = quietly(75, bad=[BAD], config=config(env, deadline_s=1.5), env=env)
    assert code == UNMARKED_EXIT_CODE == 1
    assert "the bad GPU's node could not be marked: leaving with exit 1, which the job's controller counts" in said
    assert incidents(kube) == []  # not an evacuation that moved anything
    report = json.loads(kube.pods[(NS, "p0")]["metadata"]["annotations"]["gpuguard.io/unhealthy-gpus"])
    assert report["GPU-0bad"]["state"] == "FAILING"
    condition = next(c for c in kube.pods[(NS, "p0")]["status"]["conditions"] if c["type"] == "gpuguard.io/GPUHealthy")
    assert "before the first step" in condition["message"]


def test_outside_a_cluster_the_codes_are_unchanged(tmp_path: Path) -> None:
    off = KubernetesConfig(enabled="off")
    assert settle(75, bad=[BAD], config=off, env={}) == 75
    assert settle(1, config=off, env={}) == 1
    assert settle(76, config=off, env={}) == 76
