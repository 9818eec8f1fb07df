"""Checks that need a CUDA GPU and its NVML; they skip cleanly everywhere else (CI has no GPU).

Run on a GPU machine with ``pytest -m gpu`` (``benchmarks/gpu_validate.sh`` does, with the benchmarks).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from gpuguard import CheckpointCorruptError, CheckpointStore, HealthMonitor, HealthState

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_real_nvml_sees_the_cuda_devices_by_uuid() -> None:
    torch.cuda.init()
    with HealthMonitor(devices="job") as monitor:
        snapshot = monitor.snapshot()
    assert snapshot.available, snapshot.error
    uuids = {str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())}
    assert {d.uuid.removeprefix("GPU-") for d in snapshot.devices} == uuids
    assert all(d.state in (HealthState.HEALTHY, HealthState.DEGRADED) for d in snapshot.devices), snapshot.to_dict()


def test_status_json_on_a_real_gpu(cli: Any) -> None:
    result = cli("status", "--json")
    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)["devices"]
    assert devices and all(d["uuid"].startswith("GPU-") for d in devices)


def test_cuda_state_round_trips_onto_its_devices(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 8)).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 512, device="cuda")).sum().backward()
    optimizer.step()
    extra = torch.arange(10, device="cuda")
    with CheckpointStore(str(tmp_path)) as store:
        store.prepare({"model": model, "optimizer": optimizer, "extra": extra})
        pending = store.save({"model": model, "optimizer": optimizer, "extra": extra}, step=1)
        pending.wait()
        fresh = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 8)).cuda()
        fresh_opt = torch.optim.AdamW(fresh.parameters())
        target: dict[str, Any] = {"model": fresh, "optimizer": fresh_opt, "extra": None}
        store.load(target)
    assert target["extra"].device.type == "cuda" and torch.equal(target["extra"], extra)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert b.is_cuda and torch.equal(a, b)


def test_a_load_to_the_gpu_streams_through_pinned_memory_and_changes_nothing_when_corrupt(tmp_path: Any) -> None:
    # 96 MiB in one tensor: three read parts, each in several pinned pieces copied while the next is read.
    big = torch.randn(24 << 20, device="cuda")
    model = torch.nn.Linear(256, 256).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256, device="cuda")).sum().backward()
    optimizer.step()
    state = {"model": model, "optimizer": optimizer, "big": big}
    with CheckpointStore(str(tmp_path)) as store:
        info = store.save(state, step=1).wait()
        assert info is not None
        fresh = torch.nn.Linear(256, 256).cuda()
        weight = fresh.weight.data_ptr()
        target: dict[str, Any] = {"model": fresh, "optimizer": torch.optim.AdamW(fresh.parameters()), "big": None}
        store.load(target)
        assert fresh.weight.data_ptr() == weight  # the live parameter received the bytes
        assert target["big"].is_cuda and torch.equal(target["big"], big)
        assert torch.equal(fresh.weight, model.weight)
        moments = target["optimizer"].state[fresh.weight]
        assert moments["exp_avg"].is_cuda and torch.equal(moments["exp_avg"], optimizer.state[model.weight]["exp_avg"])
        shard = tmp_path / info.id / "rank-00000-of-00001.safetensors"
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0x01
        shard.write_bytes(bytes(data))
        other = torch.nn.Linear(256, 256).cuda()
        before = other.weight.detach().clone()
        with pytest.raises(CheckpointCorruptError):
            store.load({"model": other, "optimizer": torch.optim.AdamW(other.parameters()), "big": None})
        assert torch.equal(other.weight, before)
