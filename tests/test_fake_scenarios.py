"""The fake NVML does what its scenario format says: every key, one test each.

A raw ``NVML_FI_DEV_*`` name and the signal name gpuguard reads are one field; ``until`` ends a step of
every kind; a fault at ``"at": 0`` is seen the way real hardware shows one that happened before the
monitor started (the counters already moved, no event replayed), so ``gpuguard-run``'s preflight fails
the GPU. `test_every_scenario_key_has_a_test` keeps this file complete as keys are added.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
import pytest

from gpuguard import HealthState
from gpuguard.fakenvml import SCENARIO_KEYS, FakeNvml, load_scenario, play
from gpuguard.health.signals import EVENT_TYPES
from gpuguard.integrations.torchrun import preflight

from conftest import ROOT

H, D, F, L = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.FAILING, HealthState.LOST
COVERED: set[str] = set()


def covers(*keys: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Marks a test as the one for these scenario keys (collected at import, whatever runs)."""

    def mark(test: Callable[..., None]) -> Callable[..., None]:
        COVERED.update(keys)
        return test

    return mark


def fake_at(scenario: dict[str, Any], at: float) -> tuple[FakeNvml, list[Any]]:
    """The fake with its GPUs opened at 0, its clock at ``at``."""
    fake = FakeNvml.from_scenario(scenario)
    fake.nvmlInit()
    handles = [fake.nvmlDeviceGetHandleByIndex(i) for i in range(fake.scenario.gpus)]
    fake.clock.set(at)
    return fake, handles


def field(fake: FakeNvml, handle: Any, field_id: int) -> int:
    (value,) = fake.nvmlDeviceGetFieldValues(handle, [field_id])
    assert value.nvmlReturn == pynvml.NVML_SUCCESS
    return int(value.value.ullVal if value.valueType != pynvml.NVML_VALUE_TYPE_UNSIGNED_INT else value.value.uiVal)


DBE = pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL
REPLAYS = pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER


# -- top level ------------------------------------------------------------------------------------


@covers("gpus", "events", "recording", "nvlink_links", "mig", "name", "description")
def test_top_level_keys(tmp_path: Path, h200_probe: Path) -> None:
    data = json.loads(h200_probe.read_text())
    data["calls"]["temp_gpu"]["value"] = 52
    recording = tmp_path / "warm.json"
    recording.write_text(json.dumps(data))
    scenario = load_scenario(
        {
            "gpus": 3,
            "events": [{"at": 1, "gpu": 2, "lost": True}],
            "recording": str(recording),
            "nvlink_links": 4,
            "mig": {"1": 2},
            "name": "warm node",
            "description": "a recording of a warmer H200",
        }
    )
    assert (scenario.name, scenario.extra["description"]) == ("warm node", "a recording of a warmer H200")
    fake, handles = fake_at({"gpus": 3, "recording": str(recording), "nvlink_links": 4, "mig": {"1": 2}}, 0)
    assert fake.nvmlDeviceGetCount() == 3 and len(scenario.events) == 1
    assert fake.nvmlDeviceGetTemperature(handles[0], pynvml.NVML_TEMPERATURE_GPU) == 52
    (state,) = fake.nvmlDeviceGetFieldValues(handles[0], [(pynvml.NVML_FI_DEV_NVLINK_GET_STATE, 3)])
    assert state.value.uiVal == pynvml.NVML_FEATURE_ENABLED
    (past,) = fake.nvmlDeviceGetFieldValues(handles[0], [(pynvml.NVML_FI_DEV_NVLINK_GET_STATE, 4)])
    assert past.nvmlReturn == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert fake.nvmlDeviceGetMaxMigDeviceCount(handles[1]) == 7


# -- field steps ----------------------------------------------------------------------------------


@covers("at", "gpu", "field", "set", "add", "add_per_s")
def test_at_gpu_field_and_the_three_changes() -> None:
    scenario = {
        "gpus": 2,
        "events": [
            {"at": 2, "gpu": 1, "field": "temperature", "set": 70},
            {"at": 2, "gpu": 1, "field": "ecc_dbe_volatile", "add": 3},
            {"at": 2, "gpu": 1, "field": "pcie_replay", "add_per_s": 10},
        ],
    }
    fake, (zero, one) = fake_at(scenario, 1.9)
    assert fake.nvmlDeviceGetTemperature(one, 0) == 35 and field(fake, one, DBE) == 0
    fake.clock.set(4.0)
    assert fake.nvmlDeviceGetTemperature(one, 0) == 70
    assert (field(fake, one, DBE), field(fake, one, REPLAYS)) == (3, 20)
    assert (fake.nvmlDeviceGetTemperature(zero, 0), field(fake, zero, DBE)) == (35, 0)  # the other GPU


def test_a_raw_nvml_field_name_is_the_signal_it_names(make_monitor: Any) -> None:
    raw = [{"at": 0, "gpu": 0, "field": "NVML_FI_DEV_PCIE_REPLAY_COUNTER", "add_per_s": 100}]
    named = [{"at": 0, "gpu": 0, "field": "pcie_replay", "add_per_s": 100}]
    assert load_scenario({"gpus": 1, "events": raw}).events[0].field == "pcie_replay"
    by_raw = play(make_monitor({"gpus": 1, "events": raw}), 10).devices[0]
    by_name = play(make_monitor({"gpus": 1, "events": named}), 10).devices[0]
    assert (by_raw.state, by_raw.reasons[0].code) == (D, "PCIE_REPLAY_RATE")
    assert by_raw.readings["pcie_replay"] == by_name.readings["pcie_replay"] == 1000
    assert by_raw.reasons[0].evidence == by_name.reasons[0].evidence


# -- until, on every kind -------------------------------------------------------------------------

UNTIL = [
    ("set", {"field": "temperature", "set": 95}),
    ("add", {"field": "ecc_dbe_volatile", "add": 2}),
    ("add_per_s", {"field": "pcie_replay", "add_per_s": 10}),
    ("xid", {"xid": 48}),
    ("event", {"event": "double_bit_ecc"}),
    ("lost", {"lost": True}),
    ("timeouts", {"timeouts": 1000, "call": "nvmlDeviceGetTemperature"}),
    ("error", {"error": "Unknown", "call": "nvmlDeviceGetTemperature"}),
]


@covers("until")
@pytest.mark.parametrize("kind", [u[1] for u in UNTIL], ids=[u[0] for u in UNTIL])
def test_until_ends_a_step_of_every_kind(kind: dict[str, Any]) -> None:
    fake, (handle,) = fake_at({"gpus": 1, "events": [{"at": 1, "gpu": 0, "until": 5, **kind}]}, 3)

    def reading() -> tuple[Any, ...]:
        try:
            return (fake.nvmlDeviceGetTemperature(handle, 0), field(fake, handle, DBE), field(fake, handle, REPLAYS))
        except pynvml.NVMLError as exc:
            return (type(exc).__name__,)

    during = reading()
    fake.clock.set(20)
    after = reading()
    fake.clock.set(30)
    assert reading() == after  # nothing moves after until
    if "add_per_s" in kind:
        assert during == (35, 0, 20) and after == (35, 0, 40)  # it stops adding and keeps what it added
    else:
        assert during != after and after == (35, 0, 0)  # back to the recorded GPU, as after a reset


# -- the other kinds ------------------------------------------------------------------------------


@covers("xid", "event", "instance")
def test_xid_event_and_instance_arrive_as_nvml_events() -> None:
    scenario = {
        "gpus": 1,
        "mig": {"0": 2},
        "events": [{"at": 1, "gpu": 0, "xid": 31, "instance": 2}, {"at": 2, "gpu": 0, "event": "sbe_storm"}],
    }
    fake, (handle,) = fake_at(scenario, 0)
    events = fake.nvmlEventSetCreate()
    fake.nvmlDeviceRegisterEvents(handle, fake.nvmlDeviceGetSupportedEventTypes(handle), events)
    fake.clock.set(2)
    xid = fake.nvmlEventSetWait_v2(events, 0)
    assert (xid.eventType, xid.eventData, xid.gpuInstanceId) == (pynvml.nvmlEventTypeXidCriticalError, 31, 2)
    storm = fake.nvmlEventSetWait_v2(events, 0)
    # by name with nvml.h's value: nvidia-ml-py 12.535 lacks nvmlEventTypeSingleBitEccErrorStorm
    assert (storm.eventType, storm.gpuInstanceId) == (EVENT_TYPES["sbe_storm"], 0xFFFFFFFF)


@covers("lost", "timeouts", "error", "call")
def test_lost_timeouts_error_and_call() -> None:
    scenario = {
        "gpus": 3,
        "events": [
            {"at": 0, "gpu": 0, "lost": True},
            {"at": 0, "gpu": 1, "timeouts": 2, "call": "nvmlDeviceGetTemperature"},
            {"at": 0, "gpu": 2, "error": "NoPermission", "call": "nvmlDeviceGetCurrPcieLinkWidth"},
        ],
    }
    fake = FakeNvml.from_scenario(scenario)
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetHandleByIndex(0)
    one, two = fake.nvmlDeviceGetHandleByIndex(1), fake.nvmlDeviceGetHandleByIndex(2)
    for _ in range(2):
        with pytest.raises(pynvml.NVMLError_Timeout):
            fake.nvmlDeviceGetTemperature(one, 0)
    assert fake.nvmlDeviceGetTemperature(one, 0) == 35
    with pytest.raises(pynvml.NVMLError_NoPermission):
        fake.nvmlDeviceGetCurrPcieLinkWidth(two)
    assert fake.nvmlDeviceGetTemperature(two, 0) == 35  # "call" fails that function only


@covers("link", "entry")
def test_link_and_entry_fail_one_link_or_one_field_alone() -> None:
    scenario = {
        "gpus": 1,
        "nvlink_links": 4,
        "events": [
            {"at": 0, "gpu": 0, "error": "Unknown", "call": "nvmlDeviceGetNvLinkState", "link": 1},
            {"at": 0, "gpu": 0, "error": "Unknown", "call": "nvmlDeviceGetFieldValues", "entry": "remap_pending"},
        ],
    }
    fake, (handle,) = fake_at(scenario, 0)
    state = pynvml.NVML_FI_DEV_NVLINK_GET_STATE
    values = fake.nvmlDeviceGetFieldValues(
        handle, [(state, 0), (state, 1), pynvml.NVML_FI_DEV_REMAPPED_PENDING, pynvml.NVML_FI_DEV_REMAPPED_FAILURE]
    )
    assert [v.nvmlReturn for v in values] == [
        pynvml.NVML_SUCCESS,
        pynvml.NVML_ERROR_UNKNOWN,
        pynvml.NVML_ERROR_UNKNOWN,
        pynvml.NVML_SUCCESS,
    ]
    with pytest.raises(pynvml.NVMLError_Unknown):
        fake.nvmlDeviceGetNvLinkState(handle, 1)
    assert fake.nvmlDeviceGetNvLinkState(handle, 0) == pynvml.NVML_FEATURE_ENABLED


# -- a fault at t=0 -------------------------------------------------------------------------------


def test_an_xid_at_zero_shows_as_the_counters_it_moved_not_as_a_replayed_event(make_monitor: Any) -> None:
    monitor = make_monitor({"gpus": 2, "events": [{"at": 0.0, "gpu": 1, "xid": 48}]})
    monitor.process_events(0.0)
    healthy, failing = monitor.snapshot().devices
    assert healthy.state is H
    # NVML delivers events from registration on: the XID itself is not seen; its double-bit ECC count is
    assert (failing.state, [r.code for r in failing.reasons]) == (F, ["ECC_DBE_VOLATILE"])
    assert failing.readings["ecc_dbe_volatile"] == 1 and failing.readings["ecc_dbe_aggregate"] == 1


def test_the_preflight_fails_a_gpu_faulted_at_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "xid48-at-0.json"
    scenario.write_text(json.dumps({"gpus": 2, "events": [{"at": 0.0, "gpu": 1, "xid": 48}]}))
    monkeypatch.setenv("GPUGUARD_FAKE_NVML", str(scenario))
    assert preflight(75) == 75
    said = capsys.readouterr().err
    assert "gpuguard-run: GPU 1" in said and "is FAILING" in said and "double-bit ECC" in said
    assert "GPU 0" not in said


@pytest.mark.slow  # a torchrun launcher process (torch.distributed.run's import alone takes seconds)
def test_gpuguard_run_exits_75_before_launching_on_a_gpu_faulted_at_zero(tmp_path: Path) -> None:
    scenario = tmp_path / "xid48-at-0.json"
    scenario.write_text(json.dumps({"gpus": 2, "events": [{"at": 0.0, "gpu": 1, "xid": 48}]}))
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('the preflight let a FAILING GPU train')\n")
    result = subprocess.run(
        [sys.executable, "-m", "gpuguard.integrations.torchrun", "--nproc-per-node", "1", str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "GPUGUARD_FAKE_NVML": str(scenario)},
    )
    assert result.returncode == 75, result.stderr
    assert "GPU 1" in result.stderr and "FAILING" in result.stderr and "double-bit ECC" in result.stderr
    assert "the preflight let" not in result.stderr


def test_every_scenario_key_has_a_test() -> None:
    # each test above names the keys it exercises (@covers); a new key without a test fails here
    assert set(SCENARIO_KEYS) - COVERED == set()
    assert COVERED - set(SCENARIO_KEYS) == set()
