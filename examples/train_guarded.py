"""A plain training loop guarded by gpuguard: the whole integration is four lines.

    python examples/train_guarded.py --checkpoint-dir file:///tmp/run1
    GPUGUARD_FAKE_NVML=examples/scenarios/xid48-at-5s.json python examples/train_guarded.py   # a fault, no GPU needed
    gpuguard-run --standalone --nproc-per-node 2 examples/train_guarded.py                    # under torchrun

On an evacuation the process exits 75 (reschedule) or 76 (restart in place) after a durable
checkpoint; run it again and it resumes at the next step.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist

import gpuguard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--checkpoint-dir", default=os.environ.get("GPUGUARD_CHECKPOINT_DIR", "file:///tmp/gpuguard-run")
    )
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if "RANK" in os.environ:  # under torchrun / gpuguard-run
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    with gpuguard.Guard(checkpoint_dir=args.checkpoint_dir, state=state, checkpoint_every_steps=500) as guard:
        for step in range(guard.resume(), args.steps):
            x = torch.randn(64, 256, device=device)
            loss = (model(x) - x).pow(2).mean()
            loss.backward()
            if dist.is_initialized():
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            guard.step(step)  # after the optimizer step; raises gpuguard.Evacuation when the job must leave
            if step % 200 == 0:
                logging.info("step %d loss %.4f", step, loss.item())


if __name__ == "__main__":
    main()
