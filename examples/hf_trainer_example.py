"""Hugging Face Trainer with gpuguard: one callback and one resume line, runnable on CPU.

    python examples/hf_trainer_example.py --evacuate-at-step 5          # evacuates: exits 75
    python examples/hf_trainer_example.py                               # resumes bitwise and finishes
    gpuguard-run --standalone --nproc-per-node 2 examples/hf_trainer_example.py --evacuate-at-step 5   # DDP
    gpuguard-run --standalone --nproc-per-node 2 examples/hf_trainer_example.py                        # resumes

The model is a tiny GPT-2 built from a config (nothing is downloaded) trained on random tokens.
``--evacuate-at-step N`` stands in for a failing GPU: after optimizer step N the last rank asks its guard
to evacuate (``guard.request_evacuation``); the ranks agree on a step, each writes its part of the
emergency checkpoint, and every process exits 75. The fault is placed by step, not by wall time, so it
lands mid-run however loaded the machine is. Give ``GPUGUARD_FAKE_NVML=h200`` to watch a fake H200
instead of this machine's (absent) GPUs.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config: no download

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from gpuguard.transformers import GpuGuardCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, samples: int = 64, length: int = 16) -> None:
        self.ids = torch.randint(0, 128, (samples, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class EvacuateAtStep(TrainerCallback):
    """Stands in for a GPU fault on one rank: asks the guard to evacuate after optimizer step ``step``."""

    def __init__(self, callback: GpuGuardCallback, step: int) -> None:
        self.callback, self.step = callback, step

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and args.process_index == args.world_size - 1:
            self.callback.guard.request_evacuation(f"example: a fault after step {self.step}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", default="file:///tmp/gpuguard-hf-trainer")
    parser.add_argument("--output-dir", default="/tmp/gpuguard-hf-trainer-output")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--evacuate-at-step", type=int, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=16, vocab_size=128, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under gpuguard-run / torchrun
    training = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=args.epochs,
        learning_rate=3e-3,
        use_cpu=True,
        ddp_backend="gloo" if distributed else None,
        save_strategy="no",  # gpuguard's store holds the checkpoints
        logging_steps=4,
        report_to=[],
        disable_tqdm=True,
    )
    # replicated: every DDP rank holds the same state, so the ranks split the writing.
    guard = GpuGuardCallback(checkpoint_dir=args.checkpoint_dir, sync_every=2, replicated=True)
    callbacks: list[TrainerCallback] = [guard]
    if args.evacuate_at_step is not None:
        callbacks.insert(0, EvacuateAtStep(guard, args.evacuate_at_step))
    trainer = Trainer(model=model, args=training, train_dataset=RandomTokens(), callbacks=callbacks)
    # The one resume line: gpuguard's newest checkpoint, or None to start from step 0. On an
    # evacuation train() raises gpuguard.Evacuation: the process exits 75.
    trainer.train(resume_from_checkpoint=guard.resume_path())
    where = f"resumed from {guard.resumed_from.id}" if guard.resumed_from else "from the start"
    print(f"rank {training.process_index} finished at global step {trainer.state.global_step} ({where})", flush=True)


if __name__ == "__main__":
    main()
