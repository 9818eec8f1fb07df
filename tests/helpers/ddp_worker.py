"""A data-parallel training job under torchrun (gloo, CPU), guarded by gpuguard.

The job knows nothing of fakes: the fault comes from ``GPUGUARD_FAKE_NVML``, as it would for a
user testing their own pipeline. Each rank watches the GPU at its ``LOCAL_RANK``. Every rank writes
a report (``rank-N.json``) of how it ended; rank 0 writes the final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import gpuguard


class KillDuringEmergency:
    """Kills this rank with SIGKILL a moment after its emergency checkpoint starts."""

    @gpuguard.hookimpl
    def gpuguard_before_checkpoint(self, step: int, reason: str) -> None:
        if reason == "emergency":
            threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGKILL)).start()


class ActAfterTheFirstCommit:
    """Holds every decision of the guard (CONTINUE) until this rank has seen a periodic checkpoint committed:
    a fault then always finds one to fall back on, however slow the machine (a fault placed at a wall-clock
    time came before step 40's commit on a loaded machine, and after the last step on a fast one)."""

    def __init__(self) -> None:
        self.committed = threading.Event()

    @gpuguard.hookimpl
    def gpuguard_checkpoint_finished(
        self, step: int, reason: str, info: Any, timings: Any, error: BaseException | None
    ) -> None:
        if reason == "periodic" and info is not None:  # on a rank other than 0: it read the manifest back
            self.committed.set()

    @gpuguard.hookimpl
    def gpuguard_decide(self, decision: gpuguard.Decision, snapshot: Any) -> gpuguard.Decision | None:
        if self.committed.is_set() or not decision.action:
            return None
        return gpuguard.Decision(gpuguard.Action.CONTINUE, "observe", "held until a periodic checkpoint commits")


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Data parallelism by hand, one tensor at a time in a fixed order. (DDP re-buckets its gradients
    after the first step of every launch, which changes the order of a ring all-reduce's sums with more
    than two ranks: a resumed run would differ in the last bits from one that never stopped.)"""
    for param in model.parameters():
        assert param.grad is not None
        dist.all_reduce(param.grad)
        param.grad /= world


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--replicated", action="store_true")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--no-periodic", action="store_true", help="no periodic checkpoints at all")
    p.add_argument("--act-after-commit", action="store_true", help="act on a fault once a periodic save committed")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
    torch.manual_seed(1000 + rank)  # dropout differs between ranks: their RNG states must come back per rank
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    plugins: list[object] = [KillDuringEmergency()] if rank == args.kill_rank else []
    if args.act_after_commit:
        plugins.append(ActAfterTheFirstCommit())
    report: dict[str, Any] = {"rank": rank, "world_size": world}
    out = args.dir / f"rank-{rank}.json"
    try:
        with gpuguard.Guard(
            checkpoint_dir=f"file://{args.dir / 'checkpoints'}",
            state=state,
            sync_every=5,
            checkpoint_every_steps=None if args.no_periodic else 40,
            checkpoint_every_s=0,
            replicated=args.replicated,
            commit_timeout_s=15,
            plugins=plugins,
        ) as guard:
            report["resumed_at"] = guard.resume()
            for step in range(report["resumed_at"], args.steps):
                g = torch.Generator().manual_seed(step * 1000 + rank)
                x = torch.randn(32, 16, generator=g)
                loss = torch.nn.functional.mse_loss(model(x), x[:, :1].cos())
                loss.backward()
                average_gradients(model, world)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                time.sleep(0.01)
                guard.step(step)
                if rank == 0:
                    (args.dir / "progress").write_text(str(step))
        report["exit_code"] = 0
    except gpuguard.Evacuation as evacuation:
        report |= {"exit_code": evacuation.code, "evacuated_at": evacuation.step}
        report["checkpoint"] = guard.last_evacuation.checkpoint_id if guard.last_evacuation else None
        report["error"] = guard.last_evacuation.error if guard.last_evacuation else None
        out.write_text(json.dumps(report))
        raise
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.dir / "final.safetensors"))
    out.write_text(json.dumps(report))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
