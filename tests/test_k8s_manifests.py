"""``gpuguard k8s manifests``: valid against the Kubernetes schemas (kubernetes-validate, 1.34-1.37) and
the vendored CRDs (JobSet per release, Kubeflow Trainer v2.3.0), and the checks schemas cannot make
(what each exit code does per workload, fields a release gates, names as the API server validates them,
least privilege)."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers import crd_schema

from gpuguard.cli import main

BASE = ["--name", "llm", "--image", "reg/trainer:1", "--gpus", "8"]
GANG = [*BASE, "--nodes", "4", "--checkpoint-dir", "s3://bucket/run1", "--namespace", "research"]
VARIANTS = {
    "one-node": BASE,
    "jobset": [*GANG, "--kind", "jobset"],
    "trainjob": [*GANG, "--kind", "trainjob"],
    "cluster-runtime": [*GANG, "--kind", "trainjob", "--runtime-kind", "ClusterTrainingRuntime"],
    "no-taint": ["--name", "small", "--image", "trainer:1", "--gpus", "1", "--no-taint"],
    "label": [*BASE, "--mark", "label", "--no-dra"],
    "marker-pod": [*BASE, "--marker", "pod", "--no-node-check"],
    "evict": [*BASE, "--leave", "evict"],
    "delete": [*BASE, "--leave", "delete"],
    "dra-gate": [*BASE, "--feature-gate", "DRADeviceTaints"],
    "restart-in-place": [
        *BASE,
        "--restart-in-place",
        "--feature-gate",
        "ContainerRestartRules",
        "--script",
        "t.py -e 3",
    ],
    "local-tier-memory": [*BASE, "--local-dir", "/dev/shm/gpuguard", "--local-size", "64Gi"],
    "local-tier-disk": [*GANG, "--kind", "jobset", "--local-dir", "/local/gpuguard"],
}
KUBERNETES = ["1.34.0", "1.35.0", "1.36.0", "1.37.0"]


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


_VALID: set[tuple[str, str]] = set()  # (release, object): an object many variants share is checked once


def validate(doc: dict[str, Any], kubernetes: str, jobset: str = "0.12.0") -> None:
    key = (kubernetes, json.dumps(doc, sort_keys=True))
    if key in _VALID:
        return
    _VALID.add(key)
    if doc["kind"] in crd_schema.FILES:
        crd_schema.validate(doc, jobset if doc["kind"] == "JobSet" else crd_schema.TRAINER_RELEASE)
    else:
        kubernetes_validate.validate(doc, kubernetes, strict=True)


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict[str, Any]]]:
    return {name: docs(*args) for name, args in VARIANTS.items()}


@pytest.mark.parametrize("schema", KUBERNETES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_validates_against_the_schemas(variant: str, schema: str) -> None:
    version = schema.rsplit(".", 1)[0]
    args = VARIANTS[variant]
    if "--restart-in-place" in args and version != "1.34":
        args = [a for a in args if a not in ("--feature-gate", "ContainerRestartRules")]
    for doc in {id(d): d for d in docs(*args, "--kubernetes-version", version).values()}.values():
        validate(doc, schema)


@pytest.mark.parametrize("kind", ["jobset", "trainjob"])
@pytest.mark.parametrize("release", crd_schema.JOBSET_RELEASES)
def test_jobset_fields_follow_the_jobset_release(kind: str, release: str) -> None:
    """Each release's output is valid against that release's CRD, field for field (unknown fields refused)."""
    found = docs(*GANG, "--kind", kind, "--jobset-version", release.rsplit(".", 1)[0])
    spec = found["JobSet"]["spec"] if kind == "jobset" else found["TrainingRuntime"]["spec"]["template"]["spec"]
    if kind == "jobset":
        crd_schema.validate(found["JobSet"], release)
    policy = spec["failurePolicy"]
    minor = int(release.split(".")[1])
    assert ("restartStrategy" in policy) == (minor >= 7)
    patterns = [r for r in policy["rules"] if "onJobFailureMessagePatterns" in r]
    assert bool(patterns) == (minor >= 10)
    evacuation = policy["rules"][-1]
    assert evacuation["name"] == "gpuguardEvacuation" and evacuation["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert evacuation["onJobFailureReasons"] == ["PodFailurePolicy"]


def test_a_newer_release_s_fields_are_refused_by_an_older_crd() -> None:
    """Why gating matters: v0.6 does not have restartStrategy, and kubectl's strict validation says so."""
    jobset = docs(*GANG, "--kind", "jobset", "--jobset-version", "0.10")["JobSet"]
    with pytest.raises(jsonschema.ValidationError, match="'restartStrategy' was unexpected"):
        crd_schema.validate(jobset, "0.6.0")
    with pytest.raises(jsonschema.ValidationError, match="'onJobFailureMessagePatterns' was unexpected"):
        crd_schema.validate(jobset, "0.7.0")


def _rule(container: str, action: str, operator: str, values: list[int]) -> dict[str, Any]:
    return {"action": action, "onExitCodes": {"containerName": container, "operator": operator, "values": values}}


DISRUPTION = [{"type": "DisruptionTarget", "status": "True"}]


def test_one_node_job_ignores_75_and_stops_on_a_spent_budget(rendered: Any) -> None:
    job = rendered["one-node"]["Job"]["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"], job["backoffLimit"]) == ("Indexed", 1, 1, 3)
    assert job["podReplacementPolicy"] == "Failed"
    assert job["podFailurePolicy"]["rules"] == [
        _rule("trainer", "Ignore", "In", [75]),
        _rule("trainer", "FailJob", "In", [77]),
        {"action": "Ignore", "onPodConditions": DISRUPTION},
        _rule("trainer", "Count", "NotIn", [0, 75, 77]),
    ]
    pod = job["template"]["spec"]
    assert (
        pod["restartPolicy"] == "Never"
        and pod["serviceAccountName"] == "llm"
        and pod["terminationGracePeriodSeconds"] == 40
    )
    (container,) = pod["containers"]
    assert container["command"][:4] == ["gpuguard-run", "--nproc-per-node=8", "--nnodes=1", "--standalone"]
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert (
        env["GPUGUARD_KUBERNETES_MARKER"] == "agent"
        and env["GPUGUARD_KUBERNETES_EVACUATION_BUDGET"] == "llm-gpuguard-budget"
    )
    assert env["GPUGUARD_KUBERNETES_DRA"] == "false"  # 1.34 without its gate
    assert rendered["one-node"]["ConfigMap"]["data"] == {"limit": "10"}


def test_a_jobset_restarts_the_gang_as_one(rendered: Any) -> None:
    jobset = rendered["jobset"]["JobSet"]
    assert jobset["metadata"]["annotations"] == {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "kubernetes.io/hostname"
    }
    spec = jobset["spec"]
    assert spec["failurePolicy"] == {
        "maxRestarts": 3,
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {
                "name": "gpuguardBudgetSpent",
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": ["failed with exit code 77 matching FailJob rule"],
            },
            {
                "name": "gpuguardEvacuation",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [
                    "failed with exit code 75 matching FailJob rule",
                    "has condition DisruptionTarget matching FailJob rule",
                ],
            },
        ],
    }
    (rjob,) = spec["replicatedJobs"]
    assert (rjob["name"], rjob["replicas"]) == ("node", 4)
    child = rjob["template"]["spec"]
    assert (child["completions"], child["parallelism"], child["backoffLimit"]) == (1, 1, 0)
    assert child["podFailurePolicy"]["rules"] == [
        _rule("trainer", "FailJob", "In", [75]),
        _rule("trainer", "FailJob", "In", [77]),
        {"action": "FailJob", "onPodConditions": DISRUPTION},
    ]
    (container,) = child["template"]["spec"]["containers"]
    assert "--node-rank=$(NODE_RANK)" in container["command"]
    assert "--rdzv-endpoint=llm-node-0-0.llm:29400" in container["command"]
    rank = next(e for e in container["env"] if e["name"] == "NODE_RANK")
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['jobset.sigs.k8s.io/job-index']"


def test_before_jobset_0_10_exit_77_is_counted_not_a_restart_without_counting() -> None:
    found = docs(*GANG, "--kind", "jobset", "--jobset-version", "0.9")
    child = found["JobSet"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert _rule("trainer", "FailJob", "In", [77]) not in child["podFailurePolicy"]["rules"]
    _, out, _ = generate(*GANG, "--kind", "jobset", "--jobset-version", "0.9")
    assert "# Before v0.10 a rule cannot tell exit 77" in out


def test_a_trainjob_uses_a_runtime_that_carries_the_failure_semantics(rendered: Any) -> None:
    runtime, train_job = rendered["trainjob"]["TrainingRuntime"], rendered["trainjob"]["TrainJob"]
    assert runtime["metadata"]["name"] == "llm-gpuguard" and runtime["metadata"]["namespace"] == "research"
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 4, "torch": {}}
    template = runtime["spec"]["template"]["spec"]
    assert template["failurePolicy"] == rendered["jobset"]["JobSet"]["spec"]["failurePolicy"]
    (rjob,) = template["replicatedJobs"]
    assert rjob["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    child = rjob["template"]["spec"]
    assert (child["completions"], child["backoffLimit"]) == (4, 0)
    (container,) = child["template"]["spec"]["containers"]
    assert container["name"] == "node" and container["command"][0] == "gpuguard-run"  # PET_* from Trainer
    assert child["podFailurePolicy"]["rules"][0] == _rule("node", "FailJob", "In", [75])
    anti = child["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert train_job["spec"] == {
        "runtimeRef": {"name": "llm-gpuguard", "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime"},
        "trainer": {"numNodes": 4, "numProcPerNode": 8},
    }
    cluster = rendered["cluster-runtime"]["ClusterTrainingRuntime"]
    assert "namespace" not in cluster["metadata"]
    assert rendered["cluster-runtime"]["TrainJob"]["spec"]["runtimeRef"]["kind"] == "ClusterTrainingRuntime"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [*GANG, "--kind", "pytorchjob"],
            "treats exit codes 1-127 as permanent under restartPolicy ExitCode (kubeflow/trainer v1.9.4 "
            "pkg/util/train/train_util.go: IsRetryableExitCode is exitCode >= 128), so gpuguard's 75 would fail the "
            "whole job instead of moving it; use --kind trainjob",
        ),
        ([*GANG, "--kind", "job"], "a plain Job restarts pods, not the gang"),
        ([*GANG, "--jobset-version", "0.5"], "--jobset-version: '0.5' is not valid; supported: 0.6"),
        (
            [*BASE, "--restart-in-place"],
            "--restart-in-place: 'container' is not valid; Kubernetes 1.34 drops restartPolicyRules silently",
        ),
        ([*BASE, "--restart-in-place", "pod"], "Kubernetes 1.34 does not have it: KEP-5532"),
        (
            [*BASE, "--restart-in-place", "pod", "--kubernetes-version", "1.35"],
            "pass --feature-gate RestartAllContainersOnContainerExits if it is, or --kubernetes-version 1.36",
        ),
        ([*BASE, "--marker", "agent", "--no-node-check"], "--no-node-check: True is not valid; the node agent marks"),
        (["--name", "Bad_Name", "--image", "i", "--gpus", "1"], "--name: 'Bad_Name' is not valid; must be a DNS label"),
        (
            ["--name", "8gpu", "--image", "i", "--gpus", "1", "--nodes", "2"],
            "--name: '8gpu' is not valid; must be a DNS-1035 label (it names the headless Service)",
        ),
        (["--name", "x" * 62, "--image", "i", "--gpus", "1"], "61 characters at most"),
        (
            ["--name", "ok", "--image", "i", "--gpus", "0"],
            "--gpus: 0 is not valid; must be a whole number from 1 to 64",
        ),
        (["--name", "ok", "--image", "i", "--gpus", "1", "--namespace", "ML"], "--namespace: 'ML' is not valid"),
        ([*BASE, "--local-dir", "dev/shm/g"], "--local-dir: 'dev/shm/g' is not valid; must be an absolute path"),
        ([*BASE, "--local-dir", "/dev/shm"], "not /dev/shm itself"),
        ([*BASE, "--local-size", "64Gi"], "--local-size: '64Gi' is not valid; needs --local-dir"),
        ([*BASE, "--local-dir", "/dev/shm/g", "--local-size", "64 GB"], "must be a Kubernetes quantity"),
        ([*BASE, "--evacuation-budget", "-5"], "--evacuation-budget: -5 is not valid; must be a whole number, 0 or"),
    ],
    ids=[
        "pytorchjob",
        "job-gang",
        "old-jobset",
        "restart-1.34",
        "restart-pod-1.34",
        "restart-pod-1.35",
        "agent-without-agent",
        "name",
        "dns-1035",
        "hostname-length",
        "gpus",
        "namespace",
        "local-dir-relative",
        "local-dir-shm",
        "local-size-alone",
        "local-size-quantity",
        "budget-negative",
    ],
)
def test_refused_with_the_reason_and_the_alternative(args: list[str], message: str) -> None:
    code, out, err = generate(*args)
    assert code == 2 and out == "" and message in err, err


@pytest.mark.parametrize(
    ("args", "action", "cited"),
    [
        (["--restart-in-place", "--kubernetes-version", "1.35"], "Restart", "KEP-5307"),
        (["--restart-in-place", "--feature-gate", "ContainerRestartRules"], "Restart", "KEP-5307"),
        (["--restart-in-place", "pod", "--kubernetes-version", "1.36"], "RestartAllContainers", "KEP-5532"),
        (
            [
                "--restart-in-place",
                "pod",
                "--kubernetes-version",
                "1.35",
                "--feature-gate",
                "RestartAllContainersOnContainerExits",
            ],
            "RestartAllContainers",
            "KEP-5532",
        ),
    ],
    ids=["container-1.35", "container-1.34-gate", "pod-1.36", "pod-1.35-gate"],
)
def test_restart_in_place_per_release_with_its_source(args: list[str], action: str, cited: str) -> None:
    code, out, err = generate(*BASE, *args)
    assert code == 0, err
    (container,) = next(d for d in yaml.safe_load_all(out) if d["kind"] == "Job")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["restartPolicy"] == "Never"
    assert container["restartPolicyRules"] == [{"action": action, "exitCodes": {"operator": "In", "values": [76]}}]
    comments = " ".join(line[2:] for line in out.splitlines() if line.startswith("# "))
    assert f"restartPolicyRules action {action}: {cited}" in comments
    assert ("(said to be on)" in comments) == ("--feature-gate" in args)


def _rules(doc: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    return {(r["apiGroups"][0], r["resources"][0]): r["verbs"] for r in doc["rules"]}


def test_training_pods_hold_no_node_rights(rendered: Any) -> None:
    found = rendered["one-node"]
    assert "ClusterRole/llm-default-gpuguard" not in found  # nothing cluster-wide without DRA
    role = found["Role/llm"]
    assert _rules(role) == {
        ("", "pods/status"): ["get", "patch"],
        ("events.k8s.io", "events"): ["create", "list"],
        ("", "configmaps"): ["get", "update"],
    }
    assert next(r for r in role["rules"] if r["resources"] == ["configmaps"])["resourceNames"] == [
        "llm-gpuguard-budget"
    ]
    # the node agent marks and gives back, under its own account
    agent = found["ClusterRole/llm-default-node-check"]
    assert _rules(agent) == {
        ("", "nodes"): ["get", "patch"],
        ("", "pods"): ["list"],
        ("events.k8s.io", "events"): ["create"],
    }
    daemonset = found["DaemonSet"]["spec"]["template"]["spec"]
    assert daemonset["serviceAccountName"] == "llm-node-check"
    (container,) = daemonset["containers"]
    assert container["command"][:3] == ["python", "-m", "gpuguard.k8s.node_agent"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8081}
    policy = found["ValidatingAdmissionPolicy"]["spec"]
    assert policy["matchConditions"][0]["expression"] == (
        "request.userInfo.username in ['system:serviceaccount:default:llm-node-check']"
    )


def test_marker_pod_grants_node_rights_only_under_the_admission_policy(rendered: Any) -> None:
    found = rendered["marker-pod"]
    assert _rules(found["ClusterRole/llm-default-gpuguard"]) == {("", "nodes"): ["get", "patch"]}
    assert "DaemonSet" not in found
    policy = found["ValidatingAdmissionPolicy"]["spec"]
    assert "'system:serviceaccount:default:llm'" in policy["matchConditions"][0]["expression"]
    assert found["ValidatingAdmissionPolicyBinding"]["spec"] == {
        "policyName": "llm-default-gpuguard-nodes",
        "validationActions": ["Deny"],
    }


def test_rbac_follows_the_actions(rendered: Any) -> None:
    assert _rules(rendered["dra-gate"]["ClusterRole/llm-default-gpuguard"]) == {
        ("resource.k8s.io", "resourceslices"): ["list"],  # the UUIDs; the agent creates the DeviceTaintRule
    }
    assert _rules(rendered["dra-gate"]["ClusterRole/llm-default-node-check"])[
        ("resource.k8s.io", "devicetaintrules")
    ] == [
        "create",
        "delete",
        "list",
    ]
    assert _rules(rendered["evict"]["Role"])[("", "pods/eviction")] == ["create"]
    assert _rules(rendered["delete"]["Role"])[("", "pods")] == ["delete"]
    assert ("", "pods") not in _rules(rendered["evict"]["Role"])
    no_taint = rendered["no-taint"]
    assert "DaemonSet" not in no_taint and "ValidatingAdmissionPolicy" not in no_taint
    assert rendered["jobset"]["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "llm", "namespace": "research"}
    ]


def test_label_mode_keeps_pods_off_failing_and_degraded_nodes(rendered: Any) -> None:
    affinity = rendered["label"]["Job"]["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    (term,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term == {
        "matchExpressions": [
            {"key": "gpuguard.io/unhealthy-gpu", "operator": "NotIn", "values": ["failing", "degraded"]}
        ]
    }
    assert "affinity" not in rendered["one-node"]["Job"]["spec"]["template"]["spec"]


def test_the_installed_command_line_prints_the_manifests(cli: Any) -> None:
    result = cli("k8s", "manifests", *VARIANTS["jobset"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Generated by gpuguard for Kubernetes 1.34 (jobset).")
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout)][-1] == "JobSet"


EXAMPLES = {
    "job.yaml": [
        *("--name", "llm-train", "--namespace", "ml", "--image", "registry.example.com/llm-trainer:1.0"),
        *("--gpus", "8", "--checkpoint-dir", "s3://my-bucket/llm-train", "--restart-in-place"),
        *("--kubernetes-version", "1.35", "--script", "examples/train_guarded.py --steps 100000"),
    ],
    "jobset.yaml": [
        *("--name", "llm-train", "--namespace", "ml", "--image", "registry.example.com/llm-trainer:1.0"),
        *("--gpus", "8", "--nodes", "4", "--checkpoint-dir", "s3://my-bucket/llm-train", "--restart-in-place"),
        *("--kubernetes-version", "1.35", "--jobset-version", "0.10"),
        *("--script", "examples/train_guarded.py --steps 100000"),
    ],
    "trainjob.yaml": [
        *("--name", "llm-train", "--namespace", "ml", "--image", "registry.example.com/llm-trainer:1.0"),
        *("--gpus", "8", "--nodes", "4", "--kind", "trainjob", "--checkpoint-dir", "s3://my-bucket/llm-train"),
        *("--kubernetes-version", "1.36", "--restart-in-place", "pod", "--jobset-version", "0.12"),
        *("--script", "examples/train_guarded.py --steps 100000"),
    ],
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_the_examples_are_the_generator_s_output_and_validate(name: str) -> None:
    from conftest import ROOT

    code, out, err = generate(*EXAMPLES[name])
    assert code == 0, err
    assert (ROOT / "examples" / "kubernetes" / name).read_text() == out
    for doc in yaml.safe_load_all(out):
        for version in ("1.35.0", "1.37.0"):
            validate(doc, version)


def test_the_kind_demo_validates_and_its_pods_hold_no_node_rights() -> None:
    from conftest import ROOT

    found = list(yaml.safe_load_all((ROOT / "examples" / "kubernetes" / "kind-demo.yaml").read_text()))
    assert any(d["kind"] == "Job" for d in found)
    for doc in found:
        kubernetes_validate.validate(doc, "1.34.0", strict=True)
    trainer_rules = [
        r
        for d in found
        if d["kind"] in ("Role", "ClusterRole")
        for r in d["rules"]
        if d["metadata"]["name"] == "gpuguard-demo"
    ]
    assert trainer_rules and not any("nodes" in r["resources"] for r in trainer_rules)


@pytest.mark.parametrize(
    ("variant", "kind", "path", "volume"),
    [
        ("local-tier-memory", "Job", "/dev/shm/gpuguard", {"medium": "Memory", "sizeLimit": "64Gi"}),
        ("local-tier-disk", "JobSet", "/local/gpuguard", {}),
    ],
    ids=["memory", "disk"],
)
def test_the_local_tier_is_an_emptydir_mounted_where_the_guard_looks(
    rendered: Any, variant: str, kind: str, path: str, volume: dict[str, Any]
) -> None:
    workload = rendered[variant][kind]
    if kind == "JobSet":
        workload = workload["spec"]["replicatedJobs"][0]["template"]
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "GPUGUARD_LOCAL_DIR", "value": path} in container["env"]
    # each of the 8 ranks keeps at most half its share of the sizeLimit: the kubelet never evicts the pod for it
    keep = [e["value"] for e in container["env"] if e["name"] == "GPUGUARD_LOCAL_KEEP_BYTES"]
    assert keep == ([str(64 * 2**30 // 8 // 2)] if "sizeLimit" in volume else [])
    assert container["volumeMounts"] == [{"name": "gpuguard-local", "mountPath": path}]
    assert pod["volumes"] == [{"name": "gpuguard-local", "emptyDir": volume}]
    assert "volumes" not in rendered["one-node"]["Job"]["spec"]["template"]["spec"]  # only when asked
