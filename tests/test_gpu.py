"""Checks that need a CUDA GPU and its NVML; they skip cleanly everywhere else (CI has no GPU).

Run on a GPU machine with ``pytest -m gpu`` (``benchmarks/gpu_validate.sh`` does, with the benchmarks).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from gpuguard import CheckpointStore, HealthMonitor, HealthState

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
