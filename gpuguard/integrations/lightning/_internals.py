"""Every use of Lightning's private internals, in one place.

Lightning has no public way for a callback to (a) build the checkpoint dictionary that
``Trainer.save_checkpoint`` writes without writing it (and without its barrier: the emergency
checkpoint is taken on every rank at once), (b) hand a loaded dictionary to ``fit``'s own restore
from inside ``fit``, or (c) see the training dataloaders it iterates. These functions do it, for
``lightning.pytorch`` and ``pytorch_lightning`` alike. ``tests/test_lightning.py`` exercises each of them with lightning
2.6.6 and pytorch_lightning 2.6.6 (the pinned releases); a CI run against the oldest release the
extra admits is still to be added (see ``SUPPORTED``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

SUPPORTED = ("2.6.6", "2.6.6")  # the releases tested so far (oldest, newest); the extra admits >=2.3, untested


def package_of(trainer: Any) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``: whichever package runs ``trainer``."""
    return "pytorch_lightning" if type(trainer).__module__.startswith("pytorch_lightning") else "lightning.pytorch"


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """What ``Trainer.save_checkpoint`` would write (model, optimizers, schedulers, precision plugin,
    callbacks, loops with the dataloader position), built in memory on this rank, with no collective."""
    checkpoint: dict[str, Any] = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    return checkpoint


def restore_before_training(trainer: Any, checkpoint: dict[str, Any], url: str) -> None:
    """From ``on_fit_start``: what ``fit(ckpt_path=...)`` does before that hook.

    Puts back the model, the datamodule and the callbacks (which calls their ``on_load_checkpoint``
    and ``load_state_dict``) and leaves the checkpoint loaded, so that Lightning's ``_run`` restores
    the training state (optimizers, schedulers, loops) from it right after the hook, as it does for a
    ``ckpt_path``.
    """
    connector = trainer._checkpoint_connector
    migrate = _migration(trainer)
    connector._ckpt_path = url
    connector._loaded_checkpoint = migrate(checkpoint, url) if migrate else checkpoint
    connector.restore_model()
    connector.restore_datamodule()
    connector.restore_callbacks()


def training_dataloaders(trainer: Any) -> list[Any]:
    """The training dataloaders the fit loop iterates (from ``on_train_start`` on)."""
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    return list(getattr(loader, "flattened", []))


def at_last_batch(trainer: Any) -> bool:
    """In ``on_train_batch_end``: whether this batch is the epoch's last."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def repeats_epoch_end(trainer: Any) -> bool:
    """From ``on_train_start`` of a fit resumed from a checkpoint taken at an epoch's end: whether
    Lightning runs that epoch's end again and creates the next epoch's dataloader iterator after
    ``on_train_epoch_start`` (lightning 2.6 does with ``max_steps`` set), rather than training the
    next epoch on the iterator it created before ``on_train_start`` (without ``max_steps``)."""
    return bool(getattr(trainer.fit_loop, "restarted_on_epoch_end", False))


def restore_signal_at_teardown(trainer: Any, signum: int, handler: Any) -> None:
    """Make Lightning's teardown put ``handler`` back for ``signum`` (its signal connector restores
    the handlers it found when ``fit`` began, the guard's among them, after every callback hook of
    an interrupted fit has run)."""
    originals = getattr(trainer._signal_connector, "_original_handlers", None)
    if isinstance(originals, dict) and signum in originals:
        originals[signum] = handler


def _migration(trainer: Any) -> Callable[[dict[str, Any], str], dict[str, Any]] | None:
    # Lightning upgrades old checkpoints on load; the function lives in whichever package runs the trainer.
    try:
        module = importlib.import_module(f"{package_of(trainer)}.utilities.migration.utils")
    except ImportError:
        return None
    migrate: Callable[[dict[str, Any], str], dict[str, Any]] | None = getattr(module, "_pl_migrate_checkpoint", None)
    return migrate


def canonical_epoch_progress(checkpoint: dict[str, Any], epoch: int, at_epoch_end: bool) -> None:
    """Write the fit loop's epoch counters as a run that never stopped has them at this point.

    After a resume, lightning 2.6 runs the next epoch with these counters one ahead (``processed``
    counts the running epoch), and a checkpoint taken then restarts at the following epoch's first
    batch, skipping the rest of this one. The counters are a function of where the checkpoint is
    taken: in epoch ``e``, mid-epoch, every counter but ``processed``/``completed`` is ``e + 1``; at
    the epoch's end (``on_train_epoch_end``) ``processed`` is ``e + 1`` too. (The layout of
    ``checkpoint["loops"]`` is Lightning's, hence here.)
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit, dict) or "epoch_progress" not in fit:
        return
    counts = {"ready": epoch + 1, "started": epoch + 1, "processed": epoch + (1 if at_epoch_end else 0)}
    counts["completed"] = epoch
    fit["epoch_progress"] = {"total": dict(counts), "current": dict(counts)}


def is_plain_launcher_child(trainer: Any) -> bool:
    """A rank that Lightning's own DDP launcher started as a child of rank 0 (``devices=N`` without
    torchrun or a cluster): its parent kills every rank when one exits non-zero."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return type(env).__name__ == "LightningEnvironment" and trainer.local_rank > 0


__all__ = [
    "SUPPORTED",
    "at_last_batch",
    "canonical_epoch_progress",
    "dump_checkpoint",
    "is_plain_launcher_child",
    "package_of",
    "repeats_epoch_end",
    "restore_before_training",
    "restore_signal_at_teardown",
    "training_dataloaders",
]
