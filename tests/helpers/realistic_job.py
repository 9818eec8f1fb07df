"""A realistic single-process training script, guarded: dropout, AdamW, a warm-up then cosine
schedule, bf16 autocast, and a shuffling ``StatefulDataLoader`` with 2 worker processes.

It knows nothing of the tests: it is stopped by SIGTERM (or a fault from ``GPUGUARD_FAKE_NVML``)
like a real job. It writes its last finished step to ``progress`` (so a test knows when to send the
signal), a report of how it ended to ``report.json``, and, when it finishes, its final weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torchdata.stateful_dataloader import StatefulDataLoader

import gpuguard


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--pause", type=float, default=0.02)
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    features = torch.randn(512, 16)
    dataset = torch.utils.data.TensorDataset(features, features[:, :1].sin())
    loader = StatefulDataLoader(
        dataset, batch_size=16, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(7)
    )  # 32 batches an epoch
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[10])
    progress: dict[str, Any] = {"epoch": 0, "samples": 0}
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": loader, "progress": progress}
    report: dict[str, Any] = {}
    try:
        with gpuguard.Guard(
            checkpoint_dir=args.dir / "checkpoints",  # a pathlib.Path is fine
            state=state,
            checkpoint_every_s=0,  # no periodic checkpoints: only the emergency one can save the run
            devices="all",
        ) as guard:
            step = report["resumed_at"] = guard.resume()
            while step < args.steps:
                for x, y in loader:  # a restored StatefulDataLoader continues mid-epoch
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = torch.nn.functional.mse_loss(model(x).float(), y)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    progress["samples"] += len(x)
                    time.sleep(args.pause)
                    guard.step(step)
                    (args.dir / "progress").write_text(str(step))
                    step += 1
                    if step >= args.steps:
                        break
                else:
                    progress["epoch"] += 1
        report["exit_code"] = 0
    except gpuguard.Evacuation as evacuation:
        last = guard.last_evacuation
        report |= {"exit_code": evacuation.code, "evacuated_at": evacuation.step, "progress": dict(progress)}
        if last is not None:
            report |= {
                "checkpoint": last.checkpoint_id,
                "signal": last.signal,
                "to_durable_s": last.signal_to_durable_s,
            }
        (args.dir / "report.json").write_text(json.dumps(report))
        raise
    report["progress"] = dict(progress)
    (args.dir / "report.json").write_text(json.dumps(report))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.dir / "final.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
