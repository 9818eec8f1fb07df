"""One gloo rank of tests/test_loss_gate_ranks.py: train with checkpoints, resume with only rank 1's losses
far outside the window, leave; resume again. Writes what it saw to ``loss-gate-rank<r>.json``."""

from __future__ import annotations

import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpuguard import Evacuation, Guard
from gpuguard.fakenvml import FakeNvml

SETTINGS: dict[str, Any] = {
    "checkpoint_every_steps": 10,
    "checkpoint_every_s": 0,
    "keep": 10,
    "sync_every": 5,
    "sudden_loss": False,
    "devices": "all",
}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def train(guard: Guard, model: torch.nn.Linear, steps: range, rank: int, loss_scale: float) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(1000 * rank + step)
        x = torch.randn(32, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True) * 0.5)
        loss.backward()
        with torch.no_grad():  # plain SGD: torch.optim's first use imports torch._dynamo, seconds on 2 cores
            for param in (model.weight, model.bias):
                assert param.grad is not None
                param.sub_(0.05 * param.grad)
                param.grad = None
        guard.step(step, loss.detach() * loss_scale)


def run(url: str, rank: int, bad_rank: int, report: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    with Guard(checkpoint_dir=url, state={"model": model}, nvml=FakeNvml.replay(), **SETTINGS) as guard:
        report["first"] = guard.resume()
        train(guard, model, range(21), rank, 1.0)  # checkpoints at 10 and 20
    guard = Guard(checkpoint_dir=url, state={"model": model}, nvml=FakeNvml.replay(), **SETTINGS)
    try:
        with guard:
            report["second"] = guard.resume()
            train(guard, model, range(report["second"], 60), rank, 1000.0 if rank == bad_rank else 1.0)
    except Evacuation as left:
        report["left"] = {"code": left.code, "step": left.step}
    with Guard(checkpoint_dir=url, state={"model": model}, nvml=FakeNvml.replay(), **SETTINGS) as guard:
        report["third"] = guard.resume()


def worker(rank: int, world: int, port: int, url: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lines = Lines()
    logging.getLogger("gpuguard").addHandler(lines)
    logging.getLogger("gpuguard").setLevel(logging.INFO)
    report: dict[str, Any] = {}
    try:
        run(url, rank, world - 1, report)
    except BaseException:
        report["error"] = traceback.format_exc()
    report["log"] = lines.lines
    Path(out, f"loss-gate-rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
