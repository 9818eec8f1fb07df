"""Real NVML failure modes (nvml.h's documented return codes), played by the fake and judged end to end.

Each case goes through `gpuguard status` in a fresh process and, where it involves timing, through the
monitor's own threads (generous deadlines guard against hangs; nothing asserts on speed).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gpuguard import HealthConfig, HealthMonitor, HealthSnapshot, HealthState, Remedy
from gpuguard.fakenvml import FakeNvml, play

from conftest import ROOT

H, D, F, L, U = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.FAILING, HealthState.LOST, HealthState.UNKNOWN
HANG_GUARD_S = 30.0


def write(tmp_path: Path, scenario: dict[str, Any]) -> str:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario))
    return str(path)


def status(cli: Any, path: str, *args: str, at: str = "0") -> tuple[int, dict[str, Any], str]:
    result = cli("status", "--scenario", path, "--at", at, "--json", *args)
    return result.returncode, json.loads(result.stdout), result.stderr


def wait_for(monitor: HealthMonitor, predicate: Any) -> HealthSnapshot:
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate(monitor.snapshot()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {monitor.snapshot().to_dict()}")
        time.sleep(0.02)
    return monitor.snapshot()


# -- a GPU that cannot be opened ------------------------------------------------------------------


def test_gpu_lost_at_start_is_an_entry_of_its_own(cli: Any, tmp_path: Path) -> None:
    path = write(tmp_path, {"gpus": 2, "events": [{"at": 0, "gpu": 1, "lost": True}]})
    code, out, _ = status(cli, path, "--check")
    assert code == 1  # fail-open must not pass a node with a GPU off the bus
    (healthy, lost) = out["devices"]
    assert (healthy["index"], healthy["state"]) == (0, "HEALTHY")
    assert (lost["index"], lost["uuid"], lost["state"]) == (1, "", "LOST")
    assert lost["reasons"][0]["code"] == "GPU_LOST"
    assert lost["reasons"][0]["evidence"]["call"] == "nvmlDeviceGetHandleByIndex"


def test_gpu_whose_uuid_is_lost_is_named_by_pci_bus_id(cli: Any, tmp_path: Path) -> None:
    event = {"at": 0, "gpu": 1, "error": "GpuIsLost", "call": "nvmlDeviceGetUUID"}
    code, out, _ = status(cli, write(tmp_path, {"gpus": 2, "events": [event]}), "--check")
    assert code == 1
    lost = out["devices"][1]
    assert (lost["index"], lost["uuid"], lost["pci_bus_id"], lost["state"]) == (1, "", "00000000:01:06.0", "LOST")


def test_a_denied_gpu_is_skipped_and_the_others_watched(cli: Any, tmp_path: Path) -> None:
    # nvmlDeviceGetCount counts a GPU the container's cgroup denies; opening it answers NO_PERMISSION.
    events = [
        {"at": 0, "gpu": 1, "error": "NoPermission", "call": "nvmlDeviceGetHandleByIndex"},
        {"at": 0, "gpu": 2, "field": "ecc_dbe_volatile", "set": 1},
    ]
    code, out, _ = status(cli, write(tmp_path, {"gpus": 3, "events": events}), "--check")
    assert [(d["index"], d["state"]) for d in out["devices"]] == [(0, "HEALTHY"), (2, "FAILING")]
    assert code == 1
    (note,) = out["skipped"]
    assert note.startswith("GPU 1: skipped, NVML denies access")
    table = cli("status", "--scenario", write(tmp_path, {"gpus": 2, "events": events[:1]}), "--at", "0")
    assert table.returncode == 0
    assert "GPU 1: skipped, NVML denies access" in table.stderr


def test_reset_required_at_open_is_failing(cli: Any, tmp_path: Path) -> None:
    event = {"at": 0, "gpu": 0, "error": "ResetRequired", "call": "nvmlDeviceGetHandleByIndex"}
    code, out, _ = status(cli, write(tmp_path, {"gpus": 2, "events": [event]}), "--check")
    assert code == 1
    reason = out["devices"][0]["reasons"][0]
    assert (out["devices"][0]["state"], reason["code"], reason["remedy"]) == (
        "FAILING",
        "GPU_RESET_REQUIRED",
        "RESET_GPU",
    )
    assert out["devices"][1]["state"] == "HEALTHY"


def test_a_gpu_that_cannot_be_opened_otherwise_is_unknown(cli: Any, tmp_path: Path) -> None:
    event = {"at": 0, "gpu": 1, "error": "Unknown", "call": "nvmlDeviceGetHandleByIndex"}
    path = write(tmp_path, {"gpus": 2, "events": [event]})
    code, out, _ = status(cli, path, "--check")
    assert [d["state"] for d in out["devices"]] == ["HEALTHY", "UNKNOWN"]
    assert code == 0  # fail-open: UNKNOWN passes
    assert status(cli, path, "--check", "--fail-closed")[0] == 1


# -- a call that fails ----------------------------------------------------------------------------


# Only these two switch a signal off (NO_PERMISSION and the others leave it unreadable and retried:
# tests/test_health_blind_spots.py).
@pytest.mark.parametrize("error", ["FunctionNotFound", "NotSupported"])
def test_a_denied_call_switches_off_that_signal_only(make_monitor: Any, error: str) -> None:
    events = [
        {"at": 0, "gpu": 0, "error": error, "call": "nvmlDeviceGetCurrentClocksEventReasons"},
        {"at": 2, "gpu": 0, "field": "ecc_dbe_volatile", "set": 1},
        {"at": 2, "gpu": 0, "field": "remapped_uncorrectable", "set": 3},
    ]
    monitor = make_monitor({"gpus": 1, "events": events})
    assert monitor.snapshot().devices[0].state is H
    device = play(monitor, 3).devices[0]
    assert "clock_events" in device.signals_off
    assert "clock_events" not in device.readings
    assert device.readings["remapped_uncorrectable"] == 3
    assert device.readings["temperature"] == 35
    assert (device.state, device.reasons[0].code) == (F, "ECC_DBE_VOLATILE")


def test_reset_required_on_calls_is_failing(make_monitor: Any) -> None:
    monitor = make_monitor({"gpus": 2, "events": [{"at": 2, "gpu": 1, "error": "ResetRequired"}]})
    snapshot = play(monitor, 3)
    assert [d.state for d in snapshot.devices] == [H, F]
    reason = snapshot.devices[1].reasons[0]
    assert (reason.code, reason.remedy) == ("GPU_RESET_REQUIRED", Remedy.RESET_GPU)


def test_a_gpu_whose_reads_all_fail_is_unknown_in_a_one_shot_status(cli: Any, tmp_path: Path) -> None:
    calls = [
        "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetCurrPcieLinkWidth",
        "nvmlDeviceGetUtilizationRates",
    ]
    events = [{"at": 0, "gpu": 0, "error": "Unknown", "call": c} for c in calls]
    path = write(tmp_path, {"gpus": 1, "events": events})
    code, out, _ = status(cli, path, "--check", "--fail-closed")
    assert code == 1
    (device,) = out["devices"]
    assert (device["state"], device["reasons"][0]["code"]) == ("UNKNOWN", "NVML_UNRESPONSIVE")
    assert "nvmlDeviceGetFieldValues" in device["reasons"][0]["message"]
    assert status(cli, path, "--check")[0] == 0


def test_one_failing_call_among_answering_ones_keeps_the_gpu_watched(make_monitor: Any) -> None:
    events = [{"at": 0, "gpu": 0, "error": "Unknown", "call": "nvmlDeviceGetTemperature"}]
    monitor = make_monitor({"gpus": 1, "events": events})
    device = play(monitor, 10).devices[0]
    assert device.state is H
    assert "temperature" not in device.readings
    assert device.readings["ecc_dbe_volatile"] == 0


# -- events ---------------------------------------------------------------------------------------


def test_a_failed_event_registration_leaves_the_other_gpus_events(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gpuguard.health")
    # nvml.h, nvmlDeviceRegisterEvents: UNKNOWN "on any unexpected error" — GPU 0's XIDs cannot be seen
    # until a retry (each poll) registers it; GPU 1's events flow meanwhile.
    scenario = {
        "gpus": 2,
        "events": [
            {"at": 0, "gpu": 0, "error": "Unknown", "call": "nvmlDeviceRegisterEvents", "until": 0.6},
            {"at": 0.3, "gpu": 1, "xid": 79},
        ],
    }
    fake = FakeNvml.from_scenario(scenario, realtime=True)
    config = HealthConfig(poll_interval_s=0.2, event_wait_s=0.2)
    with HealthMonitor(fake, config, devices="all") as monitor:
        blind = monitor.snapshot().devices[0]
        assert (blind.state, blind.reasons[0].code) == (U, "SIGNAL_UNREADABLE")
        assert "nvmlDeviceRegisterEvents" in blind.signals_unreadable["events"]
        assert any(t.name == "gpuguard-nvml-events" for t in threading.enumerate())
        snapshot = wait_for(monitor, lambda s: s.devices[1].state is L and s.devices[0].state is H)
        # the XID reason exists only through the event thread (polls see the lost GPU, not the XID)
        (xid,) = [r for r in snapshot.devices[1].reasons if r.code == "XID"]
        assert xid.evidence["xid"] == 79
        assert "events" not in snapshot.devices[0].signals_off
        assert snapshot.devices[0].signals_unreadable == {}
    notices = [r.getMessage() for r in caplog.records if "registering NVML events failed" in r.getMessage()]
    assert len(notices) == 1 and "GPU 0" in notices[0] and "retried" in notices[0]


def test_an_event_wait_that_answers_gpu_is_lost_marks_that_gpu_and_keeps_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scenario = {
        "gpus": 3,
        "events": [
            {"at": 0.2, "gpu": 1, "error": "GpuIsLost", "call": "nvmlEventSetWait_v2"},
            {"at": 0.8, "gpu": 2, "xid": 48},
        ],
    }
    fake = FakeNvml.from_scenario(scenario, realtime=True)
    config = HealthConfig(poll_interval_s=600.0, event_wait_s=0.2)
    with HealthMonitor(fake, config, devices="all") as monitor:
        # the XID reaches GPU 2 through the event thread, past GPU 1's lost wait (its ECC count may be read first)
        snapshot = wait_for(monitor, lambda s: any(r.code == "XID" for r in s.devices[2].reasons))
        assert [d.state for d in snapshot.devices] == [H, L, F]
        lost = snapshot.devices[1].reasons[0]
        assert (lost.code, lost.evidence["call"]) == ("GPU_LOST", "nvmlEventSetWait_v2")
        # XID 48 comes with a double-bit ECC count: the XID is among the reasons, whichever leads
        assert [r.evidence["xid"] for r in snapshot.devices[2].reasons if r.code == "XID"] == [48]
        # the event thread did not back off for everyone: no wait error was recorded
        assert not [e for e in monitor.errors if "waiting for NVML events" in e]
    # the lost GPU is not registered again at once (each rebuild of the set is a moment in which the
    # others' events go nowhere): one GPU_IS_LOST answer, not one per poll it wakes
    assert len([r for r in caplog.records if "answered GPU_IS_LOST" in r.getMessage()]) == 1


def test_a_lost_gpu_fails_the_event_wait_and_the_manual_clock_handles_it(make_monitor: Any) -> None:
    events = [{"at": 1, "gpu": 0, "lost": True}, {"at": 2, "gpu": 1, "xid": 48}]
    monitor = make_monitor({"gpus": 2, "events": events})
    snapshot = play(monitor, 3)
    assert [d.state for d in snapshot.devices] == [L, F]


# -- NVLink ---------------------------------------------------------------------------------------


def test_an_nvlink_down_at_start_is_failing_and_named(cli: Any, tmp_path: Path) -> None:
    scenario = {"gpus": 2, "nvlink_links": 18, "events": [{"at": 0, "gpu": 1, "field": "nvlink_down", "set": 7}]}
    code, out, _ = status(cli, write(tmp_path, scenario), "--check")
    assert code == 1
    healthy, failing = out["devices"]
    assert healthy["state"] == "HEALTHY" and healthy["readings"]["nvlink_down"] == 0
    reason = failing["reasons"][0]
    assert (failing["state"], reason["code"], reason["evidence"]["links_down"]) == ("FAILING", "NVLINK_DOWN", [7])
    assert "7" in reason["message"]
    assert reason["evidence"]["nvlink_links"] == 18


def test_nvlink_replay_and_recovery_errors_fail_at_dcgm_s_rate(make_monitor: Any) -> None:
    # DCGM's NVLink rules: replay or recovery errors at 1 per minute fail the GPU.
    events = [
        {"at": 10, "gpu": 0, "field": "nvlink_replay_errors", "add": 1},
        {"at": 40, "gpu": 0, "field": "nvlink_recovery_errors", "add": 1},
    ]
    monitor = make_monitor({"gpus": 1, "nvlink_links": 18, "events": events})
    assert play(monitor, 9).devices[0].state is H
    device = play(monitor, 11).devices[0]
    assert device.state is F
    assert device.reasons[0].code == "NVLINK_REPLAY_RECOVERY"
    assert device.reasons[0].evidence["errors"] == 1


def test_nvlink_crc_errors_warn_then_fail_at_dcgm_s_rates(make_monitor: Any) -> None:
    slow = make_monitor({"gpus": 1, "nvlink_links": 4, "events": [field_event("nvlink_crc_flit_errors", add=2)]})
    assert {r.code: r.state for r in play(slow, 5).devices[0].reasons} == {"NVLINK_ERROR_RATE": D}
    storm = make_monitor(
        {"gpus": 1, "nvlink_links": 4, "events": [field_event("nvlink_crc_data_errors", add_per_s=500)]}
    )
    assert play(storm, 5).devices[0].state is F


def field_event(name: str, at: float = 1.0, **change: Any) -> dict[str, Any]:
    return {"at": at, "gpu": 0, "field": name, **change}


# -- classification -------------------------------------------------------------------------------


def test_software_thermal_slowdown_held_is_degraded(make_monitor: Any) -> None:
    monitor = make_monitor({"gpus": 1, "events": [field_event("clock_events", set=["sw_thermal"])]})
    assert play(monitor, 6).devices[0].state is H
    device = play(monitor, 20).devices[0]
    assert (device.state, device.reasons[0].code) == (D, "CLOCK_EVENT")
    assert device.reasons[0].evidence["clock_events"] == ["sw_thermal"]


@pytest.mark.parametrize(
    ("name", "code"), [("power_violation_ns", "POWER_VIOLATION"), ("thermal_violation_ns", "THERMAL_VIOLATION")]
)
def test_power_and_thermal_violations_are_degraded(make_monitor: Any, name: str, code: str) -> None:
    monitor = make_monitor({"gpus": 1, "events": [field_event(name, add_per_s=200_000_000)]})  # 20% of the time
    device = play(monitor, 15).devices[0]
    assert (device.state, device.reasons[0].code) == (D, code)
    assert device.reasons[0].evidence["fraction"] == pytest.approx(0.2, rel=0.1)


def test_a_clearing_reason_keeps_its_triggering_evidence(make_monitor: Any) -> None:
    events = [field_event("temperature", at=0, set=87), field_event("temperature", at=10, set=60)]
    monitor = make_monitor({"gpus": 1, "events": events})
    before = play(monitor, 9).devices[0].reasons[0]
    during_quiet = play(monitor, 20).devices[0].reasons[0]
    assert during_quiet.code == "TEMPERATURE_NEAR_SLOWDOWN"
    assert during_quiet.evidence["temperature_c"] == before.evidence["temperature_c"] == 87


def test_unknown_xid_is_degraded_with_the_xid_as_evidence(make_monitor: Any) -> None:
    monitor = make_monitor({"gpus": 1, "events": [{"at": 1, "gpu": 0, "xid": 999}]})
    device = play(monitor, 2).devices[0]
    assert device.state is D
    assert device.reasons[0].evidence["xid"] == 999


def test_pending_remap_is_degraded_unless_the_recovery_action_says_more(make_monitor: Any) -> None:
    pending = [field_event("remap_pending", set=1)]
    device = play(make_monitor({"gpus": 1, "events": pending}), 2).devices[0]
    assert (device.state, device.reasons[0].remedy) == (D, Remedy.RESET_GPU)
    escalated = [*pending, field_event("recovery_action", set="GPU_RESET")]
    assert play(make_monitor({"gpus": 1, "events": escalated}), 2).devices[0].state is F


# -- input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("calls", "temp_gpu", "value"), "hot", "recording.calls.temp_gpu: 'hot' is not valid; must be a number"),
        (("calls", "util", "value"), 5, "recording.calls.util: 5 is not valid; must be an object with a numeric 'gpu'"),
        (
            ("fields", "NVML_FI_DEV_ECC_DBE_VOL_TOTAL", "value"),
            "0",
            "recording.fields.NVML_FI_DEV_ECC_DBE_VOL_TOTAL.value: '0' is not valid; must be a number",
        ),
    ],
    ids=["call-text-for-number", "call-number-for-object", "field-text-for-number"],
)
def test_a_wrongly_typed_recording_exits_2_in_one_line(
    cli: Any, tmp_path: Path, h200_probe: Path, path: tuple[str, ...], value: Any, message: str
) -> None:
    data = json.loads(h200_probe.read_text())
    data[path[0]][path[1]][path[2]] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = cli("status", "--replay", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"gpuguard: error: {message}"]


def test_a_call_on_a_step_that_is_not_an_error_is_refused(cli: Any, tmp_path: Path) -> None:
    bad = write(tmp_path, {"gpus": 1, "events": [{"at": 0, "gpu": 0, "xid": 48, "call": "nvmlDeviceGetUUID"}]})
    result = cli("status", "--scenario", bad, "--at", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("gpuguard: error: events[0].call: 'nvmlDeviceGetUUID' is not valid; allowed with")


# -- structure ------------------------------------------------------------------------------------


def test_health_never_imports_the_fake() -> None:
    importing = re.compile(r"^\s*(from|import)\s+gpuguard\.fakenvml", re.MULTILINE)
    for source in (ROOT / "gpuguard" / "health").glob("*.py"):
        assert not importing.search(source.read_text()), source.name
    code = "import sys, gpuguard.health, gpuguard.cli.status; print('gpuguard.fakenvml' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"


def test_ci_tests_the_lowest_admitted_nvidia_ml_py() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"nvidia-ml-py>=([0-9.]+)"', pyproject)
    tested = re.search(r"^NVML_FLOOR=([0-9.]+)$", (ROOT / "scripts" / "test.sh").read_text(), re.MULTILINE)
    assert floor and tested
    # the first release of the admitted series (12.535.77 is the first 12.535 on PyPI)
    assert tested.group(1).startswith(floor.group(1) + ".")


def test_fabric_registration_failure_is_failing_and_in_progress_is_degraded(make_monitor: Any) -> None:
    failed = [field_event("fabric_status", at=0, set=999)]
    device = play(make_monitor({"gpus": 1, "nvlink_links": 18, "events": failed}), 5).devices[0]
    assert (device.state, device.reasons[0].code) == (F, "FABRIC_REGISTRATION_FAILED")
    assert device.readings["fabric_state"] == 3
    waiting = [field_event("fabric_state", at=0, set=2)]
    device = play(make_monitor({"gpus": 1, "nvlink_links": 18, "events": waiting}), 12).devices[0]
    assert (device.state, device.reasons[0].code) == (D, "FABRIC_NOT_READY")
    healthy = play(make_monitor({"gpus": 1, "nvlink_links": 18, "events": []}), 12).devices[0]
    assert healthy.state is H and healthy.readings["fabric_state"] == 3
    # no NVSwitch (the recorded H200): the signal is off, said once
    assert "fabric" in play(make_monitor({"gpus": 1, "events": []}), 5).devices[0].signals_off


class CountingNvml:
    """Counts the nvml* calls made through it (the benchmark counts the same way)."""

    def __init__(self, nvml: Any) -> None:
        self.nvml, self.calls = nvml, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.nvml, name)
        if not name.startswith("nvml") or isinstance(attr, type) or not callable(attr):
            return attr

        def counted(*args: Any) -> Any:
            self.calls += 1
            return attr(*args)

        return counted


def test_a_poll_cycle_costs_at_most_three_nvml_calls_per_gpu_with_18_nvlinks() -> None:
    counting = CountingNvml(FakeNvml.from_scenario({"gpus": 8, "nvlink_links": 18, "events": []}))
    monitor = HealthMonitor(counting, devices="all")
    snapshot = monitor.start(threads=False)
    assert all(d.readings["nvlink_down"] == 0 for d in snapshot.devices)
    before = counting.calls
    for _ in range(12):
        monitor.poll()
    per_gpu_per_cycle = (counting.calls - before) / 12 / 8
    monitor.stop()
    assert per_gpu_per_cycle == 3.0  # one batched field read (with 18 link states), clock events, one in turn


def test_a_link_whose_state_read_fails_is_unreadable_alone(make_monitor: Any) -> None:
    events = [
        {"at": 0, "gpu": 0, "error": "Unknown", "call": "nvmlDeviceGetNvLinkState", "link": 2},
        {"at": 3, "gpu": 0, "field": "nvlink_down", "set": 9},
    ]
    monitor = make_monitor({"gpus": 1, "nvlink_links": 18, "events": events})
    blind = monitor.snapshot().devices[0]
    # link 2 is not known to be up: UNKNOWN, named (nvml.h: UNKNOWN "on any unexpected error")
    assert (blind.state, blind.reasons[0].code) == (U, "SIGNAL_UNREADABLE")
    assert blind.signals_unreadable["nvlink_down"].startswith("link 2: nvmlDeviceGetFieldValues: NVML_ERROR_UNKNOWN")
    device = play(monitor, 4).devices[0]
    # the other links are still read: link 9 going down is seen and named
    assert (device.state, device.reasons[0].evidence["links_down"]) == (F, [9])
    assert device.reasons[0].evidence["nvlink_links"] == 18
    assert {r.code for r in device.reasons} == {"NVLINK_DOWN", "SIGNAL_UNREADABLE"}


def test_pcie_replay_threshold_follows_the_link_generation(make_monitor: Any, tmp_path: Path, h200_probe: Path) -> None:
    # 0.4 replays/s = 24/min over x16: under Gen5's 16 x 1.92 = 30.72/min, over Gen4's 15.36/min
    # (half the transfer rate, so half the replays at the same bit error rate).
    data = json.loads(h200_probe.read_text())
    data["calls"]["pcie_gen"]["value"] = 4
    gen4 = tmp_path / "gen4.json"
    gen4.write_text(json.dumps(data))
    events = [field_event("pcie_replay", at=0, add_per_s=0.4)]
    on_gen5 = play(make_monitor({"gpus": 1, "events": events, "recording": str(h200_probe)}), 40).devices[0]
    assert on_gen5.state is H
    device = play(make_monitor({"gpus": 1, "events": events, "recording": str(gen4)}), 40).devices[0]
    reason = device.reasons[0]
    assert (device.state, reason.code, reason.remedy) == (D, "PCIE_REPLAY_RATE", Remedy.CONTACT_SUPPORT)
    assert (reason.evidence["pcie_generation"], reason.evidence["threshold_per_min"]) == (4, 15.36)


def test_rebuilding_the_event_set_does_not_replay_past_events(make_monitor: Any) -> None:
    events = [
        {"at": 1, "gpu": 0, "xid": 94},
        {"at": 2, "gpu": 1, "error": "GpuIsLost", "call": "nvmlEventSetWait_v2"},
        {"at": 4, "gpu": 0, "xid": 94},
    ]
    monitor = make_monitor({"gpus": 2, "events": events})
    snapshot = play(monitor, 5)
    assert [d.state for d in snapshot.devices] == [D, L]
    (xid,) = [r for r in snapshot.devices[0].reasons if r.code == "XID"]
    assert xid.evidence["count"] == 2  # the two XIDs, each once


def test_the_threaded_monitor_watches_a_node_with_every_open_and_call_failure_at_once() -> None:
    scenario = {
        "gpus": 6,
        "nvlink_links": 18,
        "events": [
            {"at": 0, "gpu": 0, "lost": True},
            {"at": 0, "gpu": 1, "error": "NoPermission", "call": "nvmlDeviceGetHandleByIndex"},
            {"at": 0, "gpu": 2, "error": "FunctionNotFound", "call": "nvmlDeviceGetCurrentClocksEventReasons"},
            {"at": 0, "gpu": 3, "field": "nvlink_down", "set": 5},
            {"at": 0.3, "gpu": 4, "error": "ResetRequired"},
            {"at": 0.3, "gpu": 2, "field": "ecc_dbe_volatile", "set": 1},
        ],
    }
    fake = FakeNvml.from_scenario(scenario, realtime=True)
    with HealthMonitor(fake, HealthConfig(poll_interval_s=0.2, event_wait_s=0.2), devices="all") as monitor:
        snapshot = wait_for(monitor, lambda s: [d.state for d in s.devices] == [L, F, F, F, H])
    assert [d.index for d in snapshot.devices] == [0, 2, 3, 4, 5]
    assert snapshot.skipped and snapshot.skipped[0].startswith("GPU 1: skipped")
    by_index = {d.index: d for d in snapshot.devices}
    assert "clock_events" in by_index[2].signals_off and by_index[2].reasons[0].code == "ECC_DBE_VOLATILE"
    assert by_index[3].reasons[0].evidence["links_down"] == [5]
    assert by_index[4].reasons[0].code == "GPU_RESET_REQUIRED"


def test_a_job_gpu_that_nvml_does_not_know_is_unknown_and_the_others_watched() -> None:
    fake = FakeNvml.replay(gpus=2)
    known = "GPU-19a36126-98b4-8ad1-96d3-832414cda6ed"  # the fake's GPU 1
    monitor = HealthMonitor(fake, devices=["GPU-00000000-0000-0000-0000-000000000000", known])
    snapshot = monitor.start(threads=False)
    monitor.stop()
    assert snapshot.available
    missing, present = snapshot.devices
    assert (missing.uuid, missing.state, missing.reasons[0].code) == (
        "GPU-00000000-0000-0000-0000-000000000000",
        U,
        "NVML_UNRESPONSIVE",
    )
    assert "Not Found" in missing.reasons[0].message
    assert (present.index, present.uuid, present.state) == (1, known, H)


def test_a_refused_field_batch_switches_the_fields_off_once_and_the_calls_go_on(
    make_monitor: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gpuguard.health")
    # a driver whose library lacks nvmlDeviceGetFieldValues (pynvml: FUNCTION_NOT_FOUND)
    events = [{"at": 0, "gpu": 0, "error": "FunctionNotFound", "call": "nvmlDeviceGetFieldValues"}]
    device = play(make_monitor({"gpus": 1, "events": events}), 5).devices[0]
    assert {"ecc_dbe_volatile", "remap_pending", "pcie_replay"} <= set(device.signals_off)
    assert device.readings["temperature"] == 35 and "ecc_dbe_volatile" not in device.readings
    assert device.state is H
    assert sum("nvmlDeviceGetFieldValues" in r.getMessage() for r in caplog.records) == 1


def test_a_failed_fabric_read_is_not_taken_for_no_fabric(make_monitor: Any) -> None:
    events = [{"at": 1, "gpu": 0, "error": "Unknown", "call": "nvmlDeviceGetGpuFabricInfo", "until": 6}]
    monitor = make_monitor({"gpus": 1, "nvlink_links": 18, "events": events})
    device = play(monitor, 5).devices[0]
    assert "fabric" not in device.signals_off and device.state is H
    assert play(monitor, 10).devices[0].readings["fabric_state"] == 3
