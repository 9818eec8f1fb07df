"""PyTorch Lightning: `GpuGuardCallback`, a thin adapter that hands the work to `gpuguard.Guard`.

Usage::

    from gpuguard.lightning import GpuGuardCallback

    guard = GpuGuardCallback(checkpoint_dir="s3://bucket/run1")
    trainer = lightning.pytorch.Trainer(callbacks=[guard], strategy="ddp", max_epochs=10)
    trainer.fit(model, datamodule)        # resumes from gpuguard's newest checkpoint; exits 75 on an evacuation

What the callback does, and where:

- ``setup``: starts the guard (the process group exists by then), watching this rank's GPU.
- ``on_fit_start``: without a ``ckpt_path`` given to ``fit``, loads gpuguard's newest committed
  checkpoint (the same one on every rank: rank 0 chooses and broadcasts) and hands it to Lightning's
  own restore, which puts back the model, optimizers, schedulers, precision plugin, callbacks and loop
  progress (global step, epoch, batch; and the dataloader's position when it is stateful, e.g.
  ``torchdata.stateful_dataloader.StatefulDataLoader``). A ``ckpt_path`` you pass wins. It also checks
  once that Lightning's checkpoint can be stored without pickling, so a bad entry fails here, not in
  an emergency.
- ``on_train_batch_end``: after each optimizer step, ``guard.step(trainer.global_step)``: a flag read
  in the steady state; at the guard's sync points every rank agrees, and on an evacuation every rank
  writes the emergency checkpoint (Lightning's whole checkpoint dict, through gpuguard's engine) at the
  same batch. The callback then sets ``trainer.should_stop``, so the trainer stops after that batch on
  every rank (nothing saves or enters a collective that some ranks will not reach). Batches that only
  accumulate gradients are skipped (no optimizer step, nothing to save), and an epoch's last step is
  taken at ``on_train_epoch_end`` instead, where Lightning resumes it exactly.
- ``teardown``: when ``fit`` has finished its own teardown, raises the `gpuguard.Evacuation`
  (a ``SystemExit`` with the code, 75 or 76): uncaught, the process ends with that code, and code after
  ``fit`` does not run, so nothing mistakes an evacuated run for a finished one.

Works with ``lightning.pytorch`` and ``pytorch_lightning`` (the callback derives from both when both
are installed). Lightning's checkpoint dictionary is built with Lightning's own
``_checkpoint_connector.dump_checkpoint`` and restored by its connector's restore steps, the same ones
``Trainer.fit(ckpt_path=...)`` uses (tested with lightning 2.6); these private entry points are the ones
the adapter relies on. Lightning 2.6 resumes with its epoch counters one ahead after a resume; the
checkpoint stores them as a run that never stopped has them (`_canonical_epoch_progress`).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpuguard.checkpoint._tree import flatten
from gpuguard.errors import CheckpointError, ConfigError
from gpuguard.guard.guard import Evacuation, Guard

if TYPE_CHECKING:
    from gpuguard.checkpoint import CheckpointInfo

log = logging.getLogger("gpuguard")

STATE_KEY = "lightning"  # the guard's state entry that holds Lightning's checkpoint dictionary


def _callback_bases() -> tuple[type, ...]:
    bases: list[type] = []
    try:
        from lightning.pytorch import Callback as LightningCallback

        bases.append(LightningCallback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as PLCallback

        bases.append(PLCallback)
    except ImportError:
        pass
    if not bases:
        raise ImportError(
            "gpuguard.lightning needs PyTorch Lightning: pip install 'gpuguard[lightning]' "
            "(lightning) or pytorch-lightning"
        )
    return tuple(bases)


class _TrainerState:
    """Lightning's whole checkpoint dictionary as one entry of the guard's state.

    ``state_dict()`` is what ``Trainer.save_checkpoint`` writes (model, optimizers, schedulers,
    precision plugin, callbacks, loops with the dataloader position); gpuguard stores it as
    safetensors plus JSON, never pickled. Loading goes through Lightning's restore, not through here.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.at_epoch_end = False  # set while the callback steps the guard from on_train_epoch_end

    def state_dict(self) -> dict[str, Any]:
        checkpoint: dict[str, Any] = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        _canonical_epoch_progress(checkpoint, self.trainer.current_epoch, self.at_epoch_end)
        return checkpoint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise CheckpointError(
            "a Lightning run resumes through Trainer.fit (GpuGuardCallback does it), not Guard.resume()"
        )


def _canonical_epoch_progress(checkpoint: dict[str, Any], epoch: int, at_epoch_end: bool) -> None:
    """Write the fit loop's epoch counters as a run that never stopped has them at this point.

    After a resume, lightning 2.6 runs the next epoch with these counters one ahead (``processed``
    counts the running epoch), and a checkpoint taken then restarts at the following epoch's first
    batch, skipping the rest of this one. The counters are a function of where the checkpoint is
    taken: in epoch ``e``, mid-epoch, every counter but ``processed``/``completed`` is ``e + 1``; at
    the epoch's end (``on_train_epoch_end``) ``processed`` is ``e + 1`` too.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit, dict) or "epoch_progress" not in fit:
        return
    counts = {"ready": epoch + 1, "started": epoch + 1, "processed": epoch + (1 if at_epoch_end else 0)}
    counts["completed"] = epoch
    fit["epoch_progress"] = {"total": dict(counts), "current": dict(counts)}


def load_lightning_checkpoint(
    checkpoint_dir: str,
    checkpoint_id: str | None = None,
    *,
    rank: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], CheckpointInfo]:
    """Read Lightning's checkpoint dictionary from a gpuguard checkpoint, without unpickling anything.

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
        store.load(holder, info.id, rank=rank)
    checkpoint = holder[STATE_KEY]
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{info.url} holds no Lightning checkpoint (no {STATE_KEY!r} entry with a state_dict)")
    return _own_tensors(checkpoint), info


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


class _GuardHooks:
    """The callback's behaviour; `GpuGuardCallback` adds Lightning's ``Callback`` base(s)."""

    def __init__(
        self,
        checkpoint_dir: str | None = None,
        *,
        resume: bool = True,
        config_file: str | Path | None = None,
        nvml: Any = None,
        plugins: Iterable[object] = (),
        **settings: Any,
    ) -> None:
        if not isinstance(resume, bool):
            raise ConfigError("resume", resume, "must be True (resume from gpuguard's newest checkpoint) or False")
        # Built now, so bad settings and misspelt plugin hooks fail when the callback is created.
        # Lightning's state is one opaque dictionary (its checkpoint), not modules and optimizers the survivors of
        # a sudden loss could save from a replica: that protection is for plain loops (gpuguard.peers).
        settings.setdefault("sudden_loss", False)
        self.guard = Guard(checkpoint_dir, {}, config_file=config_file, nvml=nvml, plugins=plugins, **settings)
        self.resume = resume
        self.evacuation: Evacuation | None = None
        self.resumed_from: CheckpointInfo | None = None
        self._last_step = -1
        self._fitted = False
        self._guard_handlers: dict[int, Any] = {}

    # -- start ----------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self._fitted:
            # A guard's threads, agreement and store live for one fit; a second fit needs its own.
            raise ConfigError("GpuGuardCallback", "reused", "one callback serves one Trainer.fit; make a new one")
        self._fitted = True
        self.evacuation = None
        self._last_step = -1
        self.guard.state[STATE_KEY] = _TrainerState(trainer)
        before = _handlers(self._preemption_signals())
        self.guard.start()  # Lightning has initialised the process group by now
        after = _handlers(self._preemption_signals())
        self._guard_handlers = {s: h for s, h in after.items() if h is not before.get(s)}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._check_storable()
        if trainer.ckpt_path:
            latest = self._agreed_latest(trainer)
            if latest is not None:
                log.warning(
                    "fit(ckpt_path=%s) was given: resuming from it, not from gpuguard's newest checkpoint %s (step %d)",
                    trainer.ckpt_path,
                    latest.id,
                    latest.step,
                )
            return
        if not self.resume:
            log.info("gpuguard: resume=False; training starts from Lightning's own state")
            return
        latest = self._agreed_latest(trainer)
        if latest is None:
            log.info("no gpuguard checkpoint under %s: training starts from step 0", self.guard.config.checkpoint_dir)
            return
        checkpoint, info = load_lightning_checkpoint(
            self.guard.config.checkpoint_dir,
            latest.id,
            rank=trainer.global_rank,
            storage_options=self.guard.config.storage_options,
        )
        self._restore(trainer, checkpoint, info.url)
        self.resumed_from = info
        log.info("resumed from gpuguard checkpoint %s: global step %d", info.id, checkpoint.get("global_step", -1))

    def _agreed_latest(self, trainer: Any) -> CheckpointInfo | None:
        """The newest committed checkpoint as rank 0 sees it, the same on every rank."""
        assert self.guard.store is not None
        latest = self.guard.store.latest() if trainer.global_rank == 0 else None
        chosen = trainer.strategy.broadcast(latest.id if latest else None, src=0)
        if chosen is None or latest is not None:
            return latest
        found = next((i for i in self.guard.store.list() if i.id == chosen), None)
        if found is None:
            raise CheckpointError(f"rank 0 resumes from {chosen}, which rank {trainer.global_rank} cannot find")
        return found

    @staticmethod
    def _restore(trainer: Any, checkpoint: dict[str, Any], url: str) -> None:
        # What Trainer.fit(ckpt_path=...) does before on_fit_start (resume_start, then the modules and
        # callbacks); the training state (optimizers, schedulers, loops) and resume_end follow in
        # Lightning's own _run right after this hook, from the same loaded checkpoint.
        connector = trainer._checkpoint_connector
        migrate = _migration(trainer)
        connector._ckpt_path = url
        connector._loaded_checkpoint = migrate(checkpoint, url) if migrate else checkpoint
        connector.restore_model()
        connector.restore_datamodule()
        connector.restore_callbacks()

    def _check_storable(self) -> None:
        """Fail at the start, naming the entry, if Lightning's checkpoint holds something unstorable."""
        try:
            flatten(self.guard.state, rng=False)
        except CheckpointError as exc:
            raise CheckpointError(f"gpuguard cannot checkpoint this Lightning run without pickling: {exc}") from exc

    def _preemption_signals(self) -> list[int]:
        names = getattr(self.guard.config, "preemption_signals", [])
        return [int(getattr(signal, name)) for name in names if hasattr(signal, name)]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning installs its SIGTERM handler after setup, around the guard's: under DDP it would
        # raise at the next batch on every rank, before the guard's agreed emergency checkpoint. The
        # guard's handler alone makes SIGTERM what it is without Lightning: a checkpoint, then exit 75.
        for signum, handler in self._guard_handlers.items():
            if signal.getsignal(signum) is not handler:
                try:
                    signal.signal(signum, handler)
                except ValueError:  # not the main thread: Lightning's handling stays
                    continue
                log.info("gpuguard handles %s in this fit (Lightning's own handler is set aside)", signum)
        # The dataloaders exist from here on (the fit loop set them up just before this hook).
        loader = getattr(trainer.fit_loop, "_combined_loader", None)
        flattened = getattr(loader, "flattened", [])
        if flattened and not all(hasattr(dl, "state_dict") and hasattr(dl, "load_state_dict") for dl in flattened):
            log.warning(
                "the training dataloader is not stateful: a resume in the middle of an epoch continues the step "
                "count but reads the epoch's data from its start; use torchdata's StatefulDataLoader to continue "
                "at the exact batch"
            )
            return
        resumed = self.resumed_from is not None or bool(trainer.ckpt_path)
        plain = [dl for dl in flattened if _is_plain_distributed_sampler(getattr(dl, "sampler", None))]
        if resumed and trainer.current_epoch > 0 and plain:
            # Lightning (2.6) creates the resumed iterator before it sets the sampler's epoch, and a
            # sampler without state is fast-forwarded right then: with epoch 0's order.
            log.warning(
                "resumed in epoch %d with a DistributedSampler that does not save its position: Lightning "
                "fast-forwards it with epoch 0's order, so this epoch's remaining batches differ from an "
                "uninterrupted run; give the dataloader torchdata's StatefulDistributedSampler",
                trainer.current_epoch,
            )

    # -- the loop -------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:
            return  # accumulating gradients: no optimizer step, nothing to checkpoint at this batch
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # The epoch's last batch: Lightning cannot resume a checkpoint taken here exactly (lightning
            # 2.6 restarts with the epoch counters and the dataloader's position out of step, skipping or
            # repeating an epoch). The step is taken at this epoch's end instead, as ModelCheckpoint's
            # default does; the same on every rank, since every rank has the same number of batches.
            return
        self._step(trainer, step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:
            return
        holder = self.guard.state[STATE_KEY]
        holder.at_epoch_end = True
        try:
            self._step(trainer, step)
        finally:
            holder.at_epoch_end = False

    def _step(self, trainer: Any, step: int) -> None:
        self._last_step = step
        if self.evacuation is not None:
            # The trainer did not stop (min_steps / min_epochs not reached): every rank is here at the
            # same batch, so leave now rather than train on a bad GPU.
            raise self.evacuation
        try:
            self.guard.step(step)
        except Evacuation as evacuation:
            self.evacuation = evacuation
            trainer.should_stop = True
            log.warning(
                "gpuguard: stopping the trainer after global step %d; the process then exits %d",
                step,
                evacuation.code,
            )

    # -- the end --------------------------------------------------------------------------------

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.guard.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.guard.close()  # waits for periodic checkpoints in flight
        evacuation, self.evacuation = self.evacuation, None
        if evacuation is not None:
            raise evacuation

    def state_dict(self) -> dict[str, Any]:
        return {}


def _handlers(signums: list[int]) -> dict[int, Any]:
    return {s: signal.getsignal(s) for s in signums}


def _is_plain_distributed_sampler(sampler: Any) -> bool:
    from torch.utils.data import DistributedSampler

    return isinstance(sampler, DistributedSampler) and not hasattr(sampler, "load_state_dict")


def _migration(trainer: Any) -> Any:
    # Lightning upgrades old checkpoints on load; the function lives in whichever package runs the trainer.
    module = type(trainer).__module__.split(".")[0]
    try:
        if module == "pytorch_lightning":
            from pytorch_lightning.utilities.migration.utils import _pl_migrate_checkpoint
        else:
            from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint
    except ImportError:
        return None
    return _pl_migrate_checkpoint


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
    """

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from gpuguard.checkpoint._manifest import CHECKPOINT_DIR

        folder, _, name = str(path).rstrip("/").rpartition("/")
        if folder and CHECKPOINT_DIR.match(name):
            checkpoint, _ = load_lightning_checkpoint(folder, name, rank=int(os.environ.get("RANK", "0")))
            return checkpoint
        loaded: dict[str, Any] = super().load_checkpoint(path, *args, **kwargs)  # type: ignore[misc]
        return loaded


_DOC = """A Lightning callback that watches this rank's GPU and evacuates through the trainer.

    Args:
        checkpoint_dir: fsspec URL of gpuguard's checkpoints (or ``GPUGUARD_CHECKPOINT_DIR``).
        resume: load gpuguard's newest checkpoint when ``fit`` gets no ``ckpt_path``.
        config_file: a YAML file of guard settings.
        nvml: a ``pynvml``-compatible module (`gpuguard.fakenvml.FakeNvml` in tests).
        plugins: objects with ``@gpuguard.hookimpl`` methods.
        **settings: any `gpuguard.GuardConfig` field (``sync_every``, ``checkpoint_every_steps``, ...).

    Attributes:
        guard: the `gpuguard.Guard` doing the work.
        evacuation: the pending `gpuguard.Evacuation`, raised when ``fit`` ends.
        resumed_from: the gpuguard checkpoint this fit resumed from, if any.

    Raises:
        ConfigError: at construction, for a bad setting or plugin.

    Example:
        >>> from gpuguard.lightning import GpuGuardCallback
        >>> callback = GpuGuardCallback(checkpoint_dir="memory://doc-lightning")
    """

if TYPE_CHECKING:  # what type checkers see: the behaviour; at run time the Lightning base(s) join it

    class GpuGuardCallback(_GuardHooks):
        pass

    class GpuGuardCheckpointIO(_GuardCheckpointIO):
        pass

else:
    GpuGuardCheckpointIO = type(
        "GpuGuardCheckpointIO",
        (_GuardCheckpointIO, *_checkpoint_io_bases()),
        {"__module__": __name__, "__doc__": _GuardCheckpointIO.__doc__},
    )
    GpuGuardCallback = type(
        "GpuGuardCallback", (_GuardHooks, *_callback_bases()), {"__module__": __name__, "__doc__": _DOC}
    )

__all__ = ["GpuGuardCallback", "GpuGuardCheckpointIO", "load_lightning_checkpoint"]
