"""Every use of Lightning's private internals, in one place.

Lightning has no public way for a callback to (a) build the checkpoint dictionary that
``Trainer.save_checkpoint`` writes without writing it (and without its barrier: the emergency
checkpoint is taken on every rank at once), (b) hand a loaded dictionary to ``fit``'s own restore
from inside ``fit``, or (c) see the training dataloaders it iterates. These functions do it, for
``lightning.pytorch`` and ``pytorch_lightning`` alike. ``tests/test_lightning.py`` exercises each of them;
``scripts/test.sh`` runs it against the oldest supported release of both packages (``OLDEST``) as well as
the pinned newest (``scripts/constraints.txt``).
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from typing import Any, Final

from gpuguard.errors import ConfigError

# The oldest release of lightning and pytorch_lightning the callback supports (pyproject's extra says the
# same, and scripts/test.sh tests it). Older ones resume a checkpoint taken after a batch (on_train_batch_end)
# one batch early: the batch is trained twice (Lightning-AI/pytorch-lightning#14579, fixed in 2.5.0 by
# #20379); 2.3.0 and 2.4.0 did so in tests/test_lightning.py.
OLDEST: Final = (2, 5, 0)


def check_supported(trainer: Any) -> None:
    """Refuse, before anything trains, a Lightning release whose resumes would not be exact."""
    package = package_of(trainer)
    version = str(getattr(importlib.import_module(package.split(".")[0]), "__version__", "0"))
    if _release(version) < OLDEST:
        raise ConfigError(
            package,
            version,
            f"GpuGuardCallback needs {package.split('.')[0]}>={'.'.join(map(str, OLDEST))}: older releases resume a "
            "checkpoint taken after a batch one batch early, training that batch twice "
            "(Lightning-AI/pytorch-lightning#14579); pip install 'gpuguard[lightning]' upgrades it",
        )


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits or 0))
    return tuple(parts)


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


def creates_epoch_iterator_next(trainer: Any) -> bool:
    """From ``on_train_epoch_start``: whether Lightning creates this epoch's training dataloader
    iterator after the hook (in the epoch loop's ``on_run_start``), rather than training on the one
    it created before ``on_train_start``. Lightning's own condition: lightning 2.5 creates it in every
    epoch but the first of a fit; 2.6 not in the first epoch of a resumed fit either (``is_resuming``).
    """
    fit_loop = trainer.fit_loop
    resuming = bool(getattr(fit_loop, "is_resuming", False))
    return trainer.current_epoch > 0 and not fit_loop.epoch_loop.restarting and not resuming


def restart_train_iterator(trainer: Any) -> None:
    """Create the training dataloader iterator again, as Lightning does at an epoch's start.

    A fit resumed from an epoch's-end checkpoint may train the next epoch on the iterator Lightning
    created before ``on_train_start`` (before the saved random states could go back; see
    `creates_epoch_iterator_next`); the callback then calls this from ``on_train_epoch_start`` once
    they are back, so that the epoch's order and seeds are drawn from the states the uninterrupted
    run drew them from.
    """
    iter(trainer.fit_loop._data_fetcher)


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


def canonical_progress(checkpoint: dict[str, Any], epoch: int, at_epoch_end: bool) -> None:
    """Write the fit loop's counters as a run that never stopped has them at this point.

    Mid-epoch (``on_train_batch_end``): after a resume, lightning 2.6 runs the next epoch with the
    epoch counters one ahead (``processed`` counts the running epoch), and a checkpoint taken then
    restarts at the following epoch's first batch, skipping the rest of this one. In epoch ``e``
    every epoch counter but ``processed``/``completed`` is ``e + 1``.

    At an epoch's end (``on_train_epoch_end``): written as the loop stands between epoch ``e`` and
    ``e + 1`` (every epoch counter ``e + 1``; the per-epoch batch, scheduler and optimizer counters
    and the validation batch count zero, as Lightning resets them when an epoch starts) with no
    dataloader position: Lightning's own epoch-end restarts run that epoch's end again and, with
    ``max_steps``, count one epoch too many, and torchdata restores an end-of-epoch position as "just
    finishing" (meta-pytorch/data#1437). The next epoch's iterator starts afresh from the random
    states the callback saved (see `restart_train_iterator`). (The layout of ``checkpoint["loops"]``
    is Lightning's, hence here.)
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit, dict) or "epoch_progress" not in fit:
        return
    if at_epoch_end:
        counts = dict.fromkeys(("ready", "started", "processed", "completed"), epoch + 1)
        fit["epoch_progress"] = {"total": dict(counts), "current": dict(counts)}
        for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress"):
            _zero(fit.get(key), "current")
        optimizer = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
        for part in optimizer.values():
            _zero(part, "current")
        _zero(fit.get("epoch_loop.val_loop.batch_progress"), "total")
        if isinstance(fit.get("epoch_loop.batch_progress"), dict):
            fit["epoch_loop.batch_progress"]["is_last_batch"] = False
        if isinstance(fit.get("state_dict"), dict):
            fit["state_dict"].pop("combined_loader", None)
        return
    counts = {"ready": epoch + 1, "started": epoch + 1, "processed": epoch, "completed": epoch}
    fit["epoch_progress"] = {"total": dict(counts), "current": dict(counts)}


def _zero(progress: Any, part: str) -> None:
    if isinstance(progress, dict) and isinstance(progress.get(part), dict):
        progress[part] = dict.fromkeys(progress[part], 0)


def is_plain_launcher_child(trainer: Any) -> bool:
    """A rank that Lightning's own DDP launcher started as a child of rank 0 (``devices=N`` without
    torchrun or a cluster): its parent kills every rank when one exits non-zero."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return type(env).__name__ == "LightningEnvironment" and trainer.local_rank > 0


__all__ = [
    "OLDEST",
    "at_last_batch",
    "canonical_progress",
    "check_supported",
    "creates_epoch_iterator_next",
    "dump_checkpoint",
    "is_plain_launcher_child",
    "package_of",
    "restart_train_iterator",
    "restore_before_training",
    "restore_signal_at_teardown",
    "training_dataloaders",
]
