"""The taint's life against the emulated API server: gpuguard marks a node, and gives it back.

The node check and ``gpuguard k8s untaint`` run under the RBAC that ``gpuguard k8s manifests``
generates (the node check's own ClusterRole), on every release profile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.kube_emulator import ADMIN, KubeEmulator, write_kubeconfig
from helpers.kube_rules import RELEASES

from gpuguard import HealthConfig, HealthMonitor
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


@pytest.fixture
def kube(server: KubeEmulator, tmp_path: Path) -> KubeEmulator:
    server.reset()
    server.add_node("node-a", taints=list(OTHERS))
    server.nodes["node-a"]["metadata"]["labels"] = {"team": "ml"}
    server.add_pod("ml", "trainer-0", "node-a")
    server.authorize(
        render(JobSpec(name="trainer", image="t:1", gpus=2, namespace="ml", kubernetes_version=server.release))
    )
    server.tmp = tmp_path  # type: ignore[attr-defined]
    return server


def cluster_as(kube: KubeEmulator, user: str, *, pod: str = "", **settings: Any) -> Any:
    path = write_kubeconfig(kube.tmp / f"kc-{len(kube.tokens)}", kube.url, kube.token_for(user))  # type: ignore[attr-defined]
    env = {"POD_NAME": pod, "POD_NAMESPACE": "ml", "NODE_NAME": "node-a", "POD_UID": f"uid-{pod}"}
    config = KubernetesConfig(kubeconfig=str(path), **{"dra": False, **settings})
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
    return [t["effect"] for t in kube.nodes["node-a"]["spec"]["taints"] if t["key"] == KEY]


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
        clock=lambda: now[0],
    )
    assert check.once() == "node node-a: GPUs healthy for 0s of 600s"
    now[0] = 599.0
    assert "healthy for 599s of 600s" in check.once() and ours(kube) == ["NoSchedule"]
    now[0] = 600.0
    line = check.once()
    assert line.startswith("node node-a: GPUs healthy for 600s; removed taint gpuguard.io/unhealthy-gpu:NoSchedule")
    assert all(u in line for u in uuids)
    node = kube.nodes["node-a"]
    assert node["spec"]["taints"] == OTHERS and RECORD_ANNOTATION not in node["metadata"]["annotations"]
    assert node["metadata"]["labels"] == {"team": "ml"}
    assert check.once() == "node node-a: no gpuguard mark"
    # under the node check's own ClusterRole: nodes get and patch (and, where DRA is on, the rules' list)
    assert kube.rbac is not None
    user = "system:serviceaccount:ml:trainer-node-check"
    assert {("", "nodes", "get"), ("", "nodes", "patch")} <= kube.used(user) <= kube.rbac.granted(user, "ml")


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
        clock=lambda: now[0],
    )
    for now[0] in (0.0, 100.0, 10_000.0):
        line = check.once()
        assert line.startswith("node node-a: still marked;") and bad in line, line
    assert ours(kube) == ["NoSchedule"]
    # a recorded GPU that NVML no longer sees is not healthy either
    healthy_other = {u: "HEALTHY" for u in seen if u != bad}
    missing = NodeCheck(check.cluster, lambda: healthy_other, quiet_period_s=0, clock=lambda: 0.0)
    assert f"{bad} MISSING" in missing.once() and ours(kube) == ["NoSchedule"]


def test_the_node_check_command_line_untaints_after_a_zero_quiet_period(kube: KubeEmulator) -> None:
    mark(kube, H200_UUID)
    path = write_kubeconfig(
        kube.tmp / "kc-cli", kube.url, kube.token_for("system:serviceaccount:ml:trainer-node-check")
    )  # type: ignore[attr-defined]
    args = ["k8s", "node-check", "--node", "node-a", "--once", "--quiet-period", "0", "--replay", "h200"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, "--kubeconfig", str(path)]) == 0
    assert "removed taint gpuguard.io/unhealthy-gpu:NoSchedule" in out.getvalue()
    assert ours(kube) == []


def test_untaint_removes_only_gpuguard_s_marks(kube: KubeEmulator) -> None:
    mark(kube, "GPU-aaaaaaaa-0000-0000-0000-000000000001")
    mark(kube, "GPU-aaaaaaaa-0000-0000-0000-000000000002", state="DEGRADED")
    assert ours(kube) == ["NoSchedule", "PreferNoSchedule"]
    path = write_kubeconfig(kube.tmp / "kc-admin", kube.url, kube.token_for(ADMIN))  # type: ignore[attr-defined]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["k8s", "untaint", "node-a", "--kubeconfig", str(path)]) == 0
    node = kube.nodes["node-a"]
    assert node["spec"]["taints"] == OTHERS  # other owners' taints, same effects included, stay
    assert RECORD_ANNOTATION not in node["metadata"]["annotations"] and node["metadata"]["labels"] == {"team": "ml"}
    said = out.getvalue()
    assert said.startswith("node-a: removed taint gpuguard.io/unhealthy-gpu:NoSchedule; taint gpuguard.io/")
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
        kubernetes_version=server.release,
        feature_gates=frozenset(gates.get(server.release, set())),
    )
    server.authorize(render(spec))
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
    check = NodeCheck(cluster_as(server, user, dra=True), lambda: {H200_UUID: "HEALTHY"}, quiet_period_s=0)
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
