"""MIG: a job on a MIG device is watched through its parent GPU, and the evidence names the instance.

Health, XIDs and ECC are per GPU, not per MIG instance (nvml.h, nvmlEventSetWait_v2: "This API does not
currently support per-instance event reporting using MIG device handles"). The fake NVML's MIG API is
checked against nvml.h's return codes first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pynvml
import pytest
import torch
from helpers.cli_here import run_here
from helpers.watching import settle, wait_for, watching

import gpuguard
from gpuguard import Evacuation, HealthState
from gpuguard.fakenvml import FakeNvml

H, D, F, U = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.FAILING, HealthState.UNKNOWN


def node(mig: dict[str, int] | None = None, events: list[dict[str, Any]] | None = None, gpus: int = 2) -> FakeNvml:
    fake = FakeNvml.from_scenario({"gpus": gpus, "mig": mig or {}, "events": events or []})
    fake.nvmlInit()
    return fake


# -- the fake's MIG API, per nvml.h ---------------------------------------------------------------


def test_mig_mode_follows_the_recording_and_the_scenario() -> None:
    fake = node({"1": 2})
    zero, one = (fake.nvmlDeviceGetHandleByIndex(i) for i in range(2))
    assert fake.nvmlDeviceGetMigMode(zero) == [0, 0]  # as the H200 answered
    assert fake.nvmlDeviceGetMigMode(one) == [pynvml.NVML_DEVICE_MIG_ENABLE] * 2
    # nvml.h, nvmlDeviceGetMaxMigDeviceCount: "Returns zero if MIG is not supported or enabled"
    assert (fake.nvmlDeviceGetMaxMigDeviceCount(zero), fake.nvmlDeviceGetMaxMigDeviceCount(one)) == (0, 7)


def test_mig_devices_by_index_answer_nvml_h_s_codes() -> None:
    fake = node({"1": 2})
    zero, one = (fake.nvmlDeviceGetHandleByIndex(i) for i in range(2))
    mig = fake.nvmlDeviceGetMigDeviceHandleByIndex(one, 1)
    assert fake.nvmlDeviceIsMigDeviceHandle(mig) and not fake.nvmlDeviceIsMigDeviceHandle(one)
    assert fake.nvmlDeviceGetUUID(mig).startswith("MIG-")
    assert (fake.nvmlDeviceGetGpuInstanceId(mig), fake.nvmlDeviceGetComputeInstanceId(mig)) == (2, 0)
    # NOT_FOUND "if no valid MIG device was found at index"; INVALID_ARGUMENT "if device, index ... is invalid"
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.nvmlDeviceGetMigDeviceHandleByIndex(one, 2)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetMigDeviceHandleByIndex(one, 7)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetMigDeviceHandleByIndex(zero, 0)  # MIG off: the maximum is 0
    # nvmlDeviceGetDeviceHandleFromMigDeviceHandle: INVALID_ARGUMENT "if migDevice or device is invalid"
    assert fake.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig) is one
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(one)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetMigMode(mig)
    # a MIG UUID opens by UUID, as CUDA_VISIBLE_DEVICES and the device plugin name it
    assert fake.nvmlDeviceGetHandleByUUID(fake.nvmlDeviceGetUUID(mig)) == mig


def test_a_recording_without_mig_answers_not_supported(tmp_path: Path, h200_probe: Path) -> None:
    data = json.loads(h200_probe.read_text())
    data["calls"]["mig_mode"] = {"ok": False, "value": "ERROR NVMLError_NotSupported: Not Supported"}
    recording = tmp_path / "no-mig.json"
    recording.write_text(json.dumps(data))
    fake = FakeNvml.replay(recording)
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    # nvml.h, nvmlDeviceGetMigMode: NOT_SUPPORTED "If device doesn't support MIG mode"
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetMigMode(handle)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.nvmlDeviceGetMigDeviceHandleByIndex(handle, 0)
    monitor = gpuguard.HealthMonitor(fake, devices="all")
    (device,) = monitor.start(threads=False).devices
    monitor.stop()
    assert device.mig_mode is None and device.state is H


# -- watched through the parent -------------------------------------------------------------------


def mig_uuid(gpu: int, slot: int, mig: dict[str, int]) -> str:
    return node(mig).mig_uuid(gpu, slot)


def test_a_mig_job_is_watched_through_its_parent_and_the_evidence_names_the_instance() -> None:
    mig = {"1": 3}
    events = [{"at": 1, "gpu": 1, "xid": 48}]
    ours = mig_uuid(1, 0, mig)
    with watching({"gpus": 2, "mig": mig, "events": events}, devices=[ours]) as (fake, monitor):
        (device,) = settle(monitor).devices
        assert (device.index, device.uuid, device.state) == (1, fake.nvmlDeviceGetUUID(fake._handles[1]), H)
        assert device.mig_devices == (f"{ours} (GPU instance 1, compute instance 0)",)
        assert device.mig_mode == "enabled"
        fake.clock.set(1.0)
        (device,) = wait_for(monitor, lambda s: len(s.devices[0].reasons) == 2).devices
        assert device.state is F
        assert {r.code for r in device.reasons} == {"XID", "ECC_DBE_VOLATILE"}
        assert all(r.evidence["mig_devices"] == list(device.mig_devices) for r in device.reasons)


def test_two_mig_devices_on_one_gpu_are_one_entry_naming_both() -> None:
    mig = {"0": 2}
    a, b = mig_uuid(0, 0, mig), mig_uuid(0, 1, mig)
    monitor = gpuguard.HealthMonitor(FakeNvml.from_scenario({"gpus": 2, "mig": mig}), devices=[a, b])
    (device,) = monitor.start(threads=False).devices
    monitor.stop()
    assert device.index == 0
    assert [m.split(" ")[0] for m in device.mig_devices] == [a, b]


def test_an_xid_in_another_tenant_s_instance_only_counts_when_it_takes_the_gpu_down() -> None:
    mig = {"0": 2}
    events = [
        {"at": 1, "gpu": 0, "xid": 94, "instance": 2},  # contained memory error, the other instance's app
        {"at": 2, "gpu": 0, "xid": 119, "instance": 2},  # GSP error: the whole GPU needs a reset
    ]
    with watching({"gpus": 1, "mig": mig, "events": events}, devices=[mig_uuid(0, 0, mig)]) as (fake, monitor):
        settle(monitor)
        fake.clock.set(1.0)
        assert settle(monitor, polls=5).devices[0].reasons == ()
        fake.clock.set(2.0)
        (device,) = wait_for(monitor, lambda s: s.devices[0].state is F).devices
        (xid,) = device.reasons
        assert (xid.evidence["xid"], xid.evidence["gpu_instance"]) == (119, 2)


def test_node_wide_status_lists_mig_mode_per_gpu(cli: Any, tmp_path: Path) -> None:
    scenario = tmp_path / "mig.json"
    scenario.write_text(json.dumps({"gpus": 2, "mig": {"0": 2}}))
    result = run_here("status", "--scenario", str(scenario), "--json")
    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)["devices"]
    assert [(d["mig_mode"], len(d["mig_devices"])) for d in devices] == [("enabled", 2), ("disabled", 0)]
    assert all(m.startswith("MIG-") for m in devices[0]["mig_devices"])
    table = run_here("status", "--scenario", str(scenario)).stdout.splitlines()
    assert "MIG" in table[0].split()
    assert "enabled (2)" in table[2] and "disabled" in table[3]
    assert any(line.startswith("GPU 0 MIG devices: MIG-") for line in table)


def test_status_reads_a_mig_device_through_its_parent(cli: Any, tmp_path: Path) -> None:
    mig = {"1": 1}
    scenario = tmp_path / "mig.json"
    scenario.write_text(
        json.dumps({"gpus": 2, "mig": mig, "events": [{"at": 0, "gpu": 1, "field": "remap_pending", "set": 1}]})
    )
    result = run_here("status", "--scenario", str(scenario), "--json", "--check", "--devices", mig_uuid(1, 0, mig))
    assert result.returncode == 1
    (device,) = json.loads(result.stdout)["devices"]
    assert (device["index"], device["state"], device["reasons"][0]["code"]) == (1, "DEGRADED", "ROW_REMAP_PENDING")
    assert device["reasons"][0]["evidence"]["mig_devices"][0].startswith(mig_uuid(1, 0, mig))


def test_a_parent_lookup_that_fails_leaves_the_mig_device_unknown_and_named() -> None:
    mig = {"0": 1}
    ours = mig_uuid(0, 0, mig)
    # nvml.h, nvmlDeviceGetDeviceHandleFromMigDeviceHandle: NOT_SUPPORTED "if this query is not supported"
    events = [{"at": 0, "gpu": 0, "error": "NotSupported", "call": "nvmlDeviceGetDeviceHandleFromMigDeviceHandle"}]
    monitor = gpuguard.HealthMonitor(FakeNvml.from_scenario({"gpus": 1, "mig": mig, "events": events}), devices=[ours])
    (device,) = monitor.start(threads=False).devices
    monitor.stop()
    assert (device.state, device.uuid, device.mig_devices) == (U, ours, (ours,))
    assert "nvmlDeviceGetDeviceHandleFromMigDeviceHandle" in device.reasons[0].message


def test_an_xid_48_on_the_parent_evacuates_a_mig_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mig = {"1": 2}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mig_uuid(1, 1, mig))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    fake = FakeNvml.from_scenario({"gpus": 2, "mig": mig, "events": [{"at": 1.0, "gpu": 1, "xid": 48}]})
    model = torch.nn.Linear(2, 2)
    with (
        pytest.raises(Evacuation) as caught,
        gpuguard.Guard(f"file://{tmp_path}/ckpt", {"model": model}, nvml=fake, health={"event_wait_s": 0.05}) as guard,
    ):
        assert guard.monitor is not None
        assert [d.index for d in guard.monitor.snapshot().devices] == [1]
        guard.step(0)
        fake.clock.set(1.0)
        deadline = time.monotonic() + 30
        while not guard.decision.action and time.monotonic() < deadline:
            time.sleep(0.01)
        for step in range(1, 100):
            guard.step(step)
    assert caught.value.code == 75
    assert "mig_devices" in json.dumps(caught.value.decision.evidence)


def test_a_mig_job_is_found_through_its_parent_while_another_gpu_is_lost() -> None:
    # nvml.h, nvmlDeviceGetHandleByUUID: GPU_IS_LOST "if any GPU has fallen off the bus"; the MIG device
    # is then found by index under its parent (nvmlDeviceGetMigDeviceHandleByIndex), and GPU 0 named lost.
    mig = {"1": 2}
    ours = mig_uuid(1, 1, mig)
    fake = FakeNvml.from_scenario({"gpus": 3, "mig": mig, "events": [{"at": 0, "gpu": 0, "lost": True}]})
    bare = ours.removeprefix("MIG-")  # as torch names a CUDA device, MIG ones included
    monitor = gpuguard.HealthMonitor(fake, devices=[bare])
    snapshot = monitor.start(threads=False)
    monitor.stop()
    (device,) = snapshot.devices
    assert (device.index, device.state, device.mig_devices) == (1, H, (f"{ours} (GPU instance 2, compute instance 0)",))
    assert snapshot.notes == ("GPU 0: lost (NVML answers GPU_IS_LOST); not one of the GPUs watched here",)
