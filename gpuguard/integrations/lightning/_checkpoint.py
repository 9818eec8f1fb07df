"""Lightning's checkpoint dictionary in gpuguard's store: saving it as one state entry, reading it
back without unpickling, and `GpuGuardCheckpointIO` for ``fit(ckpt_path=<gpuguard checkpoint>)``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from gpuguard.checkpoint._tree import capture_rng, restore_rng
from gpuguard.errors import CheckpointError
from gpuguard.integrations.lightning import _internals

if TYPE_CHECKING:
    from gpuguard.checkpoint import CheckpointInfo

STATE_KEY = "lightning"  # the guard's state entry that holds Lightning's checkpoint dictionary
RNG_ENTRY = "gpuguard_rng"  # where a loaded checkpoint carries the saving rank's RNG states to the callback
RESUME_ENTRY = "gpuguard_resume"  # where the callback finds what it needs to put the random states back


class TrainerState:
    """Lightning's whole checkpoint dictionary as one entry of the guard's state.

    ``state_dict()`` is what ``Trainer.save_checkpoint`` writes (model, optimizers, schedulers,
    precision plugin, callbacks, loops with the dataloader position); gpuguard stores it as
    safetensors plus JSON, never pickled. Loading goes through Lightning's restore, not through here.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.at_epoch_end = False  # set while the callback steps the guard from on_train_epoch_end

    def state_dict(self) -> dict[str, Any]:
        checkpoint = _internals.dump_checkpoint(self.trainer)
        _internals.canonical_progress(checkpoint, self.trainer.current_epoch, self.at_epoch_end)
        checkpoint[RESUME_ENTRY] = {
            "at_epoch_end": self.at_epoch_end,
            # The generators the training loaders shuffle and seed with: the next epoch draws from
            # their state now (the callback puts them back once the resumed iterator exists).
            "loader_generators": [
                [g.get_state() for g in loader_generators(loader)]
                for loader in _internals.training_dataloaders(self.trainer)
            ],
        }
        return checkpoint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise CheckpointError(
            "a Lightning run resumes through Trainer.fit (GpuGuardCallback does it), not Guard.resume()"
        )


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects a dataloader draws from: its own (the seed of each
    iterator), its sampler's and its batch sampler's sampler's (the order; torchdata's
    ``RandomSampler`` makes one even when given none). Always in the same order."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None))
    for owner in candidates:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def load_lightning_checkpoint(
    checkpoint_dir: str,
    checkpoint_id: str | None = None,
    *,
    rank: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], CheckpointInfo]:
    """Read Lightning's checkpoint dictionary from a gpuguard checkpoint, without unpickling anything.

    The process's random number generators are left as they are: the saving rank's states come back
    under ``checkpoint["gpuguard_rng"]``, and `GpuGuardCallback` restores them where the resumed loop
    draws as the uninterrupted one did.

    Args:
        checkpoint_dir: the fsspec URL the callback writes to.
        checkpoint_id: a checkpoint's id; the newest committed one when None.
        rank: whose shard (and RNG states) to read; rank 0's when the checkpoint has no such rank.

    Returns:
        The dictionary ``Trainer.save_checkpoint`` would have written, and the checkpoint's description.

    Raises:
        CheckpointNotFoundError: nothing committed (or not that id).
        CheckpointCorruptError: a shard fails its checksums.
    """
    from gpuguard.checkpoint import CheckpointStore
    from gpuguard.errors import CheckpointNotFoundError

    with CheckpointStore(checkpoint_dir, storage_options or {}) as store:
        if checkpoint_id is None:
            info = store.latest()
            if info is None:
                raise CheckpointNotFoundError(f"no committed checkpoint under {checkpoint_dir}")
        else:
            info = next((i for i in store.list() if i.id == checkpoint_id), None)
            if info is None:
                raise CheckpointNotFoundError(f"no committed checkpoint {checkpoint_id!r} under {checkpoint_dir}")
        if rank >= info.world_size:
            rank = 0
        holder: dict[str, Any] = {STATE_KEY: None}
        ours = capture_rng()
        try:
            store.load(holder, info.id, rank=rank)  # restores the saved RNG states as it loads...
            saved = capture_rng()
        finally:
            restore_rng(ours)  # ...which the callback applies later, at the right point of the loop
    checkpoint = holder[STATE_KEY]
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{info.url} holds no Lightning checkpoint (no {STATE_KEY!r} entry with a state_dict)")
    checkpoint = _own_tensors(checkpoint)
    checkpoint[RNG_ENTRY] = saved
    return checkpoint, info


def _own_tensors(value: Any) -> Any:
    # The loaded tensors are views over the shard's read buffer: give Lightning its own copies, since
    # an optimizer's load_state_dict keeps same-device, same-dtype tensors as they are.
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _own_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_own_tensors(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_own_tensors(v) for v in value)
    return value


def gpuguard_checkpoint_location(path: Any) -> tuple[str, str] | None:
    """``(checkpoint_dir, checkpoint_id)`` when ``path`` names a gpuguard checkpoint folder, else None."""
    from gpuguard.checkpoint._manifest import CHECKPOINT_DIR

    folder, _, name = str(path).rstrip("/").rpartition("/")
    return (folder, name) if folder and CHECKPOINT_DIR.match(name) else None


def _checkpoint_io_bases() -> tuple[type, ...]:
    bases: list[type] = []
    try:
        from lightning.fabric.plugins import TorchCheckpointIO

        bases.append(TorchCheckpointIO)
    except ImportError:
        pass
    try:
        from lightning_fabric.plugins import TorchCheckpointIO as FabricTorchCheckpointIO

        bases.append(FabricTorchCheckpointIO)
    except ImportError:
        pass
    return tuple(bases)


class _GuardCheckpointIO:
    """Reads gpuguard checkpoints for ``Trainer.fit(ckpt_path=<gpuguard checkpoint URL>)``.

    A path whose last part is a gpuguard checkpoint folder (``.../step-000000001200-1a2b3c4d``, what
    `gpuguard.CheckpointInfo.url` gives) is read through gpuguard (no unpickling), with this rank's
    shard (``RANK``); any other path goes to Lightning's ``TorchCheckpointIO``. Saving is Lightning's.

    Example:
        >>> from gpuguard.lightning import GpuGuardCheckpointIO
        >>> plugins = [GpuGuardCheckpointIO()]   # lightning.pytorch.Trainer(plugins=plugins, ...)
    """

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        location = gpuguard_checkpoint_location(path)
        if location is not None:
            checkpoint, _ = load_lightning_checkpoint(*location, rank=int(os.environ.get("RANK", "0")))
            return checkpoint
        loaded: dict[str, Any] = super().load_checkpoint(path, *args, **kwargs)  # type: ignore[misc]
        return loaded


if TYPE_CHECKING:

    class GpuGuardCheckpointIO(_GuardCheckpointIO):
        pass

else:
    GpuGuardCheckpointIO = type(
        "GpuGuardCheckpointIO",
        (_GuardCheckpointIO, *_checkpoint_io_bases()),
        {"__module__": "gpuguard.lightning", "__doc__": _GuardCheckpointIO.__doc__},
    )
