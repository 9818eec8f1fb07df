"""Everything the Trainer adapter assumes about transformers and accelerate beyond their documented API, in one place.

transformers has no public way for a callback to (a) hand ``Trainer.train`` a place to resume from other
than a checkpoint folder, (b) find fp16's gradient scaler, or (c) tell from a callback whether the run is
sharded. These functions do it; ``tests/test_transformers.py`` exercises each of them against the pinned
release (``scripts/constraints.txt``), and the resume tests would fail should Trainer change what it reads.

- A resume folder: ``Trainer.train(resume_from_checkpoint=<folder>)`` positions the loop (the epoch to
  start in, the batches of it to skip, the callbacks' states) from the folder's ``trainer_state.json``
  (`TRAINER_STATE_FILE`) and requires model weights there (`MODEL_FILE`); optimizer, scheduler, scaler
  and RNG files it loads only when present (``Trainer._load_from_checkpoint``,
  ``_load_optimizer_and_scheduler``, ``_load_rng_state``, transformers 5.24).
- Where Trainer's own resume restores the random number generators (``Trainer._inner_training_loop``):
  at the start of the first epoch for a checkpoint at an epoch's end, after the skipped batches otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import SAFE_WEIGHTS_NAME

TRAINER_STATE_FILE: str = TRAINER_STATE_NAME  # "trainer_state.json"
MODEL_FILE: str = SAFE_WEIGHTS_NAME  # "model.safetensors"


def trainer_state_dict(state: TrainerState, control: TrainerControl) -> dict[str, Any]:
    """What ``TrainerState.save_to_json`` writes to ``trainer_state.json``, with ``TrainerControl``'s
    exported state refreshed as ``Trainer._save_checkpoint`` refreshes it."""
    saved = dataclasses.asdict(state)
    callbacks = dict(saved.get("stateful_callbacks") or {})
    if "TrainerControl" in callbacks:
        callbacks["TrainerControl"] = control.state()
    saved["stateful_callbacks"] = callbacks
    return saved


def gradient_scaler(optimizer: Any) -> Any:
    """fp16's ``torch.amp.GradScaler``, held by accelerate's ``AcceleratedOptimizer`` (``.scaler``), or None."""
    return getattr(optimizer, "scaler", None)


def jit_checkpoint_enabled(args: TrainingArguments) -> bool:
    """``TrainingArguments.enable_jit_checkpoint`` (transformers 5: Trainer's own save on SIGTERM)."""
    return bool(getattr(args, "enable_jit_checkpoint", False))


def sharding_settings(args: TrainingArguments) -> dict[str, Any]:
    """FSDP and DeepSpeed as Trainer sees them: from ``TrainingArguments`` or from ``accelerate launch``
    (which passes them to the workers in its environment)."""
    return {
        "TrainingArguments.fsdp": getattr(args, "fsdp", None),
        "TrainingArguments.deepspeed": getattr(args, "deepspeed", None),
        "ACCELERATE_USE_FSDP": _truthy(os.environ.get("ACCELERATE_USE_FSDP")),
        "ACCELERATE_USE_DEEPSPEED": _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED")),
    }


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


__all__ = [
    "MODEL_FILE",
    "TRAINER_STATE_FILE",
    "gradient_scaler",
    "jit_checkpoint_enabled",
    "sharding_settings",
    "trainer_state_dict",
]
