"""The taint's life against the emulated API server: gpuguard marks a node, and gives it back.

The node agent (node check) and ``gpuguard k8s untaint`` run under the RBAC that ``gpuguard k8s
manifests`` generates (the agent's own ClusterRole), on every release profile, with the generated
ValidatingAdmissionPolicy evaluated on every node patch. gpuguard's taints carry the value
``gpuguard``; a taint it did not place is never removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.kube_emulator import ADMIN, KubeEmulator, write_kubeconfig
from helpers.kube_rules import RELEASES

from gpuguard import HealthConfig, HealthMonitor, KubernetesError
from gpuguard.cli import main
from gpuguard.fakenvml import FakeNvml
from gpuguard.k8s import JobSpec, KubernetesActions, KubernetesConfig, connect, render
from gpuguard.k8s.node_check import NodeCheck
from gpuguard.k8s.node_marks import RECORD_ANNOTATION

from conftest import H200_UUID

KEY = "gpuguard.io/unhealthy-gpu"
OTHERS = [
    {"key": "dedicated", "value": "ml", "effect": "NoSchedule"},
    {"key": "nvidia.com/gpu", "value": "maintenance", "effect": "NoExecute"},
]


@pytest.fixture(scope="module", params=RELEASES, ids=[f"k8s-{r}" for r in RELEASES])
def server(request: pytest.FixtureRequest) -> Iterator[KubeEmulator]:
    emulator = KubeEmulator(release=request.param)
    emulator.url = emulator.start()  # type: ignore[attr-defined]
    yield emulator
    emulator.stop()


def apply(kube: KubeEmulator, spec: JobSpec) -> None:
    """RBAC and the admission policy, as kubectl apply creates them."""
    objects = render(spec)
    kube.authorize(objects)
    for doc in objects:
        if doc["kind"].startswith("ValidatingAdmissionPolicy"):
            kube.objects.pop((doc["kind"], "", doc["metadata"]["name"]), None)
            assert kube.create(doc)[0] == 201


@pytest.fixture
def kube(server: KubeEmulator, tmp_path: Path) -> KubeEmulator:
    server.reset()
    server.add_node("node-a", taints=list(OTHERS))
    server.nodes["node-a"]["metadata"]["labels"] = {"team": "ml"}
    server.add_node("node-b")
    server.add_pod("ml", "trainer-0", "node-a")
    marker_pod = KubernetesConfig(marker="pod")
    apply(
        server,
        JobSpec(
            name="trainer",
            image="t:1",
            gpus=2,
            namespace="ml",
            kubernetes=marker_pod,
            kubernetes_version=server.release,
        ),
    )
    server.tmp = tmp_path  # type: ignore[attr-defined]
    return server


def cluster_as(kube: KubeEmulator, user: str, *, pod: str = "", node: str = "node-a", **settings: Any) -> Any:
    """``user``'s credentials: a pod's bound token, which names the node the pod runs on."""
    token = kube.token_for(user, node=node)
    path = write_kubeconfig(kube.tmp / f"kc-{len(kube.tokens)}", kube.url, token)  # type: ignore[attr-defined]
    env = {"POD_NAME": pod, "POD_NAMESPACE": "ml", "NODE_NAME": node, "POD_UID": f"uid-{pod}"}
    # generous timeouts: the emulator shares this machine's cores with the test (and other suites)
    defaults = {"dra": False, "marker": "pod", "request_timeout_s": 20.0, "deadline_s": 60.0}
    config = KubernetesConfig(kubeconfig=str(path), **{**defaults, **settings})
    cluster = connect(config, env=env, need_pod=bool(pod))
    assert cluster is not None
    return cluster


def mark(kube: KubeEmulator, *uuids: str, state: str = "FAILING") -> None:
    """The guard, as the training pod's service account, marks node-a for each GPU."""
    guard = KubernetesActions(cluster_as(kube, "system:serviceaccount:ml:trainer", pod="trainer-0"))
    for uuid in uuids:
        outcomes = guard.evacuate(
            device=uuid, state=state, message="XID 48", evidence={}, action="reschedule", exit_code=75, report=False
        )
        assert [o.outcome for o in outcomes] == ["done"], outcomes


def ours(kube: KubeEmulator) -> list[str]:
    return [
        t["effect"] for t in kube.nodes["node-a"]["spec"]["taints"] if t["key"] == KEY and t.get("value") == "gpuguard"
    ]


@pytest.fixture
def monitor() -> Iterator[HealthMonitor]:
    with contextlib.ExitStack() as stack:

        def make(scenario: dict[str, Any]) -> HealthMonitor:
            m = HealthMonitor(FakeNvml.from_scenario(scenario), HealthConfig(), devices="all")
            m.start(threads=False)
            stack.callback(m.stop)
            return m

        yield make  # type: ignore[misc]


def states(monitor: HealthMonitor) -> dict[str, str]:
    return {d.uuid: d.state.value for d in monitor.poll().devices}


def test_a_node_whose_gpus_stay_healthy_through_the_quiet_period_is_untainted(kube: KubeEmulator, monitor: Any) -> None:
    gpus = monitor({"gpus": 2})
    uuids = sorted(states(gpus))
    mark(kube, *uuids)
    assert ours(kube) == ["NoSchedule"]
    now = [0.0]
    dra = kube.release == "1.37"  # where DeviceTaintRules are on by default, the node check removes them too
    check = NodeCheck(
        cluster_as(kube, "system:serviceaccount:ml:trainer-node-check", dra=dra),
        lambda: states(gpus),
        quiet_period_s=600,
        mark_reports=False,  # marker pod: the agent only gives nodes back
        clock=lambda: now[0],
    )
    assert check.once() == "node node-a: GPUs healthy for 0s of 600s"
    now[0] = 599.0
    assert "healthy for 599s of 600s" in check.once() and ours(kube) == ["NoSchedule"]
    now[0] = 600.0
    line = check.once()
    assert line.startswith(
        "node node-a: GPUs healthy for 600s; removed taint gpuguard.io/unhealthy-gpu=gpuguard:NoSchedule"
    )
    assert all(u in line for u in uuids)
    node = kube.nodes["node-a"]
    assert node["spec"]["taints"] == OTHERS and RECORD_ANNOTATION not in node["metadata"]["annotations"]
    assert node["metadata"]["labels"] == {"team": "ml"}
    assert check.once() == "node node-a: no gpuguard mark"
    # under the node check's own ClusterRole: nodes get and patch (and, where DRA is on, the rules' list)
    assert kube.rbac is not None
    user = "system:serviceaccount:ml:trainer-node-check"
    assert {("", "nodes", "get"), ("", "nodes", "patch")} <= kube.used(user) <= kube.rbac.granted(user, "ml")
    assert not [r for r in kube.requests if r.status in (403, 422)]


def test_a_gpu_that_is_still_failing_keeps_the_mark_and_restarts_the_quiet_period(
    kube: KubeEmulator, monitor: Any
) -> None:
    gpus = monitor({"gpus": 2, "events": [{"at": 0.0, "gpu": 1, "xid": 48}]})
    gpus.process_events(0.0)
    seen = states(gpus)
    bad = next(u for u, s in seen.items() if s != "HEALTHY")
    mark(kube, bad)
    now = [0.0]
    check = NodeCheck(
        cluster_as(kube, "system:serviceaccount:ml:trainer-node-check"),
        lambda: states(gpus),
        quiet_period_s=60,
        mark_reports=False,
        clock=lambda: now[0],
    )
    for now[0] in (0.0, 100.0, 10_000.0):
        line = check.once()
        assert line.startswith("node node-a: still marked;") and bad in line, line
    assert ours(kube) == ["NoSchedule"]
    # a recorded GPU that NVML no longer sees is not healthy either
    healthy_other = {u: "HEALTHY" for u in seen if u != bad}
    missing = NodeCheck(check.cluster, lambda: healthy_other, quiet_period_s=0, mark_reports=False, clock=lambda: 0.0)
    assert f"{bad} MISSING" in missing.once() and ours(kube) == ["NoSchedule"]


def test_the_node_check_command_line_untaints_after_a_zero_quiet_period(kube: KubeEmulator) -> None:
    mark(kube, H200_UUID)
    path = write_kubeconfig(
        kube.tmp / "kc-cli", kube.url, kube.token_for("system:serviceaccount:ml:trainer-node-check", node="node-a")
    )  # type: ignore[attr-defined]
    args = [
        "k8s",
        "node-check",
        "--node",
        "node-a",
        "--once",
        "--quiet-period",
        "0",
        "--replay",
        "h200",
        "--no-mark-reports",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--kubeconfig", str(path)]) == 0
    assert "removed taint gpuguard.io/unhealthy-gpu=gpuguard:NoSchedule" in out.getvalue()
    assert ours(kube) == []


def test_untaint_removes_only_gpuguard_s_marks(kube: KubeEmulator) -> None:
    mark(kube, "GPU-aaaaaaaa-0000-0000-0000-000000000001")
    guard = KubernetesActions(
        cluster_as(kube, "system:serviceaccount:ml:trainer", pod="trainer-0", taint_effect="NoExecute")
    )
    outcomes = guard.evacuate(
        device="GPU-2", state="FAILING", message="m", evidence={}, action="reschedule", exit_code=75, report=False
    )
    assert [o.outcome for o in outcomes] == ["done"], outcomes
    assert ours(kube) == ["NoSchedule", "NoExecute"]
    path = write_kubeconfig(kube.tmp / "kc-admin", kube.url, kube.token_for(ADMIN))  # type: ignore[attr-defined]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["k8s", "untaint", "node-a", "--kubeconfig", str(path)]) == 0
    node = kube.nodes["node-a"]
    assert node["spec"]["taints"] == OTHERS  # other owners' taints, same effects included, stay
    assert RECORD_ANNOTATION not in node["metadata"]["annotations"] and node["metadata"]["labels"] == {"team": "ml"}
    said = out.getvalue()
    assert said.startswith("node-a: removed taint gpuguard.io/unhealthy-gpu=gpuguard:NoSchedule; taint gpuguard.io/")
    assert "GPU-aaaaaaaa-0000-0000-0000-000000000001" in said
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["k8s", "untaint", "node-a", "--kubeconfig", str(path)]) == 0
    assert out.getvalue() == "node-a: no gpuguard mark\n"


def test_untaint_removes_a_label_mode_mark(kube: KubeEmulator) -> None:
    guard = KubernetesActions(
        cluster_as(
            kube, "system:serviceaccount:ml:trainer", pod="trainer-0", mark="label", condition=False, event=False
        )
    )
    kube.authorize(
        render(
            JobSpec(
                name="trainer",
                image="t:1",
                gpus=2,
                namespace="ml",
                kubernetes=dataclasses.replace(guard.config, kubeconfig=None),
                kubernetes_version=kube.release,
            )
        )
    )
    guard.evacuate(device="GPU-1", state="FAILING", message="m", evidence={}, action="reschedule", exit_code=75)
    assert kube.nodes["node-a"]["metadata"]["labels"] == {"team": "ml", KEY: "failing"}
    path = write_kubeconfig(kube.tmp / "kc-admin", kube.url, kube.token_for(ADMIN))  # type: ignore[attr-defined]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["k8s", "untaint", "node-a", "--kubeconfig", str(path)]) == 0
    assert kube.nodes["node-a"]["metadata"]["labels"] == {"team": "ml"}
    assert kube.nodes["node-a"]["spec"]["taints"] == OTHERS


def test_the_node_check_also_removes_gpuguard_s_device_taint_rules(server: KubeEmulator, tmp_path: Path) -> None:
    server.reset(device_taint_rules=True)
    server.add_node("node-a")
    server.add_pod("ml", "trainer-0", "node-a")
    server.tmp = tmp_path  # type: ignore[attr-defined]
    gates = {"1.34": {"DRADeviceTaints"}, "1.35": {"DRADeviceTaintRules"}, "1.36": {"DRADeviceTaintRules"}}
    spec = JobSpec(
        name="trainer",
        image="t:1",
        gpus=1,
        namespace="ml",
        kubernetes=KubernetesConfig(marker="pod"),
        kubernetes_version=server.release,
        feature_gates=frozenset(gates.get(server.release, set())),
    )
    apply(server, spec)
    pod = server.pods[("ml", "trainer-0")]
    pod["spec"]["resourceClaims"] = [{"name": "g", "resourceClaimName": "team-gpus"}]
    result = {"request": "g", "driver": "gpu.nvidia.com", "pool": "node-a", "device": "gpu-0"}
    server.claims[("ml", "team-gpus")] = {"status": {"allocation": {"devices": {"results": [result]}}}}
    devices = [{"name": "gpu-0", "attributes": {"uuid": {"string": H200_UUID}}}]
    server.slices.append(
        {"spec": {"nodeName": "node-a", "driver": "gpu.nvidia.com", "pool": {"name": "node-a"}, "devices": devices}}
    )
    someone_else = {"metadata": {"name": "vendor-maintenance", "labels": {}}, "spec": {}}
    server.taint_rules.append(someone_else)
    guard = KubernetesActions(cluster_as(server, "system:serviceaccount:ml:trainer", pod="trainer-0", dra=True))
    guard.evacuate(device=H200_UUID, state="FAILING", message="m", evidence={}, action="reschedule", exit_code=75)
    assert len(server.taint_rules) == 2 and ours(server) == ["NoSchedule"]

    user = "system:serviceaccount:ml:trainer-node-check"
    check = NodeCheck(
        cluster_as(server, user, dra=True), lambda: {H200_UUID: "HEALTHY"}, quiet_period_s=0, mark_reports=False
    )
    line = check.once()
    assert "DeviceTaintRule gpuguard-node-a-19a36126" in line, line
    assert server.taint_rules == [someone_else] and ours(server) == []
    assert server.rbac is not None
    assert server.used(user) == server.rbac.granted(user, "ml")  # get/patch nodes, list/delete rules


def test_bad_input_and_missing_permissions_are_said_in_one_line(kube: KubeEmulator) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["k8s", "node-check", "--once", "--replay", "h200", "--node", ""]) == 2
    assert "--node: '' is not valid; give the node's name, or NODE_NAME from the Downward API" in err.getvalue()
    nobody = write_kubeconfig(kube.tmp / "kc-nobody", kube.url, kube.token_for("system:serviceaccount:ml:nobody"))  # type: ignore[attr-defined]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["k8s", "untaint", "node-a", "--kubeconfig", str(nobody)]) == 2
    said = err.getvalue()
    assert said.startswith("gpuguard: error: get nodes: forbidden")
    assert 'add to the ClusterRole: {apiGroups: [""], resources: ["nodes"], verbs: ["get"]}' in said
    assert kube.nodes["node-a"]["spec"]["taints"] == OTHERS


# -- others' taints, the node agent's way in, the admission policy, readiness ----------------------


def test_a_taint_with_gpuguard_s_key_that_gpuguard_did_not_place_is_never_removed(kube: KubeEmulator) -> None:
    admin = [
        {"key": KEY, "value": "rma-ticket-1234", "effect": "NoExecute"},
        {"key": KEY, "value": "maintenance", "effect": "NoSchedule"},
    ]
    kube.nodes["node-a"]["spec"]["taints"] = [*OTHERS, *admin]
    mark(kube, H200_UUID)  # NoSchedule is someone else's there already: recorded, not duplicated
    assert kube.nodes["node-a"]["spec"]["taints"] == [*OTHERS, *admin]
    entry = json.loads(kube.nodes["node-a"]["metadata"]["annotations"][RECORD_ANNOTATION])[H200_UUID]
    assert entry["taint_owner"] == "maintenance"
    user = "system:serviceaccount:ml:trainer-node-check"
    check = NodeCheck(cluster_as(kube, user), lambda: {H200_UUID: "HEALTHY"}, quiet_period_s=0, mark_reports=False)
    assert "removed annotation gpuguard.io/unhealthy-gpus" in check.once()
    path = write_kubeconfig(kube.tmp / "kc-admin", kube.url, kube.token_for(ADMIN))  # type: ignore[attr-defined]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["k8s", "untaint", "node-a", "--kubeconfig", str(path)]) == 0
    assert out.getvalue() == "node-a: no gpuguard mark\n"
    assert kube.nodes["node-a"]["spec"]["taints"] == [*OTHERS, *admin]


def _agent_spec(kube: KubeEmulator, **settings: Any) -> JobSpec:
    config = KubernetesConfig(marker="agent", dra=False, **settings)
    return JobSpec(
        name="trainer", image="t:1", gpus=2, namespace="ml", kubernetes=config, kubernetes_version=kube.release
    )


def test_the_node_agent_marks_its_node_on_the_pod_s_report(kube: KubeEmulator) -> None:
    """The training pod holds no node rights: it reports on its own pod and waits for the agent's Event."""
    kube.reset()
    kube.add_node("node-a", taints=list(OTHERS))
    kube.add_pod("ml", "trainer-0", "node-a")
    kube.add_pod("ml", "bystander", "node-b")
    apply(kube, _agent_spec(kube))
    trainer, agent_user = "system:serviceaccount:ml:trainer", "system:serviceaccount:ml:trainer-node-check"
    guard = KubernetesActions(cluster_as(kube, trainer, pod="trainer-0", marker="agent"))
    agent = NodeCheck(cluster_as(kube, agent_user), lambda: {H200_UUID: "FAILING"}, quiet_period_s=0)
    stop = threading.Event()

    def run_agent() -> None:
        while not stop.is_set():
            agent.once()
            stop.wait(0.2)

    thread = threading.Thread(target=run_agent, daemon=True)
    thread.start()
    try:
        outcomes = guard.evacuate(
            device=H200_UUID, state="FAILING", message="XID 48", evidence={"reasons": [{"code": "XID", "evidence": {"xid": 48}}]},
            action="reschedule", exit_code=75,
        )  # fmt: skip
    finally:
        stop.set()
        thread.join(10)
    done = {o.action: o for o in outcomes}
    assert done["node-taint"].outcome == "done" and "marked by the node agent" in done["node-taint"].detail, outcomes
    assert ours(kube) == ["NoSchedule"]
    entry = json.loads(kube.nodes["node-a"]["metadata"]["annotations"][RECORD_ANNOTATION])[H200_UUID]
    assert (entry["pod"], entry["reasons"]) == ("ml/trainer-0", ["XID 48"])
    (answer,) = [e for e in kube.events if e["reason"] == "GPUNodeMarked"]
    assert answer["regarding"]["name"] == "trainer-0" and H200_UUID in answer["note"]
    assert agent.ready and "still marked" in agent.once()  # answered once, not again
    assert len([e for e in kube.events if e["reason"] == "GPUNodeMarked"]) == 1
    assert kube.rbac is not None
    assert not {r for r in kube.used(trainer) if r[1] == "nodes"}  # the pod never touched a node
    assert kube.used(trainer) <= kube.rbac.granted(trainer, "ml")
    assert {("", "pods", "list"), ("", "nodes", "patch"), ("events.k8s.io", "events", "create")} <= kube.used(
        agent_user
    )
    assert kube.used(agent_user) <= kube.rbac.granted(agent_user, "ml")


def test_without_the_agent_the_mark_is_not_confirmed_and_the_pod_says_so(kube: KubeEmulator) -> None:
    kube.reset()
    kube.add_node("node-a")
    kube.add_pod("ml", "trainer-0", "node-a")
    apply(kube, _agent_spec(kube))
    guard = KubernetesActions(
        cluster_as(kube, "system:serviceaccount:ml:trainer", pod="trainer-0", marker="agent", deadline_s=1.5)
    )
    outcomes = guard.evacuate(
        device=H200_UUID, state="FAILING", message="m", evidence={}, action="reschedule", exit_code=75
    )
    taint = next(o for o in outcomes if o.action == "node-taint")
    assert taint.outcome == "failed" and "is the node-check DaemonSet running on that node?" in taint.detail
    assert kube.nodes["node-a"]["spec"]["taints"] == []
    report = json.loads(kube.pods[("ml", "trainer-0")]["metadata"]["annotations"][RECORD_ANNOTATION])
    assert report[H200_UUID]["state"] == "FAILING"  # the report is there for the agent when it comes


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("another-node", "gpuguard may mark only the node its pod runs on"),
        ("others-taint", "gpuguard may add or remove only its own taint"),
        ("cordon", "gpuguard may not cordon a node"),
        ("label", "gpuguard may change only its label"),
    ],
)
def test_the_admission_policy_keeps_node_patches_to_the_own_node_and_gpuguard_s_marks(
    kube: KubeEmulator, change: str, message: str
) -> None:
    """RBAC cannot say "my node": the generated ValidatingAdmissionPolicy does (real CEL, per patch)."""
    from kubernetes import client

    cluster = cluster_as(
        kube,
        "system:serviceaccount:ml:trainer",
        pod="trainer-0",
        node="node-b" if change == "another-node" else "node-a",
    )
    node = kube.nodes["node-a"]
    patch: dict[str, Any] = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}}
    if change in ("another-node", "others-taint"):
        keep = [] if change == "others-taint" else list(OTHERS)
        patch["spec"] = {"taints": [*keep, {"key": KEY, "value": "gpuguard", "effect": "NoSchedule"}]}
    elif change == "cordon":
        patch["spec"] = {"unschedulable": True}
    else:
        patch["metadata"]["labels"] = {"team": "hijacked"}
    with pytest.raises(KubernetesError) as caught:
        cluster.call("patch", "nodes", client.CoreV1Api(cluster.api).patch_node, "node-a", patch,
                     _content_type="application/strategic-merge-patch+json")  # fmt: skip
    assert caught.value.status == 422 and message in str(caught.value)
    assert kube.nodes["node-a"]["spec"]["taints"] == OTHERS and node["metadata"]["labels"] == {"team": "ml"}


def test_a_node_check_that_sees_no_gpu_is_not_ready(kube: KubeEmulator, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from gpuguard.k8s.node_agent import serve_readiness

    user = "system:serviceaccount:ml:trainer-node-check"
    gpus: dict[str, str] = {}
    check = NodeCheck(cluster_as(kube, user), lambda: dict(gpus), quiet_period_s=0, mark_reports=False)
    server = serve_readiness(0, check)
    url = f"http://127.0.0.1:{server.server_address[1]}/readyz"
    try:
        assert check.once() == "node node-a: no gpuguard mark; no GPU visible" and not check.ready
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url, timeout=5)
        assert caught.value.code == 503 and b"no GPU visible" in caught.value.read()
        gpus[H200_UUID] = "HEALTHY"
        check.once()
        assert urllib.request.urlopen(url, timeout=5).read() == b"ok\n"
    finally:
        server.shutdown()
        server.server_close()
    # the command line: --once without a GPU exits 1 (not ready), where it used to exit 0 every cycle
    path = write_kubeconfig(tmp_path / "kc-agent", kube.url, kube.token_for(user, node="node-a"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["k8s", "node-check", "--node", "node-a", "--once", "--no-mark-reports", "--kubeconfig", str(path)])
    assert code == 1 and "node check not ready: no GPU visible" in err.getvalue()


def test_the_node_agent_s_entry_point_needs_no_torch(tmp_path: Path) -> None:
    """Its image can be small: python -m gpuguard.k8s.node_agent runs with torch unimportable (one
    release: the subprocess is what is tested)."""
    import subprocess
    import sys

    kube = KubeEmulator(release="1.37")
    kube.url = kube.start()  # type: ignore[attr-defined]
    try:
        kube.tmp = tmp_path  # type: ignore[attr-defined]
        kube.add_node("node-a", taints=list(OTHERS))
        kube.add_pod("ml", "trainer-0", "node-a")
        marker_pod = KubernetesConfig(marker="pod")
        apply(kube, JobSpec(name="trainer", image="t:1", gpus=2, namespace="ml", kubernetes=marker_pod))
        mark(kube, H200_UUID)
        token = kube.token_for("system:serviceaccount:ml:trainer-node-check", node="node-a")
        path = write_kubeconfig(tmp_path / "kc-agent", kube.url, token)
        code = (
            "import sys; sys.modules['torch'] = None; from gpuguard.k8s.node_agent import main; "
            f"sys.exit(main(['--node', 'node-a', '--once', '--quiet-period', '0', '--replay', 'h200', "
            f"'--no-mark-reports', '--kubeconfig', {str(path)!r}]))"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert "removed taint gpuguard.io/unhealthy-gpu=gpuguard:NoSchedule" in result.stdout
        assert ours(kube) == []
    finally:
        kube.stop()


def test_the_node_agent_creates_the_device_taint_rule_the_pod_found(server: KubeEmulator, tmp_path: Path) -> None:
    """DRA under least privilege: the pod finds its device (claims, slices: reads) and reports it; the
    agent creates the DeviceTaintRule (the pod has no devicetaintrules create)."""
    server.reset(device_taint_rules=True)
    server.add_node("node-a")
    server.add_pod("ml", "trainer-0", "node-a")
    server.tmp = tmp_path  # type: ignore[attr-defined]
    gates = {"1.34": {"DRADeviceTaints"}, "1.35": {"DRADeviceTaintRules"}, "1.36": {"DRADeviceTaintRules"}}
    config = KubernetesConfig(marker="agent")
    spec = JobSpec(name="trainer", image="t:1", gpus=1, namespace="ml", kubernetes=config,
                   kubernetes_version=server.release, feature_gates=frozenset(gates.get(server.release, set())))  # fmt: skip
    apply(server, spec)
    server.pods[("ml", "trainer-0")]["spec"]["resourceClaims"] = [{"name": "g", "resourceClaimName": "team-gpus"}]
    result = {"request": "g", "driver": "gpu.nvidia.com", "pool": "node-a", "device": "gpu-0"}
    server.claims[("ml", "team-gpus")] = {"status": {"allocation": {"devices": {"results": [result]}}}}
    devices = [{"name": "gpu-0", "attributes": {"uuid": {"string": H200_UUID}}}]
    server.slices.append(
        {"spec": {"nodeName": "node-a", "driver": "gpu.nvidia.com", "pool": {"name": "node-a"}, "devices": devices}}
    )
    trainer, agent_user = "system:serviceaccount:ml:trainer", "system:serviceaccount:ml:trainer-node-check"
    guard = KubernetesActions(cluster_as(server, trainer, pod="trainer-0", marker="agent", dra=True))
    agent = NodeCheck(cluster_as(server, agent_user, dra=True), lambda: {H200_UUID: "FAILING"}, quiet_period_s=0)
    stop = threading.Event()
    thread = threading.Thread(
        target=lambda: [agent.once() or stop.wait(0.2) for _ in iter(stop.is_set, True)], daemon=True
    )
    thread.start()
    try:
        outcomes = guard.evacuate(
            device=H200_UUID, state="FAILING", message="m", evidence={}, action="reschedule", exit_code=75
        )
    finally:
        stop.set()
        thread.join(10)
    assert {o.action: o.outcome for o in outcomes}["node-taint"] == "done", outcomes
    (rule,) = server.taint_rules
    assert rule["spec"]["deviceSelector"] == {"driver": "gpu.nvidia.com", "pool": "node-a", "device": "gpu-0"}
    assert [r.user for r in server.received("POST", r"/devicetaintrules$")] == [agent_user]
    assert ours(server) == ["NoSchedule"]
    assert server.rbac is not None and server.used(trainer) <= server.rbac.granted(trainer, "ml")
