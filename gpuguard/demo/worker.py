"""The demo's training job: a small model, trained deterministically, guarded by gpuguard.

Run as ``python -m gpuguard.demo.worker --dir D --steps N [--fault-step S]``; with a fault, a fake
H200 suffers XID 48 at step S and the job evacuates with exit 75. Without one, it resumes from the
newest checkpoint and trains to the end. Either way it writes what happened to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gpuguard import Evacuation, Guard
from gpuguard.fakenvml import FakeNvml

SECONDS_PER_STEP = 0.05  # scenario time per training step: faults are scripted by step


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    return model, optimizer, scheduler


def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of a step depends on the step alone, as a resumable data loader's would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(64, 32, generator=g)
    return x, x[:, :1].sin() + 0.1 * torch.randn(64, 1, generator=g)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault-step", type=int)
    p.add_argument("--xid", type=int, default=48)
    p.add_argument("--report", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    events = [] if args.fault_step is None else [{"at": args.fault_step * SECONDS_PER_STEP, "gpu": 0, "xid": args.xid}]
    fake = FakeNvml.from_scenario({"gpus": 1, "events": events})
    model, optimizer, scheduler = build(args.seed)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    report: dict[str, Any] = {"fault_step": args.fault_step}
    fault_wall = None
    try:
        with Guard(
            checkpoint_dir=f"file://{args.dir / 'checkpoints'}",
            state=state,
            nvml=fake,
            devices="all",
            checkpoint_every_steps=50,
        ) as guard:
            start = guard.resume()
            report["resumed_at"] = start
            for step in range(start, args.steps):
                fake.clock.set(step * SECONDS_PER_STEP)
                if fault_wall is None and args.fault_step is not None and step >= args.fault_step:
                    fault_wall = time.perf_counter()
                x, y = batch(args.seed, step)
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                time.sleep(0.002)  # a GPU step takes time; it lets the monitor's threads run, as they would
                guard.step(step)
            report["finished_at"] = args.steps - 1
            report["loss"] = float(loss)
    except Evacuation as evacuation:
        ev = guard.last_evacuation
        assert ev is not None
        report |= {
            "exit_code": evacuation.code,
            "evacuated_at": evacuation.step,
            "decision": evacuation.decision.message,
            "detection_latency_s": (guard.decided_wall - fault_wall) if guard.decided_wall and fault_wall else None,
            "stall_s": ev.stall_s,
            "durable_s": ev.durable_s,
            "checkpoint": ev.checkpoint_id,
            "error": ev.error,
        }
        args.report.write_text(json.dumps(report))
        raise
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.dir / "final.safetensors"))
    report["exit_code"] = 0
    args.report.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
