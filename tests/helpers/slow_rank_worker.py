"""A guarded job under torchrun (gloo, CPU) whose ranks do not wait for each other every step (think
of a pipeline stage, or the local steps between two synchronisations): one rank slows down after its
baseline, as a throttled GPU's would. Each rank writes ``rank-N.json`` with how it ended.
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
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--step-s", type=float, default=0.005)
    p.add_argument("--slow-rank", type=int, default=1)
    p.add_argument("--slow-after", type=int, default=40, help="the step from which the slow rank is 4x slower")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.Linear(8, 8)
    state = {"model": model}
    report: dict[str, Any] = {"rank": rank}
    try:
        with gpuguard.Guard(
            checkpoint_dir=f"file://{args.dir / 'checkpoints'}",
            state=state,
            sync_every=5,
            checkpoint_every_s=0,
            step_warmup_steps=5,
            step_baseline_steps=20,
            step_window_steps=10,
            degraded_grace_s=1.0,
            commit_timeout_s=30,
        ) as guard:
            for step in range(guard.resume(), args.steps):
                slow = rank == args.slow_rank and step >= args.slow_after
                time.sleep(args.step_s * (4 if slow else 1))
                guard.step(step)
        report["exit_code"] = 0
    except gpuguard.Evacuation as evacuation:
        report |= {"exit_code": evacuation.code, "evacuated_at": evacuation.step}
        report["reasons"] = evacuation.decision.evidence.get("reasons", [])
        report["decided_by_rank"] = evacuation.decision.evidence.get("decided_by_rank")
        (args.dir / f"rank-{rank}.json").write_text(json.dumps(report))
        raise
    (args.dir / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
