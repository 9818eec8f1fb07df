"""One rank of a guarded data-parallel gang (gloo, CPU), run by ``gpuguard-run`` in an emulated pod.

It knows nothing of Kubernetes: the pod's environment (``POD_NAME``, ``KUBECONFIG``,
``GPUGUARD_KUBERNETES_*``) and its node's fake NVML (``GPUGUARD_FAKE_NVML``) are what the guard reads.
Each rank appends how it ended to ``--dir/ranks.jsonl``. ``--crash-rank R --crash-step N`` makes rank R
raise at step N once (a marker file keeps the next attempt from crashing again): an ordinary failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import gpuguard


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--crash-rank", type=int, default=-1)
    p.add_argument("--crash-step", type=int, default=-1)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    report: dict[str, Any] = {"rank": rank, "world_size": world, "pod": os.environ.get("POD_NAME")}
    crashed = args.dir / "crashed"

    def write(extra: dict[str, Any]) -> None:
        with (args.dir / "ranks.jsonl").open("a") as out:
            out.write(json.dumps({**report, **extra}) + "\n")

    try:
        with gpuguard.Guard(
            checkpoint_dir=f"file://{args.dir / 'checkpoints'}",
            state={"model": model, "optimizer": optimizer},
            sync_every=5,
            checkpoint_every_steps=None,
            checkpoint_every_s=0,
            commit_timeout_s=30,
        ) as guard:
            report["resumed_at"] = start = guard.resume()
            for step in range(start, args.steps):
                if rank == args.crash_rank and step == args.crash_step and not crashed.exists():
                    crashed.write_text(str(step))
                    raise RuntimeError(f"rank {rank}: an ordinary crash at step {step}")
                x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
                torch.nn.functional.mse_loss(model(x), x[:, :1]).backward()
                for param in model.parameters():
                    assert param.grad is not None
                    dist.all_reduce(param.grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                time.sleep(0.05)
                guard.step(step)
    except gpuguard.Evacuation as evacuation:
        write({"exit_code": evacuation.code, "evacuated_at": evacuation.step})
        raise
    write({"exit_code": 0, "finished_at": args.steps - 1})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
