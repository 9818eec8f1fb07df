"""`GpuGuardCallback`'s behaviour; the Lightning ``Callback`` base(s) join it in ``__init__``."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpuguard.checkpoint._tree import capture_rng, flatten, restore_rng
from gpuguard.errors import CheckpointCorruptError, CheckpointError, ConfigError
from gpuguard.guard.guard import Evacuation, Guard
from gpuguard.integrations._leaving import evacuation_behind, keep_exit_code, wait_for_parent_to_leave
from gpuguard.integrations.lightning import _internals
from gpuguard.integrations.lightning._checkpoint import (
    RESUME_ENTRY,
    RNG_ENTRY,
    STATE_KEY,
    TrainerState,
    _GuardCheckpointIO,
    gpuguard_checkpoint_location,
    load_lightning_checkpoint,
    loader_generators,
)

if TYPE_CHECKING:
    from gpuguard.checkpoint import CheckpointInfo

log = logging.getLogger("gpuguard")


class GuardHooks:
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
        self._handlers_before: dict[int, Any] = {}
        # RNG states of the checkpoint resumed from, until the point of the loop where they apply.
        self._saved_rng: dict[str, Any] | None = None
        self._saved_generators: list[list[Any]] | None = None  # per training loader
        self._saved_at_epoch_end = False
        self._rng_after_batch: dict[str, Any] | None = None

    # -- start ----------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self._fitted:
            # A guard's threads, agreement and store live for one fit; a second fit needs its own.
            raise ConfigError("GpuGuardCallback", "reused", "one callback serves one Trainer.fit; make a new one")
        _internals.check_supported(trainer)
        self._fitted = True
        self.evacuation = None
        self._last_step = -1
        self._last_loss: Any = None  # the epoch's last batch's loss, for the step taken at the epoch's end
        self.guard.state[STATE_KEY] = TrainerState(trainer)
        before = _handlers(self._preemption_signals())
        self.guard.start()  # Lightning has initialised the process group by now
        after = _handlers(self._preemption_signals())
        self._guard_handlers = {s: h for s, h in after.items() if h is not before.get(s)}
        self._handlers_before = {s: before.get(s) for s in self._guard_handlers}

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
        elif not self.resume:
            log.info("gpuguard: resume=False; training starts from Lightning's own state")
        else:
            latest = self._agreed_latest(trainer)
            if latest is None:
                log.info(
                    "no gpuguard checkpoint under %s: training starts from step 0", self.guard.config.checkpoint_dir
                )
            else:
                checkpoint, info = load_lightning_checkpoint(
                    self.guard.config.checkpoint_dir,
                    latest.id,
                    rank=trainer.global_rank,
                    storage_options=self.guard.config.storage_options,
                )
                _internals.restore_before_training(trainer, checkpoint, info.url)
                self.resumed_from = info
                self.guard._restored(info)  # the loss check after a resume, as Guard.resume arms it
                log.info(
                    "resumed from gpuguard checkpoint %s: global step %d", info.id, checkpoint.get("global_step", -1)
                )

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Both ways in (gpuguard's own resume, and fit(ckpt_path=...) through GpuGuardCheckpointIO)
        # pass here. A checkpoint Lightning wrote itself carries neither entry: nothing to put back.
        saved = checkpoint.get(RNG_ENTRY)
        self._saved_rng = saved if isinstance(saved, dict) else None
        resume = checkpoint.get(RESUME_ENTRY)
        resume = resume if isinstance(resume, dict) else {}
        self._saved_at_epoch_end = bool(resume.get("at_epoch_end", False))
        generators = resume.get("loader_generators")
        self._saved_generators = generators if isinstance(generators, list) else None

    def _agreed_latest(self, trainer: Any) -> CheckpointInfo | None:
        """The newest committed checkpoint as rank 0 sees it, the same on every rank."""
        assert self.guard.store is not None
        latest, demoted = None, []
        if trainer.global_rank == 0:
            latest = self.guard.store.latest()  # never a demoted one (found bad after a restore)
            if latest is None:
                demoted = [i.id for i in self.guard.store.list() if i.demoted]
        chosen = trainer.strategy.broadcast(latest.id if latest else {"demoted": demoted} if demoted else None, src=0)
        if isinstance(chosen, dict):  # never a silent start from step 0: every checkpoint was found bad
            raise CheckpointCorruptError(
                f"every committed checkpoint under {self.guard.config.checkpoint_dir} was demoted after a restore "
                f"(see demoted/ there; delete a marker to trust its checkpoint again): {', '.join(chosen['demoted'])}"
            )
        if chosen is None or latest is not None:
            return latest
        found = next((i for i in self.guard.store.list() if i.id == chosen), None)
        if found is None:
            raise CheckpointError(f"rank 0 resumes from {chosen}, which rank {trainer.global_rank} cannot find")
        return found

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
            # Lightning's teardown puts back what it found at fit's start (the guard's handler): after
            # an interrupted fit it runs after every callback hook, so it must put back what was before.
            _internals.restore_signal_at_teardown(trainer, signum, self._handlers_before.get(signum))
        # The resumed step is the checkpoint's own, not one to take again.
        self._last_step = int(trainer.global_step) if trainer.global_step else -1
        flattened = _internals.training_dataloaders(trainer)
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

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._saved_at_epoch_end and self._saved_rng is not None:
            # Taken at an epoch's end, and this is the next epoch's start (the checkpoint holds the
            # loop between the two, with no dataloader position). In the run that saved, this
            # epoch's iterator was created right after this hook, from the saved states: they go
            # back now, and where Lightning would train on the iterator it created before
            # on_train_start (from a fresh process's states) it is created again, so this epoch's
            # order, its seeds and the dropout after them are the uninterrupted run's.
            restore_rng(self._saved_rng)
            self._restore_loader_generators(trainer)
            if not _internals.creates_epoch_iterator_next(trainer):
                _internals.restart_train_iterator(trainer)
            self._saved_rng = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._saved_rng is not None:
            # Taken mid-epoch: Lightning has just created the resumed dataloader iterator (drawing a
            # seed from the global generator, as it had at this epoch's start in the run that saved,
            # and, for a loader with a generator of its own, re-drawing this epoch's order from the
            # state saved at its start without the seed drawn after it): the states go back now, so
            # the first resumed batch draws what the next batch would have, and the next epoch's
            # iterator starts from the generators' states at the checkpoint, as it did uninterrupted.
            restore_rng(self._saved_rng)
            self._restore_loader_generators(trainer)
            self._saved_rng = None

    def _restore_loader_generators(self, trainer: Any) -> None:
        saved, self._saved_generators = self._saved_generators, None
        if saved is None:
            return
        loaders = _internals.training_dataloaders(trainer)
        current = [loader_generators(loader) for loader in loaders]
        if [len(g) for g in current] != [len(s) for s in saved]:
            log.warning(
                "gpuguard: the training dataloaders draw from %s generator(s), the checkpoint saved %s: their "
                "states are not restored, so the order of the epochs after this one differs from an "
                "uninterrupted run's",
                [len(g) for g in current],
                [len(s) for s in saved],
            )
            return
        for generators, states in zip(current, saved, strict=True):
            for generator, state in zip(generators, states, strict=True):
                generator.set_state(state)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if getattr(trainer, "enable_validation", True):
            # Validation may follow this batch; its dataloader iterator draws a seed from the global
            # generator. A resume skips a validation that followed its checkpoint, so training must
            # not depend on it: the states go back after every validation (on_validation_end).
            self._rng_after_batch = capture_rng()
        step = int(trainer.global_step)
        if step == self._last_step:
            return  # accumulating gradients: no optimizer step, nothing to checkpoint at this batch
        # The loss Lightning already holds (training_step's, detached, divided by accumulate_grad_batches): handed
        # to the guard as a tensor, never read here (the guard keeps a reference; no device sync per step).
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._last_loss = loss if isinstance(loss, torch.Tensor) else None
        if _internals.at_last_batch(trainer):
            # The epoch's last batch: Lightning cannot resume a checkpoint taken here exactly (lightning
            # 2.6 restarts with the epoch counters and the dataloader's position out of step, skipping or
            # repeating an epoch). The step is taken at this epoch's end instead, as ModelCheckpoint's
            # default does; the same on every rank, since every rank has the same number of batches.
            return
        self._step(trainer, step, self._last_loss)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._rng_after_batch is not None and not trainer.sanity_checking:
            restore_rng(self._rng_after_batch)
            self._rng_after_batch = None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:
            return
        holder = self.guard.state[STATE_KEY]
        holder.at_epoch_end = True
        try:
            self._step(trainer, step, self._last_loss)
        finally:
            holder.at_epoch_end = False

    def _step(self, trainer: Any, step: int, loss: Any = None) -> None:
        self._last_step = step
        try:
            self.guard.step(step, loss)
        except Evacuation as evacuation:
            # The checkpoint is handled on every rank at this same batch: leave now. Nothing of the
            # loop runs after it (no validation, no further batch); Lightning calls the callbacks'
            # on_exception with this Evacuation, tears down, and fit raises it (a SystemExit: exit 75/76).
            self.evacuation = evacuation
            keep_exit_code()
            log.warning(
                "gpuguard: leaving the trainer after global step %d; the process exits %d", step, evacuation.code
            )
            if _internals.is_plain_launcher_child(trainer):
                wait_for_parent_to_leave(self.guard.config.commit_timeout_s)
            raise

    # -- the end --------------------------------------------------------------------------------

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        evacuating = evacuation_behind(exception) is not None
        # Leaving for the GPU's or the pod's sake: periodic saves still in flight get a short bound.
        self.guard.close(min(10.0, self.guard.config.commit_timeout_s) if evacuating else None)
        location = gpuguard_checkpoint_location(trainer.ckpt_path) if trainer.ckpt_path else None
        if (
            location is not None
            and not evacuating
            and not isinstance(trainer.strategy.checkpoint_io, _GuardCheckpointIO)
        ):
            # Lightning's own reader failed on a gpuguard checkpoint folder (an IsADirectoryError, or
            # whatever another CheckpointIO raises), before anything trained. Raised from here, on
            # every Python: one gpuguard error naming the fix, with Lightning's error as its cause.
            # (Lightning's remaining exception hooks and its teardown are skipped: nothing has run.)
            message = (
                f"fit(ckpt_path={str(trainer.ckpt_path)!r}) names a gpuguard checkpoint, which "
                f"{type(trainer.strategy.checkpoint_io).__name__} cannot read: pass "
                "plugins=[gpuguard.lightning.GpuGuardCheckpointIO()] to the Trainer, or leave ckpt_path out "
                "(GpuGuardCallback resumes from gpuguard's newest checkpoint by itself)"
            )
            log.error("gpuguard: %s", message)
            raise CheckpointError(message) from exception

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.guard.close()  # waits for periodic checkpoints in flight


def _handlers(signums: list[int]) -> dict[int, Any]:
    return {s: signal.getsignal(s) for s in signums}


def _is_plain_distributed_sampler(sampler: Any) -> bool:
    from torch.utils.data import DistributedSampler

    return isinstance(sampler, DistributedSampler) and not hasattr(sampler, "load_state_dict")
