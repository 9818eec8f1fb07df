"""Verdicts follow the hardware: each rule clears the way the hardware clears it, without a restart.

A scenario step's ``until`` is the GPU reset (gpuguard/fakenvml: a volatile counter is back to 0, a lost
GPU answers again). The long-running cases use the monitor's own threads; the node check untaints
after the quiet period against the emulated API server, as the DaemonSet runs it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.kube_emulator import KubeEmulator, write_kubeconfig
from helpers.watching import settle, wait_for, watching

from gpuguard import HealthConfig, HealthMonitor, HealthState
from gpuguard.fakenvml import FakeNvml, play
from gpuguard.k8s import JobSpec, KubernetesActions, KubernetesConfig, connect, render
from gpuguard.k8s.node_check import NodeCheck

H, D, F, L, U = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.FAILING, HealthState.LOST, HealthState.UNKNOWN


def step(**values: Any) -> dict[str, Any]:
    return {"at": 1.0, "gpu": 0, "until": 5.0, **values}


# (id, steps, scenario extras, state while faulted, reason code, how it clears)
CLEARING = [
    ("dbe-counter", [step(field="ecc_dbe_volatile", set=2)], {}, F, "ECC_DBE_VOLATILE", "ecc_dbe_volatile reads 0"),
    ("remap-pending", [step(field="remap_pending", set=1)], {}, D, "ROW_REMAP_PENDING", "remap_pending reads 0"),
    ("remap-failure", [step(field="remap_failure", set=1)], {}, F, "ROW_REMAP_FAILURE", "remap_failure reads 0"),
    (
        "recovery-action",
        [step(field="recovery_action", set="GPU_RESET")],
        {},
        F,
        "RECOVERY_ACTION",
        "recovery action reads NONE",
    ),
    ("nvlink-down", [step(field="nvlink_down", set=3)], {"nvlink_links": 4}, F, "NVLINK_DOWN", "every NVLink reads up"),
    (
        "fabric-failed",
        [step(field="fabric_status", set=999)],
        {"nvlink_links": 4},
        F,
        "FABRIC_REGISTRATION_FAILED",
        "fabric registration reads COMPLETED",
    ),
    ("reset-required", [step(error="ResetRequired")], {}, F, "GPU_RESET_REQUIRED", "answers NVML normally again"),
    ("lost", [step(lost=True)], {}, L, "GPU_LOST", "answers NVML again"),
    ("xid-48", [step(xid=48)], {}, F, "XID", "GPU reset is seen after it"),
    ("xid-79", [step(xid=79)], {}, L, "XID", "GPU reset is seen after it"),
    ("event-dbe", [step(event="double_bit_ecc")], {}, F, "ECC_DBE_VOLATILE", "GPU reset is seen after it"),
    ("event-unavailable", [step(event="gpu_unavailable")], {}, L, "GPU_LOST", "GPU reset is seen after it"),
]


@pytest.mark.parametrize(
    ("steps", "extra", "state", "code", "clears"), [c[1:] for c in CLEARING], ids=[c[0] for c in CLEARING]
)
def test_each_hard_verdict_clears_when_the_hardware_does(
    make_monitor: Any, steps: list[dict[str, Any]], extra: dict[str, Any], state: HealthState, code: str, clears: str
) -> None:
    monitor = make_monitor({"gpus": 1, "events": steps, **extra})
    during = play(monitor, 4).devices[0]
    assert during.state is state
    assert any(clears in r.clears for r in during.reasons if r.code == code), during.reasons
    # the reset at 5 s: the next reads show it, and nothing held before it survives
    after = play(monitor, 7).devices[0]
    assert (after.state, after.reasons) == (H, ())


def test_an_xid_without_evidence_of_its_own_is_held_then_clears(make_monitor: Any) -> None:
    # XID 119 (GSP timeout) moves no counter: it is held xid_hold_s after the last one, then over
    events = [{"at": 1.0, "gpu": 0, "xid": 119}, {"at": 50.0, "gpu": 0, "xid": 119}]
    monitor = make_monitor({"gpus": 1, "events": events}, xid_hold_s=60.0)
    assert play(monitor, 40).devices[0].state is F
    held = play(monitor, 100).devices[0]
    assert held.state is F and held.reasons[0].evidence["count"] == 2  # the second one restarted the hold
    assert held.reasons[0].since == 1.0
    cleared = play(monitor, 111).devices[0]
    assert (cleared.state, cleared.reasons) == (H, ())
    assert "60s after the last one" in held.reasons[0].clears


def test_lifetime_counters_keep_what_an_xid_brought_after_the_reset(make_monitor: Any) -> None:
    monitor = make_monitor({"gpus": 1, "events": [step(xid=48)]})
    assert play(monitor, 4).devices[0].readings["ecc_dbe_aggregate"] == 1
    after = play(monitor, 7).devices[0]
    assert (after.readings["ecc_dbe_volatile"], after.readings["ecc_dbe_aggregate"]) == (0, 1)


def test_a_long_running_monitor_sees_a_gpu_fail_get_reset_and_return_to_healthy() -> None:
    seen: list[tuple[int, HealthState]] = []
    scenario = {"gpus": 2, "events": [{"at": 1.0, "gpu": 1, "xid": 48, "until": 3.0}]}
    with watching(scenario) as (fake, monitor):
        monitor.subscribe(lambda change: seen.append((change.current.index, change.current.state)))
        settle(monitor)
        fake.clock.set(1.0)
        # the event thread brings the XID, the poll thread the count that comes with it
        failing = wait_for(monitor, lambda s: len(s.devices[1].reasons) == 2).devices[1]
        assert failing.state is F and {r.code for r in failing.reasons} == {"XID", "ECC_DBE_VOLATILE"}
        assert failing.readings["ecc_dbe_volatile"] == 1
        fake.clock.set(3.0)  # the GPU reset
        healthy = wait_for(monitor, lambda s: s.devices[1].state is H).devices[1]
        assert healthy.reasons == () and healthy.readings["ecc_dbe_volatile"] == 0
        assert monitor.snapshot().devices[0].state is H
    ones = [state for index, state in seen if index == 1]
    assert ones[0] is F and ones[-1] is H and H not in ones[:-1]


def test_status_watch_shows_the_gpu_return_to_healthy(cli: Any, tmp_path: Path) -> None:
    scenario = tmp_path / "reset.json"
    events = [{"at": 0.5, "gpu": 1, "field": "remap_pending", "set": 1, "until": 2.0}]
    scenario.write_text(json.dumps({"gpus": 2, "events": events}))
    result = cli("status", "--scenario", str(scenario), "--watch", "0.2", "--count", "15", "--json")
    assert result.returncode == 0, result.stderr
    states = [json.loads(line)["devices"][1]["state"] for line in result.stdout.splitlines()]
    first_bad = states.index("DEGRADED")
    assert states[:first_bad] == ["HEALTHY"] * first_bad and first_bad > 0
    assert states[-1] == "HEALTHY" and "HEALTHY" in states[first_bad:]


# -- the node check -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[KubeEmulator]:
    emulator = KubeEmulator(release="1.36")
    emulator.url = emulator.start()  # type: ignore[attr-defined]
    yield emulator
    emulator.stop()


def cluster_as(kube: KubeEmulator, tmp_path: Path, user: str, pod: str = "") -> Any:
    path = write_kubeconfig(tmp_path / f"kc-{user.rsplit(':', 1)[-1]}", kube.url, kube.token_for(user))  # type: ignore[attr-defined]
    env = {"POD_NAME": pod, "POD_NAMESPACE": "ml", "NODE_NAME": "node-a", "POD_UID": f"uid-{pod}"}
    # generous deadlines: marking the node is this test's setup, and a loaded machine must not skip it
    config = KubernetesConfig(kubeconfig=str(path), dra=False, marker="pod", deadline_s=120.0, request_timeout_s=60.0)
    cluster = connect(config, env=env, need_pod=bool(pod))
    assert cluster is not None
    return cluster


def test_a_long_running_node_check_untaints_after_the_gpu_is_reset(server: KubeEmulator, tmp_path: Path) -> None:
    server.reset()
    server.add_node("node-a")
    server.add_pod("ml", "trainer-0", "node-a")
    # the training pod marks its node itself here (marker "pod"): this test is about the node check's way back
    pod_marks = KubernetesConfig(marker="pod")
    server.authorize(
        render(
            JobSpec(
                name="trainer", image="t:1", gpus=2, namespace="ml", kubernetes=pod_marks, kubernetes_version="1.36"
            )
        )
    )
    scenario = {"gpus": 2, "events": [{"at": 1.0, "gpu": 1, "xid": 48, "until": 3.0}]}
    fake = FakeNvml.from_scenario(scenario)
    config = HealthConfig(poll_interval_s=0.02, event_wait_s=0.05)
    with HealthMonitor(fake, config, devices="all") as monitor:
        fake.clock.set(1.0)
        bad = wait_for(monitor, lambda s: s.devices[1].state is F).devices[1]
        trainer = KubernetesActions(cluster_as(server, tmp_path, "system:serviceaccount:ml:trainer", "trainer-0"))
        outcomes = trainer.evacuate(
            device=bad.uuid,
            state="FAILING",
            message="XID 48",
            evidence={},
            action="reschedule",
            exit_code=75,
            report=False,
        )
        assert [o.outcome for o in outcomes] == ["done"], outcomes
        now = [0.0]
        check = NodeCheck(
            cluster_as(server, tmp_path, "system:serviceaccount:ml:trainer-node-check"),
            lambda: monitor.snapshot().states(),  # what the node check reads: the threaded monitor's verdicts
            quiet_period_s=60,
            mark_reports=False,  # marker "pod": the agent only gives the node back
            clock=lambda: now[0],
        )
        assert check.once().startswith("node node-a: still marked;")
        fake.clock.set(3.0)  # the GPU reset
        wait_for(monitor, lambda s: s.worst is H)
        assert check.once() == "node node-a: GPUs healthy for 0s of 60s"
        now[0] = 60.0
        assert check.once().startswith("node node-a: GPUs healthy for 60s; removed taint gpuguard.io/unhealthy-gpu")
    assert not [
        t for t in server.nodes["node-a"]["spec"].get("taints") or [] if t["key"] == "gpuguard.io/unhealthy-gpu"
    ]


def test_snapshot_states_name_every_gpu(make_monitor: Any) -> None:
    monitor = make_monitor({"gpus": 2, "events": [{"at": 0, "gpu": 1, "lost": True}]})
    states = monitor.snapshot().states()
    assert list(states.values()) == ["HEALTHY", "LOST"]
    assert list(states)[1] == "index 1"  # lost at start: no UUID, no PCI bus id
