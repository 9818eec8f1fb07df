"""``gpuguard k8s manifests``: valid against the Kubernetes schemas, and the checks schemas cannot make
(names as the API server validates them, device-taint effects, fields a release gates)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gpuguard.cli import main

BASE = ["--name", "llm", "--image", "reg/trainer:1", "--gpus", "8"]
VARIANTS = {
    "one-node": BASE,
    "multi-node": [*BASE, "--nodes", "4", "--checkpoint-dir", "s3://bucket/run1", "--namespace", "research"],
    "no-taint": ["--name", "small", "--image", "trainer:1", "--gpus", "1", "--no-taint"],
    "label": [*BASE, "--mark", "label", "--no-dra"],
    "evict": [*BASE, "--leave", "evict"],
    "delete": [*BASE, "--leave", "delete", "--no-node-check"],
    "dra-gate": [*BASE, "--feature-gate", "DRADeviceTaints"],
    "restart-in-place": [
        *BASE,
        "--restart-in-place",
        "--feature-gate",
        "ContainerRestartRules",
        "--script",
        "t.py -e 3",
    ],
}
# the oldest release supported and the newest schema; 1.35 and 1.36 are covered by the emulator tests
SCHEMAS = ["1.34.0", "1.37.0"]


def generate(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["k8s", "manifests", *args])
    return code, out.getvalue(), err.getvalue()


def docs(*args: str) -> dict[str, dict[str, Any]]:
    code, out, err = generate(*args)
    assert code == 0, err
    found: dict[str, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(out):
        found.setdefault(doc["kind"], doc)  # the first of a kind by its kind alone, each by kind/name too
        found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict[str, Any]]]:
    return {name: docs(*args) for name, args in VARIANTS.items()}


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_validates_against_the_schemas(variant: str, schema: str) -> None:
    version = schema.rsplit(".", 1)[0]
    for doc in docs(*VARIANTS[variant], "--kubernetes-version", version).values():
        kubernetes_validate.validate(doc, schema, strict=True)


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
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert container["startupProbe"]["exec"]["command"] == ["gpuguard", "status", "--check"]
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_UID": "metadata.uid",
        "NODE_NAME": "spec.nodeName",
        # the actions the RBAC was generated for; DRA is off on 1.34 without its gate
        "GPUGUARD_KUBERNETES_CONDITION": "true",
        "GPUGUARD_KUBERNETES_EVENT": "true",
        "GPUGUARD_KUBERNETES_POD_HEALTH": "true",
        "GPUGUARD_KUBERNETES_MARK": "taint",
        "GPUGUARD_KUBERNETES_DRA": "false",
        "GPUGUARD_KUBERNETES_LEAVE": "exit",
        "GPUGUARD_CHECKPOINT_DIR": "s3://bucket/run1",
        "GPUGUARD_PREEMPTION_DEADLINE_S": "25",
        "GPUGUARD_TERMINATION_GRACE_S": "40",
    }
    # the grace period covers the guard's SIGTERM-to-checkpoint deadline, the Kubernetes actions and the exit
    assert pod["terminationGracePeriodSeconds"] == 40
    assert container["command"][:3] == ["gpuguard-run", "--nproc-per-node=8", "--nnodes=4"]
    assert "--rdzv-endpoint=llm-0.llm:29400" in container["command"]
    service = rendered["multi-node"]["Service"]["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True


def test_restart_in_place_restarts_the_container_on_76(rendered: Any) -> None:
    (container,) = rendered["restart-in-place"]["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["restartPolicy"] == "Never"
    assert container["restartPolicyRules"] == [{"action": "Restart", "exitCodes": {"operator": "In", "values": [76]}}]
    assert container["command"][-3:] == ["t.py", "-e", "3"]
    assert "restartPolicyRules" not in str(rendered["one-node"]["Job"])


def test_restart_in_place_on_1_34_without_its_gate_is_refused() -> None:
    code, out, err = generate(*BASE, "--restart-in-place")
    assert code == 2 and out == ""
    assert "--restart-in-place: True is not valid; Kubernetes 1.34 drops restartPolicyRules silently" in err
    code, out, _ = generate(*BASE, "--restart-in-place", "--kubernetes-version", "1.35")
    assert code == 0 and "restartPolicyRules" in out and "# restartPolicyRules need" not in out
    _, gated, _ = generate(*BASE, "--restart-in-place", "--feature-gate", "ContainerRestartRules")
    assert "# restartPolicyRules need the ContainerRestartRules feature gate" in gated


def test_device_taint_rules_follow_the_release() -> None:
    def cluster_rules(*args: str) -> set[str]:
        found = docs(*BASE, *args)
        return {r for rule in found["ClusterRole/llm-default-gpuguard"]["rules"] for r in rule["resources"]}

    code, out, _ = generate(*BASE)
    assert code == 0 and "# DeviceTaintRules are off: Kubernetes 1.34 serves them only with" in out
    assert "devicetaintrules" not in cluster_rules()
    assert "devicetaintrules" in cluster_rules("--feature-gate", "DRADeviceTaints")
    assert "devicetaintrules" in cluster_rules("--kubernetes-version", "1.37")
    assert "devicetaintrules" not in cluster_rules("--kubernetes-version", "1.36")


def _rules(doc: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    return {(r["apiGroups"][0], r["resources"][0]): r["verbs"] for r in doc["rules"]}


def test_rbac_is_derived_from_the_actions(rendered: Any) -> None:
    assert _rules(rendered["one-node"]["Role"]) == {
        ("", "pods/status"): ["get", "patch"],
        ("events.k8s.io", "events"): ["create"],
    }
    assert _rules(rendered["one-node"]["ClusterRole/llm-default-gpuguard"]) == {("", "nodes"): ["get", "patch"]}
    assert _rules(rendered["dra-gate"]["Role"])[("resource.k8s.io", "resourceclaims")] == ["get"]
    assert _rules(rendered["dra-gate"]["ClusterRole/llm-default-gpuguard"]) == {
        ("", "nodes"): ["get", "patch"],
        ("resource.k8s.io", "devicetaintrules"): ["create"],
        ("resource.k8s.io", "resourceslices"): ["list"],
    }
    assert _rules(rendered["evict"]["Role"])[("", "pods/eviction")] == ["create"]
    assert _rules(rendered["delete"]["Role"])[("", "pods")] == ["delete"]
    assert ("", "pods") not in _rules(rendered["evict"]["Role"])  # delete only with leave=delete
    no_taint = rendered["no-taint"]
    assert not any(key.startswith("ClusterRole") for key in no_taint) and "DaemonSet" not in no_taint
    assert rendered["multi-node"]["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "llm", "namespace": "research"}
    ]


def test_the_node_check_is_least_privilege_and_tolerates_gpuguard_s_taint(rendered: Any) -> None:
    found = rendered["one-node"]
    daemonset = found["DaemonSet"]["spec"]["template"]["spec"]
    assert daemonset["serviceAccountName"] == "llm-node-check"
    assert daemonset["tolerations"] == [{"key": "gpuguard.io/unhealthy-gpu", "operator": "Exists"}]
    (container,) = daemonset["containers"]
    assert (
        container["command"][:3] == ["gpuguard", "k8s", "node-check"] and "--quiet-period=600" in container["command"]
    )
    assert _rules(found["ClusterRole/llm-default-node-check"]) == {("", "nodes"): ["get", "patch"]}
    binding = found["ClusterRoleBinding/llm-default-node-check"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llm-node-check", "namespace": "default"}]


def test_label_mode_keeps_the_job_off_labelled_nodes(rendered: Any) -> None:
    affinity = rendered["label"]["Job"]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term == {
        "matchExpressions": [{"key": "gpuguard.io/unhealthy-gpu", "operator": "NotIn", "values": ["failing"]}]
    }
    (preferred,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["preference"]["matchExpressions"][0]["values"] == ["degraded"]
    assert "affinity" not in rendered["one-node"]["Job"]["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad_Name", "--image", "i", "--gpus", "1"], "--name: 'Bad_Name' is not valid; must be a DNS label"),
        (
            ["--name", "8gpu", "--image", "i", "--gpus", "1", "--nodes", "2"],
            "--name: '8gpu' is not valid; must be a DNS-1035 label (it names the headless Service)",
        ),
        (["--name", "x" * 62, "--image", "i", "--gpus", "1"], "61 characters at most (pod hostnames are NAME-INDEX"),
        (
            ["--name", "ok", "--image", "i", "--gpus", "0"],
            "--gpus: 0 is not valid; must be a whole number from 1 to 64",
        ),
        (["--name", "ok", "--image", "i", "--gpus", "1", "--kubernetes-version", "1.33"], "supported: 1.34, 1.35"),
        (["--name", "ok", "--image", "i", "--gpus", "1", "--namespace", "ML"], "--namespace: 'ML' is not valid"),
    ],
    ids=["name", "dns-1035", "hostname-length", "gpus", "version", "namespace"],
)
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    code, out, err = generate(*args)
    assert code == 2 and out == "" and message in err


def test_a_name_starting_with_a_digit_is_fine_for_one_node() -> None:
    found = docs("--name", "8gpu", "--image", "i", "--gpus", "1")
    assert found["Job"]["metadata"]["name"] == "8gpu" and "Service" not in found


def test_the_installed_command_line_prints_the_manifests(cli: Any) -> None:
    result = cli("k8s", "manifests", *VARIANTS["multi-node"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Generated by gpuguard for Kubernetes 1.34.")
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout)][-1] == "Job"


def test_the_example_job_is_the_generator_s_output() -> None:
    from conftest import ROOT

    args = [
        *("--name", "llm-train", "--namespace", "ml", "--image", "registry.example.com/llm-trainer:1.0"),
        *("--gpus", "8", "--nodes", "2", "--checkpoint-dir", "s3://my-bucket/llm-train", "--restart-in-place"),
        *("--kubernetes-version", "1.35", "--script", "examples/train_guarded.py --steps 100000"),
    ]
    code, out, err = generate(*args)
    assert code == 0, err
    assert (ROOT / "examples" / "kubernetes" / "job.yaml").read_text() == out


def test_the_kind_demo_grants_what_the_generator_grants_without_dra() -> None:
    from gpuguard.k8s import JobSpec, KubernetesConfig, render

    from conftest import ROOT

    demo = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "examples" / "kubernetes" / "kind-demo.yaml").read_text())}
    spec = JobSpec(name="gpuguard-demo", image="i", gpus=1, kubernetes=KubernetesConfig(dra=False), node_check=False)
    generated = {d["kind"]: d for d in render(spec)}
    for kind in ("Role", "ClusterRole"):
        assert _rules(demo[kind]) == _rules(generated[kind]), kind
    (container,) = demo["Job"]["spec"]["template"]["spec"]["containers"]
    assert {"name": "GPUGUARD_KUBERNETES_DRA", "value": "false"} in container["env"]


@pytest.mark.parametrize("name", ["job.yaml", "kind-demo.yaml"])
@pytest.mark.parametrize("version", SCHEMAS)
def test_the_examples_validate(name: str, version: str) -> None:
    from conftest import ROOT

    found = list(yaml.safe_load_all((ROOT / "examples" / "kubernetes" / name).read_text()))
    assert any(d["kind"] == "Job" for d in found)
    for doc in found:
        kubernetes_validate.validate(doc, version, strict=True)
