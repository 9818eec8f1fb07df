"""A Hugging Face Trainer job guarded by `GpuGuardCallback`: one process, or DDP under torchrun or
gpuguard-run (gloo, CPU).

The model is a tiny GPT-2 built from a config (no download), with dropout, trained on a synthetic
dataset. ``run`` trains in this process; as a script it is one rank of a job, which writes
``rank-N.json`` (how it ended, where it resumed, the samples it read) and, on rank 0 after a finished
``train``, the final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import TrainerCallback

SAMPLES = 48  # 12 batches of 4 per epoch on one rank; 6 per rank on two


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Fixed random token sequences; remembers which samples were read, in order."""

    def __init__(self, samples: int = SAMPLES) -> None:
        self.ids = torch.randint(0, 64, (samples, 16), generator=torch.Generator().manual_seed(11))
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.read.append(int(index))
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=16,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.2,
        embd_pdrop=0.2,
        attn_pdrop=0.2,
    )
    return GPT2LMHeadModel(config)


class EvacuateAt(TrainerCallback):  # type: ignore[misc]
    """Asks the guard to evacuate after optimizer step ``step`` (on ``rank`` only: a fault on one GPU)."""

    def __init__(self, callback: Any, step: int, rank: int | None = None) -> None:
        self.callback, self.step, self.rank = callback, step, rank

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and self.rank in (None, args.process_index):
            self.callback.guard.request_evacuation("test: evacuate here")


class SigtermAt(TrainerCallback):  # type: ignore[misc]
    """Sends this process SIGTERM (what a node drain sends) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import signal

        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def trainer_for(
    folder: Path,
    callback: Any,
    *,
    epochs: int = 3,
    accumulate: int = 2,
    max_steps: int = -1,
    evaluate_every: int | None = None,
    before: list[Any] | None = None,
    data: Tokens | None = None,
    **arguments: Any,
) -> Any:
    """A Trainer over the tiny model with ``callback`` (after the ``before`` callbacks, whose
    ``on_step_end`` then runs before the guard's); ``arguments`` go to ``TrainingArguments``."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(folder / "trainer-output"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=accumulate,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        report_to=[],
        save_strategy="no",
        logging_steps=3,
        eval_strategy="steps" if evaluate_every else "no",
        eval_steps=evaluate_every,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **arguments,  # any other TrainingArguments
    )
    return Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=data if data is not None else Tokens(),
        eval_dataset=Tokens(16) if evaluate_every else None,
        callbacks=[*(before or []), callback],
    )


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--accumulate", type=int, default=2)
    p.add_argument("--evaluate-every", type=int, default=None)
    p.add_argument("--evacuate-at-step", type=int, default=None)
    p.add_argument("--evacuate-on-rank", type=int, default=1)
    p.add_argument("--sync-every", type=int, default=2)
    p.add_argument("--every", type=int, default=None, help="a periodic checkpoint every N steps")
    p.add_argument("--per-rank", action="store_true", help="each rank writes its whole state (not replicated)")
    p.add_argument("--raise-in-teardown", action="store_true", help="cleaning up after an evacuation raises")
    args = p.parse_args()

    from gpuguard.transformers import GpuGuardCallback

    callback = GpuGuardCallback(
        checkpoint_dir=f"file://{args.dir / 'checkpoints'}",
        sync_every=args.sync_every,
        replicated=not args.per_rank,
        checkpoint_every_steps=args.every,
    )
    before = [EvacuateAt(callback, args.evacuate_at_step, args.evacuate_on_rank)] if args.evacuate_at_step else []
    data = Tokens()
    trainer = trainer_for(
        args.dir,
        callback,
        epochs=args.epochs,
        accumulate=args.accumulate,
        evaluate_every=args.evaluate_every,
        before=before,
        data=data,
    )
    rank = trainer.args.process_index

    def write(exit_code: int) -> None:
        report = {
            "rank": rank,
            "exit_code": exit_code,
            "resumed_from": callback.resumed_from.id if callback.resumed_from else None,
            "resumed_step": callback.resumed_from.step if callback.resumed_from else None,
            "global_step": trainer.state.global_step,
            "epoch": trainer.state.epoch,
            "read": data.read,
            "log_steps": [entry.get("step") for entry in trainer.state.log_history if "loss" in entry],
        }
        (args.dir / f"rank-{rank}.json").write_text(json.dumps(report))

    try:
        trainer.train(resume_from_checkpoint=callback.resume_path())
    except SystemExit as exc:
        write(int(exc.code or 0))
        if args.raise_in_teardown:  # what a CUDA call on the failed GPU does while the job cleans up
            raise RuntimeError("CUDA error: an illegal memory access was encountered") from exc
        raise
    write(0)
    if rank == 0:
        from safetensors.torch import save_file

        save_file(weights(trainer.model), str(args.dir / "final.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
