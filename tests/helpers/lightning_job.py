"""A Lightning job guarded by `GpuGuardCallback`: one process, or DDP under torchrun (gloo, CPU).

The fault comes from ``GPUGUARD_FAKE_NVML`` as it would for a user testing their own pipeline, or, placed
by step rather than wall time, from ``--evacuate-at-step`` (one rank requests an evacuation as that
global step begins; every rank acts at the step they agree on). Every rank writes ``rank-N.json`` (how
it ended, the global step and batch it resumed at and stopped after); rank 0 writes the final weights
after a finished ``fit``. ``--devices 2`` without torchrun runs Lightning's own DDP launcher (rank 0 is
the parent of rank 1).
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

PACKAGES = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}


def build(package: str, sleep_s: float, *, generator: bool = False, validation: bool = False) -> Any:
    """(the Lightning package, a LightningModule class) for a small regression with dropout.

    Dropout draws from the global torch generator, so a resume is bitwise identical only when the
    RNG states come back at the right point of the loop. ``generator`` gives the training loader a
    generator of its own (otherwise it draws its shuffling seed from the global one); ``validation``
    adds a validation loop (whose dataloader iterator draws a seed from the global generator too).
    """
    import importlib

    pl = importlib.import_module(PACKAGES[package])
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    class Regression(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(0.25), torch.nn.Linear(16, 1)
            )
            self.seen: list[tuple[int, int, int]] = []
            self.data: list[float] = []  # a checksum of each batch, to compare data order between runs
            self.validations: list[int] = []  # the global step at each validation

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            self.seen.append((self.trainer.current_epoch, batch_idx, self.trainer.global_step))
            self.data.append(round(float(x.sum()), 4))
            time.sleep(sleep_s)  # gives the scenario's fault time to land mid-run
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

        def _data(self) -> Any:
            g = torch.Generator().manual_seed(7)
            x = torch.randn(64, 8, generator=g)
            return torch.utils.data.TensorDataset(x, x[:, :1].sin())

        def train_dataloader(self) -> Any:
            data = self._data()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # A sampler that saves its position: Lightning keeps a DistributedSampler it is given,
                # and this one applies the resumed epoch's order (see GpuGuardCallback's docs).
                sampler = StatefulDistributedSampler(data, shuffle=True, seed=0)
                return StatefulDataLoader(data, batch_size=4, sampler=sampler)
            own = torch.Generator().manual_seed(3) if generator else None
            return StatefulDataLoader(data, batch_size=4, shuffle=True, generator=own)

        if validation:

            def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                if batch_idx == 0 and not self.trainer.sanity_checking:
                    self.validations.append(self.trainer.global_step)
                x, y = batch
                return torch.nn.functional.mse_loss(self.net(x), y)

            def val_dataloader(self) -> Any:
                return torch.utils.data.DataLoader(self._data(), batch_size=16)

    return pl, Regression


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--devices", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    p.add_argument("--package", choices=sorted(PACKAGES), default="lightning")
    p.add_argument("--sleep", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--every", type=int, default=None, help="periodic checkpoint every N steps")
    p.add_argument("--evacuate-at-step", type=int, default=None, help="request an evacuation at this global step")
    p.add_argument("--evacuate-rank", type=int, default=0, help="the rank that requests it")
    p.add_argument("--sync-every", type=int, default=2, help="the guard's sync_every")
    p.add_argument("--teardown-raises", action="store_true", help="another callback's on_exception raises")
    p.add_argument("--linger-rank0", type=float, default=0.0, help="rank 0's on_exception takes this long")
    args = p.parse_args()

    from gpuguard.lightning import GpuGuardCallback

    pl, Regression = build(args.package, args.sleep)
    pl.seed_everything(0, workers=True)
    model = Regression()
    guard = GpuGuardCallback(
        checkpoint_dir=f"file://{args.dir / 'checkpoints'}",
        sync_every=args.sync_every,
        commit_timeout_s=30,
        checkpoint_every_steps=args.every,
    )
    callbacks: list[Any] = [guard]

    class EvacuateAtStep(pl.Callback):  # type: ignore[misc, name-defined]
        def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
            if trainer.global_step == args.evacuate_at_step and trainer.global_rank == args.evacuate_rank:
                guard.guard.request_evacuation(f"test: evacuate at global step {args.evacuate_at_step}")

    class FailingTeardown(pl.Callback):  # type: ignore[misc, name-defined]
        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            # What cleanup on a GPU that has failed does (an XID 48 leaves the context unusable).
            raise RuntimeError("CUDA error: uncorrectable ECC error encountered (simulated in teardown)")

    class SlowTeardown(pl.Callback):  # type: ignore[misc, name-defined]
        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if trainer.global_rank == 0:
                time.sleep(args.linger_rank0)  # flushing loggers, say: past the launcher's 5 s watch

    if args.evacuate_at_step is not None:
        callbacks.append(EvacuateAtStep())
    if args.linger_rank0:
        callbacks.append(SlowTeardown())
    if args.teardown_raises:
        callbacks.append(FailingTeardown())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    report: dict[str, Any] = {}

    def write(exit_code: int) -> None:
        rank = trainer.global_rank
        first = model.seen[0] if model.seen else None
        report.update(
            rank=rank,
            exit_code=exit_code,
            resumed_from=guard.resumed_from.id if guard.resumed_from else None,
            first_batch=first,  # (epoch, batch_idx, global_step before the batch)
            last_batch=model.seen[-1] if model.seen else None,
            global_step=trainer.global_step,
            batches=len(model.seen),
            data=model.data,
            lr=[g["lr"] for g in trainer.optimizers[0].param_groups] if trainer.optimizers else None,
        )
        # beside, then renamed: the test reads the reports as soon as they appear, maybe while a rank writes
        partial = args.dir / f"rank-{rank}.json.partial"
        partial.write_text(json.dumps(report))
        partial.replace(args.dir / f"rank-{rank}.json")

    try:
        trainer.fit(model)
    except SystemExit as exc:
        write(int(exc.code or 0))
        raise
    write(0)
    if trainer.global_rank == 0:
        from safetensors.torch import save_file

        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(args.dir / "final.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
