"""The monitor's threads, subscribers and failure handling, against the fake and the real pynvml."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pynvml
import pytest

from gpuguard import HealthChange, HealthConfig, HealthMonitor, HealthState
from gpuguard.fakenvml import FakeNvml, play

from conftest import H200_UUID


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def test_real_pynvml_without_a_driver_is_unknown_not_a_crash() -> None:
    # This machine has no NVIDIA driver: the real pynvml raises LibraryNotFound in nvmlInit.
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML")
    monitor = HealthMonitor(devices="all")
    snapshot = monitor.start()
    monitor.stop()
    assert snapshot.available is False
    assert snapshot.worst is HealthState.UNKNOWN
    assert "NVML is not available" in (snapshot.error or "")
    assert monitor.errors


def test_missing_nvml_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gpuguard.health")
    for _ in range(3):
        caplog.clear()
        monitor = HealthMonitor(FakeNvml.missing(), devices="all")
        monitor.start(threads=False)
        for _ in range(5):  # polled again and again: still said once, and nothing raises
            monitor.poll()
        monitor.stop()
        said = [r.getMessage() for r in caplog.records if "NVML is not available" in r.getMessage()]
        assert len(said) == 1, said  # once per monitor, whatever its polls


def test_unsupported_signals_are_switched_off_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gpuguard.health")
    monitor = HealthMonitor(FakeNvml.replay(), devices="all")
    monitor.start(threads=False)
    for _ in range(5):
        snapshot = monitor.poll()
    monitor.stop()
    device = snapshot.devices[0]
    # the recorded H200 has no NVLink: those counters answer NotSupported
    assert "nvlink_crc_flit_errors" in device.signals_off
    assert "nvlink_crc_flit_errors" not in device.readings
    assert device.state is HealthState.HEALTHY
    notices = [r for r in caplog.records if "does not support" in r.getMessage()]
    assert len(notices) == 1


def test_replay_reports_the_recorded_h200(h200_probe: Any) -> None:
    monitor = HealthMonitor(FakeNvml.replay(h200_probe), devices="all")
    snapshot = monitor.start(threads=False)
    monitor.stop()
    (device,) = snapshot.devices
    assert (device.uuid, device.name, device.pci_bus_id) == (H200_UUID, "NVIDIA H200", "00000000:00:06.0")
    assert device.readings["temperature"] == 35
    assert device.readings["memory_temperature"] == 39
    assert device.readings["pcie_link_width"] == 16
    assert device.state is HealthState.HEALTHY


def test_devices_are_selected_by_uuid_or_index() -> None:
    fake = FakeNvml.replay(gpus=4)
    monitor = HealthMonitor(fake, devices=[H200_UUID, 2])
    snapshot = monitor.start(threads=False)
    monitor.stop()
    assert [d.index for d in snapshot.devices] == [0, 2]


def test_threads_detect_an_injected_xid_quickly() -> None:
    fake = FakeNvml.from_scenario({"gpus": 2, "events": [{"at": 0.3, "gpu": 1, "xid": 48}]}, realtime=True)
    changes: list[HealthChange] = []
    seen = threading.Event()

    def on_change(change: HealthChange) -> None:
        changes.append(change)
        if change.current.state is HealthState.FAILING:
            seen.set()

    # The poll's own timer never fires within the test: only the event thread can carry the XID (by
    # construction, not by a latency that a loaded machine stretches).
    config = HealthConfig(poll_interval_s=3600.0, event_wait_s=0.2)
    with HealthMonitor(fake, config, devices="all") as monitor:
        monitor.subscribe(on_change)
        assert seen.wait(60.0)  # a hang guard
        names = {t.name for t in threading.enumerate()}
        assert {"gpuguard-nvml-poll", "gpuguard-nvml-events"} <= names
        assert monitor.snapshot().devices[1].state is HealthState.FAILING
        assert monitor.snapshot().devices[0].state is HealthState.HEALTHY
    assert not any(t.name.startswith("gpuguard-nvml") for t in threading.enumerate())
    assert changes[-1].current.index == 1


def test_a_failing_subscriber_does_not_stop_the_monitor(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml.from_scenario(
        {"gpus": 1, "events": [{"at": 1.0, "gpu": 0, "xid": 48}, {"at": 2.0, "gpu": 0, "lost": True}]}
    )
    monitor = HealthMonitor(fake, devices="all")
    monitor.start(threads=False)
    seen: list[HealthState] = []

    def broken(change: HealthChange) -> None:
        raise RuntimeError("subscriber bug")

    monitor.subscribe(broken)
    unsubscribe = monitor.subscribe(lambda c: seen.append(c.current.state))
    play(monitor, 1)
    unsubscribe()
    play(monitor, 3)
    monitor.stop()
    # the XID 48 event, then the double-bit ECC count that comes with it: two changes of reasons
    assert seen == [HealthState.FAILING, HealthState.FAILING]
    assert any("subscriber bug" in e for e in monitor.errors)
    assert monitor.snapshot().devices[0].state is HealthState.LOST


def test_a_crashing_source_never_raises_into_the_caller() -> None:
    fake = FakeNvml.replay()
    monitor = HealthMonitor(fake, HealthConfig(poll_interval_s=0.01), devices="all")
    monitor.start()

    def explode(*args: Any) -> Any:
        raise ZeroDivisionError("bug inside the source")

    fake.nvmlDeviceGetFieldValues = explode  # type: ignore[method-assign]
    wait_for(lambda: any("bug inside the source" in e for e in monitor.errors))
    assert any(t.name == "gpuguard-nvml-poll" for t in threading.enumerate())
    monitor.stop()


def test_snapshot_does_not_call_nvml() -> None:
    fake = FakeNvml.replay()
    monitor = HealthMonitor(fake, devices="all")
    monitor.start(threads=False)
    calls = fake.calls
    for _ in range(1000):
        monitor.snapshot()
    assert fake.calls == calls
    monitor.stop()
