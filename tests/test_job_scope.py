"""The job's own GPUs in every environment, checked through `gpuguard.Guard` (``devices="job"``).

Each environment a job meets (nothing set, torchrun's LOCAL_RANK, CUDA_VISIBLE_DEVICES as indices or
UUIDs, CUDA_DEVICE_ORDER, NVIDIA_VISIBLE_DEVICES from the container runtime) runs twice: with CUDA
initialised, where torch names the devices by UUID, and without (CPU-only torch in a sidecar, CUDA not
yet initialised). Both must watch the same GPUs, say once which and why, and never the whole node
silently. The fake node has 8 GPUs; the fake CUDA sees the ones CUDA would (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import gpuguard
from gpuguard.fakenvml import FakeNvml

GPUS = 8
# short event waits so that closing a guard does not sit out a 1 s NVML wait
QUICK = {"event_wait_s": 0.05}


def uuids() -> list[str]:
    fake = FakeNvml.replay(gpus=GPUS)
    fake.nvmlInit()
    return [fake.nvmlDeviceGetUUID(fake.nvmlDeviceGetHandleByIndex(i)) for i in range(GPUS)]


@dataclass
class Props:
    uuid: str  # torch's _CUuuid prints without the "GPU-" prefix


def use_cuda(monkeypatch: pytest.MonkeyPatch, visible: list[int]) -> None:
    """CUDA initialised by the program, seeing the GPUs at these NVML indices (in CUDA's order)."""
    names = uuids()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props(names[visible[i]].removeprefix("GPU-")))


# (id, environment, the GPUs CUDA sees by NVML index, the GPUs watched, what the start line says)
CASES: list[tuple[str, dict[str, str], list[int], list[int], str]] = [
    ("nothing-set", {}, list(range(GPUS)), list(range(GPUS)), ""),
    ("local-rank", {"LOCAL_RANK": "3"}, list(range(GPUS)), [3], "LOCAL_RANK=3"),
    ("visible-indices-and-local-rank", {"CUDA_VISIBLE_DEVICES": "4,5", "LOCAL_RANK": "1"}, [4, 5], [5], "LOCAL_RANK=1"),
    (
        "visible-indices-default-order",
        {"CUDA_VISIBLE_DEVICES": "2,3"},
        [2, 3],
        [2, 3],
        "CUDA's default FASTEST_FIRST order is PCI bus order",
    ),
    (
        "visible-indices-pci-order",
        {"CUDA_VISIBLE_DEVICES": "6,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        [6, 1],
        [6, 1],
        "CUDA_DEVICE_ORDER=PCI_BUS_ID",
    ),
    ("visible-uuids", {"CUDA_VISIBLE_DEVICES": "{6},{7}", "LOCAL_RANK": "0"}, [6, 7], [6], "LOCAL_RANK=0"),
    ("runtime-uuids", {"NVIDIA_VISIBLE_DEVICES": "{1},{3}"}, [1, 3], [1, 3], "NVIDIA_VISIBLE_DEVICES="),
    ("runtime-all-local-rank", {"NVIDIA_VISIBLE_DEVICES": "all", "LOCAL_RANK": "2"}, list(range(GPUS)), [2], ""),
    ("visible-empty", {"CUDA_VISIBLE_DEVICES": ""}, [], [], "gives this process no GPU"),
]


def expand(value: str) -> str:
    """``{6}`` is GPU 6's UUID."""
    out = value
    for i, name in enumerate(uuids()):
        out = out.replace(f"{{{i}}}", name)
    return out


@pytest.mark.parametrize("cuda", [True, False], ids=["cuda-initialised", "no-cuda"])
@pytest.mark.parametrize(("env", "seen", "watched", "said"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_guard_watches_the_job_s_own_gpus(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    cuda: bool,
    env: dict[str, str],
    seen: list[int],
    watched: list[int],
    said: str,
) -> None:
    for name in (
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "NVIDIA_VISIBLE_DEVICES",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, expand(value))
    if cuda:
        use_cuda(monkeypatch, seen)
    else:
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    caplog.set_level(logging.INFO, "gpuguard.health")
    nvml = FakeNvml.replay(gpus=GPUS)
    with gpuguard.Guard(f"file://{tmp_path}/ckpt", {}, nvml=nvml, health=QUICK) as guard:
        assert guard.monitor is not None
        snapshot = guard.monitor.snapshot()
    names = uuids()
    assert [(d.index, d.uuid) for d in snapshot.devices] == [(i, names[i]) for i in watched]
    assert all(d.state is gpuguard.HealthState.HEALTHY for d in snapshot.devices)
    lines = [r for r in caplog.records if r.getMessage().startswith("gpuguard health: watching ")]
    assert len(lines) == 1  # said once, at start
    (line,) = lines
    text = line.getMessage()
    assert snapshot.watching in text
    assert ", ".join(f"GPU {i} ({names[i]})" for i in watched) in text
    if cuda and seen:
        assert "CUDA's devices (torch.cuda)" in text
    else:
        assert said in text
    if not env and not cuda:
        # never silently: the whole node, when nothing says otherwise, is a warning naming why
        assert line.levelno == logging.WARNING and "no CUDA device list, CUDA_VISIBLE_DEVICES" in text
    if not watched:
        assert line.levelno == logging.WARNING and "watching no GPU" in text


class MixedNode(FakeNvml):
    """A node of two models: GPU 1 answers as an L4 (everything else as the recorded H200)."""

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return "NVIDIA L4" if handle.index == 1 else super().nvmlDeviceGetName(handle)


def test_mixed_models_without_pci_bus_order_watch_the_node_with_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # CUDA's FASTEST_FIRST order on mixed models is a speed heuristic gpuguard cannot reproduce.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    caplog.set_level(logging.INFO, "gpuguard.health")
    nvml = MixedNode(FakeNvml.replay(gpus=2).scenario)
    with gpuguard.Guard(f"file://{tmp_path}/ckpt", {}, nvml=nvml, health=QUICK) as guard:
        assert guard.monitor is not None
        assert [d.name for d in guard.monitor.snapshot().devices] == ["NVIDIA H200", "NVIDIA L4"]
    (line,) = [r for r in caplog.records if r.getMessage().startswith("gpuguard health: watching ")]
    assert line.levelno == logging.ERROR and "set CUDA_DEVICE_ORDER=PCI_BUS_ID" in line.getMessage()
    # with PCI bus order asked for, index 1 is GPU 1 (the fake's PCI bus order is its NVML order)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    mixed = MixedNode(FakeNvml.replay(gpus=2).scenario)
    with gpuguard.Guard(f"file://{tmp_path}/ckpt", {}, nvml=mixed, health=QUICK) as guard:
        assert guard.monitor is not None
        assert [d.index for d in guard.monitor.snapshot().devices] == [1]


def test_status_devices_job_shows_what_a_guard_would_watch(cli: Any) -> None:
    result = cli(
        "status", "--replay", "h200", "--devices", "job", "--json", env={"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "0"}
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [d["index"] for d in out["devices"]] == [0]
    assert out["watching"].startswith("CUDA_VISIBLE_DEVICES=0, CUDA indices in PCI bus order")


def test_a_lost_gpu_in_the_visible_list_is_the_job_s_and_shows_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    for rank, expected in (("0", (0, gpuguard.HealthState.LOST)), ("1", (1, gpuguard.HealthState.HEALTHY))):
        monkeypatch.setenv("LOCAL_RANK", rank)
        fake = FakeNvml.from_scenario({"gpus": 4, "events": [{"at": 0, "gpu": 0, "lost": True}]})
        monitor = gpuguard.HealthMonitor(fake, devices="job")
        (device,) = monitor.start(threads=False).devices
        monitor.stop()
        assert (device.index, device.state) == expected
