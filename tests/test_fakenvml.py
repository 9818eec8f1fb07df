"""The fake NVML answers like pynvml: real constants, real exceptions, recorded values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pynvml
import pytest

from gpuguard import ScenarioError
from gpuguard.fakenvml import FIELD_NAMES, FakeNvml, load_recording, load_scenario


def test_constants_and_exceptions_are_pynvml_s_own() -> None:
    fake = FakeNvml.replay()
    assert fake.NVML_ERROR_GPU_IS_LOST == 15
    assert fake.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost
    assert fake.NVML_FI_DEV_ECC_DBE_VOL_TOTAL == pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL


def test_unimplemented_functions_say_so() -> None:
    with pytest.raises(AttributeError, match="does not implement nvmlDeviceGetVbiosVersion"):
        FakeNvml.replay().nvmlDeviceGetVbiosVersion  # noqa: B018


def test_field_values_replay_the_recording(h200_probe: Path) -> None:
    probe = json.loads(h200_probe.read_text())
    fake = FakeNvml.replay(h200_probe)
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    supported = [n for n, f in probe["fields"].items() if "ret" not in f]
    names = [*supported[:40], "NVML_FI_DEV_ECC_SBE_VOL_L1"]
    ids = [probe["fields"][n]["id"] for n in names]
    values = fake.nvmlDeviceGetFieldValues(handle, ids)
    assert isinstance(values[0], pynvml.c_nvmlFieldValue_t)
    for name, value in zip(names, values, strict=True):
        recorded = probe["fields"][name]
        if "ret" in recorded:
            assert value.nvmlReturn == recorded["ret"] == pynvml.NVML_ERROR_NOT_SUPPORTED
            continue
        assert value.nvmlReturn == pynvml.NVML_SUCCESS
        got = value.value.dVal if value.valueType == pynvml.NVML_VALUE_TYPE_DOUBLE else value.value.ullVal
        if value.valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
            got = value.value.uiVal
        # ids 74 and 76 appear twice in the probe under two names; either recorded value is fine
        alternatives = {f.get("value") for f in probe["fields"].values() if f["id"] == recorded["id"]}
        assert got in alternatives, name


def test_calls_replay_the_recording(h200_probe: Path) -> None:
    fake = FakeNvml.replay(h200_probe)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    assert fake.nvmlDeviceGetUUID(h) == "GPU-19a36126-98b4-8ad1-96d3-832414cda6ec"
    assert fake.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 35
    assert fake.nvmlDeviceGetTemperatureThreshold(h, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN) == 89
    assert fake.nvmlDeviceGetMaxPcieLinkWidth(h) == 16
    assert fake.nvmlDeviceGetSupportedEventTypes(h) == 65439
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetNvLinkState(h, 0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(1)


def test_calls_before_init_raise_uninitialized() -> None:
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        FakeNvml.replay().nvmlDeviceGetCount()


def test_each_gpu_has_its_own_uuid_and_bus() -> None:
    fake = FakeNvml.replay(gpus=3)
    fake.nvmlInit()
    handles = [fake.nvmlDeviceGetHandleByIndex(i) for i in range(3)]
    assert len({fake.nvmlDeviceGetUUID(h) for h in handles}) == 3
    assert len({fake.nvmlDeviceGetPciInfo(h).busId for h in handles}) == 3
    assert fake.nvmlDeviceGetHandleByUUID(fake.nvmlDeviceGetUUID(handles[2])) is handles[2]


def test_scenario_time_is_manual_and_fast() -> None:
    fake = FakeNvml.from_scenario({"gpus": 1, "events": [{"at": 3600, "gpu": 0, "lost": True}]})
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    fake.nvmlDeviceGetUUID(h)
    fake.clock.advance(3600)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetUUID(h)


def test_event_wait_times_out_then_delivers() -> None:
    fake = FakeNvml.from_scenario({"gpus": 2, "events": [{"at": 2.0, "gpu": 1, "xid": 79}]})
    fake.nvmlInit()
    events = fake.nvmlEventSetCreate()
    for i in range(2):
        fake.nvmlDeviceRegisterEvents(fake.nvmlDeviceGetHandleByIndex(i), pynvml.nvmlEventTypeXidCriticalError, events)
    with pytest.raises(pynvml.NVMLError_Timeout):
        fake.nvmlEventSetWait_v2(events, 0)
    fake.clock.advance(2.0)
    data = fake.nvmlEventSetWait_v2(events, 0)
    assert (data.device.index, data.eventType, data.eventData) == (1, pynvml.nvmlEventTypeXidCriticalError, 79)


def test_yaml_scenarios_load(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("gpus: 2\nevents:\n  - {at: 1, gpu: 1, field: recovery_action, set: NODE_REBOOT}\n")
    scenario = load_scenario(path)
    assert scenario.gpus == 2
    assert scenario.events[0].set == 2  # NVML_GPU_RECOVERY_ACTION_NODE_REBOOT (nvml.h; absent from old pynvml)


def test_documented_field_names_all_load() -> None:
    for name in FIELD_NAMES:
        value: Any = ["hw_slowdown"] if name == "clock_events" else 1
        (event,) = load_scenario({"gpus": 1, "events": [{"at": 0, "gpu": 0, "field": name, "set": value}]}).events
        # the event keeps the signal's name and the value, a clock event list as its nvml.h bit mask
        expected = pynvml.nvmlClocksEventReasonHwSlowdown if name == "clock_events" else 1
        assert (event.field, event.set) == (name, expected), name


BAD_SCENARIOS = [
    ("missing-gpus", {"events": []}, r"gpus: None is not valid; required"),
    ("gpus-zero", {"gpus": 0}, r"gpus: 0 is not valid; must be a whole number from 1 to 64"),
    ("unknown-top-key", {"gpus": 1, "evnts": []}, r"evnts: .* unknown key"),
    ("gpu-out-of-range", {"gpus": 2, "events": [{"at": 0, "gpu": 2, "xid": 48}]}, r"events\[0\]\.gpu: 2"),
    ("negative-time", {"gpus": 1, "events": [{"at": -1, "gpu": 0, "xid": 48}]}, r"events\[0\]\.at: -1"),
    (
        "unknown-field",
        {"gpus": 1, "events": [{"at": 0, "gpu": 0, "field": "ecc_foo", "add": 1}]},
        r"events\[0\]\.field: 'ecc_foo' is not valid; allowed: ecc_sbe_volatile",
    ),
    (
        "field-without-change",
        {"gpus": 1, "events": [{"at": 0, "gpu": 0, "field": "pcie_replay"}]},
        r"exactly one of: set, add, add_per_s",
    ),
    (
        "two-kinds",
        {"gpus": 1, "events": [{"at": 0, "gpu": 0, "xid": 48, "lost": True}]},
        r"exactly one of: field, xid",
    ),
    (
        "bad-recovery-action",
        {"gpus": 1, "events": [{"at": 0, "gpu": 0, "field": "recovery_action", "set": "REBOOT_PLEASE"}]},
        r"'REBOOT_PLEASE' is not valid; allowed: NONE, GPU_RESET",
    ),
    (
        "bad-clock-event",
        {"gpus": 1, "events": [{"at": 0, "gpu": 0, "field": "clock_events", "set": ["too_hot"]}]},
        r"'too_hot' is not valid; allowed clock events",
    ),
    ("bad-event", {"gpus": 1, "events": [{"at": 0, "gpu": 0, "event": "boom"}]}, r"events\[0\]\.event: 'boom'"),
    ("until-before-at", {"gpus": 1, "events": [{"at": 5, "gpu": 0, "error": "Unknown", "until": 1}]}, r"until"),
]


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in BAD_SCENARIOS], ids=[c[0] for c in BAD_SCENARIOS])
def test_bad_scenarios_name_the_problem(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        load_scenario(data)


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ScenarioError, match=r"broken\.json.*not valid json"):
        load_scenario(broken)
    not_a_recording = tmp_path / "r.json"
    not_a_recording.write_text("{}")
    with pytest.raises(ScenarioError, match=r"recording.*'calls' and 'fields'"):
        load_recording(not_a_recording)
