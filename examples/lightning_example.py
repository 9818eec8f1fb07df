"""PyTorch Lightning with gpuguard: one callback, runnable on CPU with a fault scenario.

    GPUGUARD_FAKE_NVML=examples/scenarios/xid48-gpu0-at-2s.json python examples/lightning_example.py   # exits 75
    GPUGUARD_FAKE_NVML=h200 python examples/lightning_example.py                                         # resumes
    GPUGUARD_FAKE_NVML=examples/scenarios/xid48-gpu0-at-2s.json gpuguard-run --standalone \\
        --nproc-per-node 2 examples/lightning_example.py --scenario-seconds-per-step 0.25               # DDP, exits 75

On a machine without GPUs the fault comes from the fake NVML's scenario. Its clock follows the wall clock,
so on a slow or busy machine a short run may end before the fault; ``--scenario-seconds-per-step`` drives
it by the training instead (0.25: the XID at 2 s lands at global step 8), wherever it runs.

`GpuGuardCallback` resumes from gpuguard's newest checkpoint through Lightning's own restore (model,
optimizer, scheduler, loops: global step, epoch and batch), and on an evacuation stops the trainer
after the same batch on every rank, then the process exits 75. The dataloader is torchdata's
``StatefulDataLoader`` (with ``StatefulDistributedSampler`` under DDP) so that a resume in the middle
of an epoch continues at the exact batch.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from gpuguard.lightning import GpuGuardCallback


class Regression(pl.LightningModule):
    def __init__(self, step_seconds: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.step_seconds = step_seconds

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        time.sleep(self.step_seconds)  # stands in for a GPU step's time
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)}

    def train_dataloader(self) -> Any:
        x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
        data = torch.utils.data.TensorDataset(x, x[:, :1].sin())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under DDP, a sampler that saves its position (Lightning keeps a DistributedSampler it is given).
            sampler = StatefulDistributedSampler(data, shuffle=True, seed=0)
            return StatefulDataLoader(data, batch_size=8, sampler=sampler)
        return StatefulDataLoader(data, batch_size=8, shuffle=True)


class ScenarioClockBySteps(pl.Callback):
    """Moves a fake NVML scenario's clock by ``seconds`` at each optimizer step (a demo aid)."""

    def __init__(self, fake: Any, seconds: float) -> None:
        self.fake, self.seconds, self.step = fake, seconds, 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.step:
            self.fake.clock.advance(self.seconds * (trainer.global_step - self.step))
            self.step = trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", default="file:///tmp/gpuguard-lightning")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--step-seconds", type=float, default=0.02)
    parser.add_argument(
        "--scenario-seconds-per-step",
        type=float,
        default=None,
        help="move the fake NVML scenario (GPUGUARD_FAKE_NVML) this much per optimizer step, not by the wall clock",
    )
    args = parser.parse_args()

    pl.seed_everything(0)
    devices = int(os.environ.get("WORLD_SIZE", "1"))  # under gpuguard-run / torchrun: one process per rank
    callbacks: list[pl.Callback] = []
    nvml = None
    scenario = Path(os.environ.get("GPUGUARD_FAKE_NVML", ""))
    if args.scenario_seconds_per_step and scenario.is_file():
        from gpuguard.fakenvml import FakeNvml

        nvml = FakeNvml.from_scenario(scenario)  # a manual clock...
        callbacks.append(ScenarioClockBySteps(nvml, args.scenario_seconds_per_step))  # ...moved by the steps
    guard = GpuGuardCallback(checkpoint_dir=args.checkpoint_dir, sync_every=4, nvml=nvml)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=args.epochs,
        callbacks=[guard, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Regression(args.step_seconds))  # on an evacuation: raises gpuguard.Evacuation, exit 75
    where = f"resumed from {guard.resumed_from.id}" if guard.resumed_from else "from the start"
    print(f"finished at global step {trainer.global_step} ({where})", flush=True)


if __name__ == "__main__":
    main()
