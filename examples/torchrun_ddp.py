"""DistributedDataParallel under gpuguard-run (torchrun underneath), runnable on CPU with gloo.

    GPUGUARD_FAKE_NVML=examples/scenarios/xid48-gpu0-at-2s.json \\
        gpuguard-run --standalone --nproc-per-node 2 examples/torchrun_ddp.py     # rank 0's GPU fails: exits 75
    GPUGUARD_FAKE_NVML=h200 gpuguard-run --standalone --nproc-per-node 2 examples/torchrun_ddp.py   # resumes

Each rank watches the GPU at its ``LOCAL_RANK``. When one rank's GPU fails, every rank agrees at the
same step, writes its shard of the emergency checkpoint, and exits 75; gpuguard-run then exits 75
(no local restart on a bad GPU). ``replicated=True``: DDP ranks hold the same state, so they split
the writing between them.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gpuguard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", default="file:///tmp/gpuguard-ddp")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--step-seconds", type=float, default=0.02)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(64, 64).to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    state = {"model": model.module, "optimizer": optimizer}

    with gpuguard.Guard(checkpoint_dir=args.checkpoint_dir, state=state, replicated=True, sync_every=5) as guard:
        start = guard.resume()
        if rank == 0:
            print(f"starting at step {start}", flush=True)
        for step in range(start, args.steps):
            x = torch.randn(32, 64, device=device, generator=None)
            loss = (model(x) - x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            time.sleep(args.step_seconds)
            guard.step(step)  # every rank, every step: an evacuation happens at the same step everywhere
    if rank == 0:
        print(f"finished step {args.steps - 1}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
