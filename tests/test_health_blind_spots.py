"""No signal goes dark while its GPU reads HEALTHY, and NVML's errors land where NVML puts them.

Each case runs through ``gpuguard status`` in a fresh process and through a threaded `HealthMonitor`
(its own poll and event threads; the scenario clock moved by the test, each step awaited as a
condition). Each cites the nvml.h text of the error it plays (NVIDIA/go-nvml, gen/nvml/nvml.h).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.cli_here import run_here
from helpers.watching import settle, wait_for, watching

from gpuguard import HealthState, Remedy
from gpuguard.fakenvml import FakeNvml, play

H, D, F, L, U = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.FAILING, HealthState.LOST, HealthState.UNKNOWN
FIELDS = "nvmlDeviceGetFieldValues"


def write(tmp_path: Path, scenario: dict[str, Any], name: str = "scenario.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(scenario))
    return str(path)


def status(cli: Any, path: str, *args: str, at: str = "0") -> tuple[int, dict[str, Any]]:
    result = run_here("status", "--scenario", path, "--at", at, "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def uuid_of(gpu: int, gpus: int = 8) -> str:
    fake = FakeNvml.replay(gpus=gpus)
    fake.nvmlInit()
    return fake.nvmlDeviceGetUUID(fake.nvmlDeviceGetHandleByIndex(gpu))


# -- the batched read failing as a whole ----------------------------------------------------------

# nvml.h, nvmlDeviceGetFieldValues: INVALID_ARGUMENT "if device is invalid or values is NULL"; and
# NVML_ERROR_UNKNOWN = 999, "An internal driver error occurred". Neither says the GPU lacks the counters.
BATCH_ERRORS = ["Unknown", "InvalidArgument"]


@pytest.mark.parametrize("error", BATCH_ERRORS)
def test_status_shows_a_failed_batch_as_unknown_naming_the_signals_and_reads_them_again(
    cli: Any, tmp_path: Path, error: str
) -> None:
    events = [
        {"at": 0, "gpu": 0, "field": "ecc_dbe_volatile", "set": 1},
        {"at": 0, "gpu": 0, "error": error, "call": FIELDS, "until": 5},
    ]
    path = write(tmp_path, {"gpus": 2, "events": events})
    code, out = status(cli, path, "--check", "--fail-closed")
    assert code == 1  # a double-bit ECC error behind a failed read must not pass
    blind, other = out["devices"]
    assert (blind["state"], blind["reasons"][0]["code"]) == ("UNKNOWN", "SIGNAL_UNREADABLE")
    assert other["state"] == "HEALTHY"
    said = blind["signals_unreadable"]["ecc_dbe_volatile"]
    assert (
        said.startswith(f"{FIELDS}: ")
        and f"NVML_ERROR_{'UNKNOWN' if error == 'Unknown' else 'INVALID_ARGUMENT'}" in said
    )
    assert "ecc_dbe_volatile" not in blind["readings"]  # no stale 0 on show next to the failed read
    assert "ecc_dbe_volatile" not in blind["signals_off"]
    assert "ecc_dbe_volatile" in blind["reasons"][0]["evidence"]["signals"]
    # retried, never switched off: once the batch answers, the double-bit error is there
    code, out = status(cli, path, "--check", at="6")
    assert code == 1
    assert [(d["state"], d["reasons"][0]["code"] if d["reasons"] else None) for d in out["devices"]] == [
        ("FAILING", "ECC_DBE_VOLATILE"),
        ("HEALTHY", None),
    ]
    assert out["devices"][0]["signals_unreadable"] == {}


@pytest.mark.parametrize("error", BATCH_ERRORS)
def test_a_threaded_monitor_turns_a_gpu_unknown_while_its_batch_fails_then_sees_the_fault(error: str) -> None:
    events = [
        {"at": 1, "gpu": 1, "error": error, "call": FIELDS, "until": 3},
        {"at": 2, "gpu": 1, "field": "ecc_dbe_volatile", "set": 1},
    ]
    with watching({"gpus": 2, "events": events}) as (fake, monitor):
        assert [d.state for d in settle(monitor).devices] == [H, H]
        fake.clock.set(1.0)
        # read before: UNKNOWN after unresponsive_polls (3) failed reads in a row, the readings withdrawn
        snapshot = wait_for(monitor, lambda s: s.devices[1].state is U)
        reason = snapshot.devices[1].reasons[0]
        assert reason.code == "SIGNAL_UNREADABLE" and reason.evidence["failed_reads"]["ecc_dbe_volatile"] >= 3
        assert "ecc_dbe_volatile" not in snapshot.devices[1].readings
        assert snapshot.devices[0].state is H
        fake.clock.set(3.0)
        snapshot = wait_for(monitor, lambda s: s.devices[1].state is F)
        assert snapshot.devices[1].reasons[0].code == "ECC_DBE_VOLATILE"
        assert snapshot.devices[1].signals_unreadable == {}


# -- one entry of the batch failing ---------------------------------------------------------------


def test_one_entry_that_fails_is_named_and_the_others_read(cli: Any, tmp_path: Path) -> None:
    # nvml.h, nvmlDeviceGetFieldValues: SUCCESS "if any values in values were populated. Note that you must
    # check the nvmlReturn field of each value for each individual status".
    event = {"at": 0, "gpu": 0, "error": "Unknown", "call": FIELDS, "entry": "NVML_FI_DEV_ECC_DBE_VOL_TOTAL"}
    path = write(tmp_path, {"gpus": 1, "events": [event, {"at": 0, "gpu": 0, "field": "ecc_dbe_volatile", "set": 2}]})
    code, out = status(cli, path, "--check", "--fail-closed")
    (device,) = out["devices"]
    assert code == 1 and device["state"] == "UNKNOWN"
    assert device["signals_unreadable"] == {"ecc_dbe_volatile": f"{FIELDS}: NVML_ERROR_UNKNOWN (999)"}
    assert device["readings"]["ecc_sbe_volatile"] == 0 and device["readings"]["temperature"] == 35
    assert status(cli, path, "--check")[0] == 0  # fail-open: UNKNOWN passes, as documented


def test_a_threaded_monitor_names_a_failing_entry_and_clears_it_when_it_answers() -> None:
    events = [
        {"at": 0, "gpu": 0, "error": "Unknown", "call": FIELDS, "entry": "remap_pending", "until": 2},
        {"at": 1, "gpu": 0, "field": "remap_pending", "set": 1},
    ]
    with watching({"gpus": 1, "events": events}) as (fake, monitor):
        device = settle(monitor).devices[0]
        assert (device.state, set(device.signals_unreadable)) == (U, {"remap_pending"})  # never read: at once
        fake.clock.set(2.0)
        device = wait_for(monitor, lambda s: s.devices[0].state is D).devices[0]
        assert device.reasons[0].code == "ROW_REMAP_PENDING" and device.signals_unreadable == {}


# -- a single call denied -------------------------------------------------------------------------


def test_no_permission_leaves_a_signal_unreadable_and_retried_not_off(cli: Any, tmp_path: Path) -> None:
    # nvml.h: NVML_ERROR_NO_PERMISSION = 4, "The current user does not have permission for operation".
    # Not "not supported": the signal is tried again on each poll. Clock events are not critical: the
    # GPU stays HEALTHY, the signal is listed.
    call = "nvmlDeviceGetCurrentClocksEventReasons"
    events = [
        {"at": 0, "gpu": 0, "error": "NoPermission", "call": call, "until": 4},
        {"at": 0, "gpu": 0, "field": "clock_events", "set": ["hw_slowdown"]},
    ]
    path = write(tmp_path, {"gpus": 1, "events": events})
    code, out = status(cli, path, "--check", "--fail-closed", at="3")
    (device,) = out["devices"]
    assert code == 0 and device["state"] == "HEALTHY"
    assert device["signals_unreadable"] == {
        "clock_events": f"{call}: Insufficient Permissions (NVML_ERROR_NO_PERMISSION)"
    }
    assert "clock_events" not in device["signals_off"]
    code, out = status(cli, path, at="20")
    assert out["devices"][0]["readings"]["clock_events"] == ["hw_slowdown"]
    assert out["devices"][0]["reasons"][0]["code"] == "CLOCK_EVENT"


def test_a_denied_field_batch_is_unknown_not_off() -> None:
    events = [{"at": 0, "gpu": 0, "error": "NoPermission", "call": FIELDS, "until": 1}]
    with watching({"gpus": 1, "events": events}) as (fake, monitor):
        device = settle(monitor).devices[0]
        assert device.state is U and "ecc_dbe_volatile" in device.signals_unreadable
        assert not {"ecc_dbe_volatile", "remap_pending"} & set(device.signals_off)
        fake.clock.set(1.0)
        device = wait_for(monitor, lambda s: s.devices[0].state is H).devices[0]
        assert device.readings["ecc_dbe_volatile"] == 0


# -- the event path -------------------------------------------------------------------------------


def test_an_event_wait_error_stays_on_the_event_path(cli: Any, tmp_path: Path) -> None:
    # nvml.h, nvmlEventSetWait_v2: UNKNOWN "on any unexpected error". Not a GPU fault: status does not
    # exit 2; XID events are unreadable on every registered GPU (UNKNOWN); polling still sees the DBE.
    events = [
        {"at": 0, "gpu": 0, "error": "Unknown", "call": "nvmlEventSetWait_v2"},
        {"at": 2, "gpu": 1, "field": "ecc_dbe_volatile", "set": 1},
    ]
    path = write(tmp_path, {"gpus": 2, "events": events})
    code, out = status(cli, path, "--check", "--fail-closed", at="5")
    assert code == 1
    (zero, one) = out["devices"]
    assert (zero["state"], zero["reasons"][0]["code"]) == ("UNKNOWN", "SIGNAL_UNREADABLE")
    assert zero["signals_unreadable"]["events"].startswith("nvmlEventSetWait_v2: ")
    assert "NVML_ERROR_UNKNOWN" in zero["signals_unreadable"]["events"]
    assert (one["state"], one["reasons"][0]["code"]) == ("FAILING", "ECC_DBE_VOLATILE")


def test_a_threaded_monitor_keeps_polling_through_event_wait_errors_and_gets_its_events_back() -> None:
    events = [
        {"at": 1, "gpu": 0, "error": "Unknown", "call": "nvmlEventSetWait_v2", "until": 2},
        {"at": 1.5, "gpu": 1, "field": "remap_pending", "set": 1},
        {"at": 3, "gpu": 1, "xid": 94},
    ]
    with watching({"gpus": 2, "events": events}) as (fake, monitor):
        settle(monitor)
        fake.clock.set(1.5)
        snapshot = wait_for(monitor, lambda s: s.devices[0].state is U and s.devices[1].state is D)
        assert "events" in snapshot.devices[1].signals_unreadable  # the wait answers for the whole set
        assert monitor.event_wait_failures >= 3
        fake.clock.set(3.0)
        snapshot = wait_for(monitor, lambda s: any(r.code == "XID" for r in s.devices[1].reasons))
        assert snapshot.devices[0].state is H and snapshot.devices[0].signals_unreadable == {}
        assert any("XID events unseen meanwhile; polling continues" in e for e in monitor.errors)


# -- GPU_IS_LOST from a by-UUID open --------------------------------------------------------------


def test_a_lost_gpu_elsewhere_on_the_node_is_not_pinned_on_the_job_s_gpus(cli: Any, tmp_path: Path) -> None:
    # nvml.h, nvmlDeviceGetHandleByUUID: GPU_IS_LOST "if any GPU has fallen off the bus or is otherwise
    # inaccessible". The job's GPUs 2 and 3 are fine; GPU 5 is the lost one, found by index.
    lost = {"at": 0, "gpu": 5, "error": "GpuIsLost", "call": "nvmlDeviceGetUUID"}
    path = write(tmp_path, {"gpus": 8, "events": [lost]})
    result = run_here(
        "status", "--scenario", path, "--at", "0", "--json", "--check", "--devices", f"{uuid_of(2)},{uuid_of(3)}"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [(d["index"], d["uuid"], d["state"]) for d in out["devices"]] == [
        (2, uuid_of(2), "HEALTHY"),
        (3, uuid_of(3), "HEALTHY"),
    ]
    assert out["notes"] == [
        "GPU 5 (00000000:05:06.0): lost (NVML answers GPU_IS_LOST); not one of the GPUs watched here"
    ]


def test_the_job_s_own_gpu_lost_is_named_by_index() -> None:
    with watching(
        {"gpus": 8, "events": [{"at": 0, "gpu": 5, "lost": True, "until": 2}]}, devices=[uuid_of(5), uuid_of(1)]
    ) as (
        fake,
        monitor,
    ):
        snapshot = settle(monitor)
        lost, fine = snapshot.devices
        assert (lost.index, lost.uuid, lost.state) == (5, uuid_of(5), L)
        assert lost.reasons[0].evidence["lost_gpus"] == [{"index": 5, "pci_bus_id": ""}]
        assert lost.reasons[0].evidence["call"] == "nvmlDeviceGetHandleByUUID"
        assert (fine.index, fine.state) == (1, H)
        # back after a reset: opened again on a poll, and HEALTHY
        fake.clock.set(2.0)
        snapshot = wait_for(monitor, lambda s: s.devices[0].state is H)
        assert snapshot.devices[0].readings["ecc_dbe_volatile"] == 0


# -- hardware errors at open ----------------------------------------------------------------------

OPEN_FAULTS = [
    # nvml.h, nvmlDeviceGetHandleByIndex_v2: INSUFFICIENT_POWER "if any attached devices have improperly
    # attached external power cables"; IRQ_ISSUE "if NVIDIA kernel detected an interrupt issue with the
    # attached GPUs".
    ("InsufficientPower", "GPU_INSUFFICIENT_POWER", "CONTACT_SUPPORT", "power cables"),
    ("IrqIssue", "GPU_IRQ_ISSUE", "REBOOT", "interrupt issue"),
]


@pytest.mark.parametrize(("error", "code", "remedy", "words"), OPEN_FAULTS, ids=[f[0] for f in OPEN_FAULTS])
def test_hardware_errors_at_open_are_failing_with_a_remedy(
    cli: Any, tmp_path: Path, error: str, code: str, remedy: str, words: str
) -> None:
    event = {"at": 0, "gpu": 1, "error": error, "call": "nvmlDeviceGetHandleByIndex"}
    result, out = status(cli, write(tmp_path, {"gpus": 2, "events": [event]}), "--check")
    assert result == 1  # fail-open too: not an UNKNOWN
    reason = out["devices"][1]["reasons"][0]
    assert (out["devices"][1]["state"], reason["code"], reason["remedy"]) == ("FAILING", code, remedy)
    assert words in reason["message"] and reason["evidence"]["call"] == "nvmlDeviceGetHandleByIndex"
    assert out["devices"][0]["state"] == "HEALTHY"


@pytest.mark.parametrize(("error", "code", "remedy", "words"), OPEN_FAULTS, ids=[f[0] for f in OPEN_FAULTS])
def test_a_threaded_monitor_marks_a_hardware_error_at_open_and_clears_it_when_the_gpu_opens(
    error: str, code: str, remedy: str, words: str
) -> None:
    event = {"at": 0, "gpu": 0, "error": error, "call": "nvmlDeviceGetHandleByUUID", "until": 1}
    with watching({"gpus": 2, "events": [event]}, devices=[uuid_of(0, 2)]) as (fake, monitor):
        (device,) = settle(monitor).devices
        assert (device.state, device.reasons[0].code, device.reasons[0].remedy) == (F, code, Remedy[remedy])
        fake.clock.set(1.0)
        (device,) = wait_for(monitor, lambda s: s.devices[0].state is H).devices
        assert device.index == 0 and device.name == "NVIDIA H200"


# -- smaller items --------------------------------------------------------------------------------


def test_replay_of_a_recording_without_a_gpu_exits_2_in_one_line(cli: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"calls": {}, "fields": {}}))
    result = run_here("status", "--replay", str(empty))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"gpuguard: error: recording: '{empty}' is not valid; records no GPU: calls.uuid")


def test_status_json_without_nvml_prints_json(cli: Any) -> None:
    result = cli("status", "--json")  # a fresh process: the real pynvml, no driver here
    assert result.returncode == 2
    out = json.loads(result.stdout)
    assert out["available"] is False and out["devices"] == [] and "NVML is not available" in out["error"]
    checked = cli("status", "--json", "--check", "--fail-closed")
    assert checked.returncode == 1 and json.loads(checked.stdout)["available"] is False


def test_the_pcie_replay_rate_is_the_rate_before_the_window_has_passed(make_monitor: Any) -> None:
    # 2 replays/s = 120/min, over 12 s of a 30 s window: 120/min, not 120 x 12 / 30 = 48/min
    monitor = make_monitor({"gpus": 1, "events": [{"at": 0, "gpu": 0, "field": "pcie_replay", "add_per_s": 2}]})
    reason = play(monitor, 12).devices[0].reasons[0]
    assert reason.code == "PCIE_REPLAY_RATE"
    assert reason.evidence["rate_per_min"] == pytest.approx(120, rel=0.01)
