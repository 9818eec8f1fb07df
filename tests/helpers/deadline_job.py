"""A job with a large state and a short preemption deadline, stopped by SIGTERM like a real job.

Checkpoints every ``--every`` steps (so an older checkpoint exists), writes its last finished step
to ``progress``, and on leaving writes ``report.json``: the exit code, the step it left at, the
resume point the guard reported, and the Evacuation's message (what the Kubernetes Event carries).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gpuguard


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--mib", type=int, default=1024, help="state size")
    p.add_argument("--deadline", type=float, default=1.0)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--steps", type=int, default=10_000)
    args = p.parse_args()
    big = torch.zeros(args.mib * 2**18)  # float32: MiB * 2**20 / 4
    state: dict[str, Any] = {"big": big}
    report: dict[str, Any] = {}
    try:
        with gpuguard.Guard(
            checkpoint_dir=args.dir / "checkpoints",
            state=state,
            checkpoint_every_steps=args.every,
            preemption_deadline_s=args.deadline,
            devices="all",
        ) as guard:
            start = guard.resume()
            report["resumed_at"] = start
            for step in range(start, args.steps):
                big[step % big.numel()] = float(step)  # the state changes every step
                time.sleep(0.02)
                guard.step(step)
                (args.dir / "progress").write_text(str(step))
    except gpuguard.Evacuation as evacuation:
        evacuated = guard.last_evacuation
        report.update(
            exit_code=evacuation.code,
            step=evacuation.step,
            committed=evacuation.checkpoint.id if evacuation.checkpoint else None,
            resume_from=evacuated.resume_from if evacuated else None,
            error=evacuated.error if evacuated else None,
            message=evacuation.decision.message,
        )
        raise
    finally:
        report["left_at"] = time.time()
        (args.dir / "report.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
