"""A plain PyTorch loop guarded by gpuguard, runnable on a laptop: the fault comes from a scenario.

    GPUGUARD_FAKE_NVML=examples/scenarios/xid48-gpu0-at-2s.json python examples/plain_loop.py   # exits 75
    GPUGUARD_FAKE_NVML=h200 python examples/plain_loop.py                                         # resumes, exits 0

The first run takes an emergency checkpoint at the step where the guard acts and exits 75 (the code
a Kubernetes Job's podFailurePolicy maps to "reschedule, do not count"); the second resumes after
that step. ``--checkpoint-dir`` takes any fsspec URL (``s3://bucket/run``).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import gpuguard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", default="file:///tmp/gpuguard-plain-loop")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--step-seconds", type=float, default=0.02, help="stands in for a GPU step's time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    with gpuguard.Guard(checkpoint_dir=args.checkpoint_dir, state=state, checkpoint_every_steps=100) as guard:
        start = guard.resume()  # the step after the newest committed checkpoint, or 0
        print(f"starting at step {start}", flush=True)
        for step in range(start, args.steps):
            x = torch.randn(16, 32)
            loss = (model(x) - x).pow(2).mean()
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            time.sleep(args.step_seconds)
            guard.step(step)  # after the optimizer step; raises gpuguard.Evacuation (exit 75/76) to leave
    print(f"finished step {args.steps - 1}", flush=True)


if __name__ == "__main__":
    main()
