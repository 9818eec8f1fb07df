"""``gpuguard k8s manifests``: valid against the Kubernetes schemas, least privilege, the right policies."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

VERSIONS = ["1.34.0", "1.35.0", "1.37.0"]
VARIANTS = {
    "one-node": ["--name", "llm", "--image", "reg/trainer:1", "--gpus", "8"],
    "multi-node": [
        "--name",
        "llm",
        "--image",
        "reg/trainer:1",
        "--gpus",
        "8",
        "--nodes",
        "4",
        "--checkpoint-dir",
        "s3://bucket/run1",
        "--namespace",
        "research",
    ],
    "no-taint": ["--name", "small", "--image", "trainer:1", "--gpus", "1", "--no-taint"],
    "restart-in-place": [
        "--name",
        "llm",
        "--image",
        "reg/trainer:1",
        "--gpus",
        "2",
        "--restart-in-place",
        "--script",
        "train.py --epochs 3",
    ],
}


def manifests(cli: Any, args: list[str]) -> dict[str, dict[str, Any]]:
    result = cli("k8s", "manifests", *args)
    assert result.returncode == 0, result.stderr
    return {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout)}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict[str, Any]]]:
    from conftest import run_cli

    return {name: manifests(run_cli, args) for name, args in VARIANTS.items()}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manifests_validate_against_the_schemas(rendered: Any, variant: str, version: str) -> None:
    for doc in rendered[variant].values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_job_understands_gpuguard_s_exit_codes(rendered: Any) -> None:
    job = rendered["multi-node"]["Job"]["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 4, 4)
    assert job["podReplacementPolicy"] == "Failed"
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]},
    }
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[2]["action"] == "Count" and rules[2]["onExitCodes"]["operator"] == "NotIn"
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "llm" and pod["subdomain"] == "llm"
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert container["startupProbe"]["exec"]["command"] == ["gpuguard", "status", "--check"]
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_UID": "metadata.uid",
        "NODE_NAME": "spec.nodeName",
        "GPUGUARD_CHECKPOINT_DIR": "s3://bucket/run1",
        "GPUGUARD_PREEMPTION_DEADLINE_S": "25",
        "GPUGUARD_TERMINATION_GRACE_S": "40",
    }
    # the grace period covers the guard's SIGTERM-to-checkpoint deadline, the Kubernetes actions and the exit
    assert pod["terminationGracePeriodSeconds"] == 40
    assert container["command"][:3] == ["gpuguard-run", "--nproc-per-node=8", "--nnodes=4"]
    assert "--rdzv-endpoint=llm-0.llm:29400" in container["command"]
    assert rendered["multi-node"]["Service"]["spec"]["clusterIP"] == "None"


def test_restart_in_place_restarts_the_container_on_76(rendered: Any) -> None:
    (container,) = rendered["restart-in-place"]["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["restartPolicy"] == "Never"
    assert container["restartPolicyRules"] == [{"action": "Restart", "exitCodes": {"operator": "In", "values": [76]}}]
    assert container["command"][-3:] == ["train.py", "--epochs", "3"]
    assert "restartPolicyRules" not in str(rendered["one-node"]["Job"])


def test_rbac_is_least_privilege(rendered: Any) -> None:
    role = {(tuple(r["apiGroups"]), tuple(r["resources"])): r["verbs"] for r in rendered["one-node"]["Role"]["rules"]}
    assert role == {
        (("",), ("pods",)): ["get", "patch"],
        (("",), ("pods/status",)): ["get", "patch"],
        (("",), ("pods/eviction",)): ["create"],
        (("events.k8s.io",), ("events",)): ["create"],
        (("resource.k8s.io",), ("resourceclaims",)): ["get"],
    }
    cluster = {
        (tuple(r["apiGroups"]), tuple(r["resources"])): r["verbs"] for r in rendered["one-node"]["ClusterRole"]["rules"]
    }
    assert cluster == {
        (("",), ("nodes",)): ["get", "patch"],
        (("resource.k8s.io",), ("devicetaintrules",)): ["create"],
        (("resource.k8s.io",), ("resourceslices",)): ["list"],
    }
    assert "ClusterRole" not in rendered["no-taint"] and "ClusterRoleBinding" not in rendered["no-taint"]
    binding = rendered["multi-node"]["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llm", "namespace": "research"}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad_Name", "--image", "i", "--gpus", "1"], "--name: 'Bad_Name' is not valid; must be a DNS label"),
        (
            ["--name", "ok", "--image", "i", "--gpus", "0"],
            "--gpus: 0 is not valid; must be a whole number from 1 to 64",
        ),
    ],
    ids=["name", "gpus"],
)
def test_bad_arguments_exit_2(cli: Any, args: list[str], message: str) -> None:
    result = cli("k8s", "manifests", *args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("name", ["job.yaml", "kind-demo.yaml"])
@pytest.mark.parametrize("version", ["1.34.0", "1.37.0"])
def test_the_examples_validate(name: str, version: str) -> None:
    from conftest import ROOT

    docs = list(yaml.safe_load_all((ROOT / "examples" / "kubernetes" / name).read_text()))
    assert any(d["kind"] == "Job" for d in docs)
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
