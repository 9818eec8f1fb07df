"""`GpuGuardCallback` for ``transformers.Trainer``: a thin adapter that hands the work to `gpuguard.Guard`."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gpuguard.checkpoint import CheckpointStore
from gpuguard.checkpoint._tree import capture_rng, restore_rng
from gpuguard.errors import CheckpointError, ConfigError, GpuGuardError, StorageError
from gpuguard.guard.guard import Evacuation, Guard
from gpuguard.integrations._leaving import keep_exit_code
from gpuguard.integrations.transformers._internals import (
    gradient_scaler,
    jit_checkpoint_enabled,
    sharding_settings,
    trainer_state_dict,
)
from gpuguard.integrations.transformers._resume import (
    SavedRun,
    all_ranks_ok,
    broadcast_from_zero,
    lay_out,
    optimizer_state,
    rank_and_world,
    read_saved_run,
    resume_folder,
)

log = logging.getLogger("gpuguard")

RESUME_LINE = "trainer.train(resume_from_checkpoint=callback.resume_path())"


class TrainerProgress:
    """The Trainer's own state (`transformers.TrainerState`) as an entry of the guard's state.

    ``state_dict()`` is what Trainer writes to ``trainer_state.json`` in its own checkpoints: global
    step, epoch (from which Trainer derives the batches of the epoch to skip on resume), log history,
    best metric and step, the callbacks' exported states (``TrainerControl``'s refreshed as Trainer
    does); stored as JSON, never pickled. It is read back through `GpuGuardCallback.resume_path`.
    """

    def __init__(self, state: TrainerState, control: TrainerControl) -> None:
        self.state = state
        self.control = control

    def state_dict(self) -> dict[str, Any]:
        return {"trainer_state": trainer_state_dict(self.state, self.control)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise CheckpointError(f"a Trainer run resumes through {RESUME_LINE}, not Guard.resume()")


class GpuGuardCallback(TrainerCallback):
    """A ``transformers.Trainer`` callback that watches this rank's GPU, checkpoints into gpuguard's
    store and evacuates the job; the next run resumes bitwise with one line.

    Usage (on every rank, as ``train`` is)::

        callback = GpuGuardCallback(checkpoint_dir="s3://bucket/run1")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        trainer.train(resume_from_checkpoint=callback.resume_path())   # None when there is nothing to resume

    What it does, and where:

    - `resume_path` (before ``train``): the ranks agree on gpuguard's newest committed checkpoint that
      every rank can read (rank 0 lists, each rank reads and checks its part, one collective), read it
      without unpickling, and lay out in a node-local folder the two files Trainer's own resume reads
      to find its place: ``trainer_state.json`` (global step, epoch, log history, best metric: Trainer
      skips the epochs and the batches of the current epoch already trained) and ``model.safetensors``.
    - ``on_train_begin``: starts the guard (the process group exists by then); after a resume, puts back
      the optimizer, learning-rate scheduler and gradient scaler from memory. A ``train()`` that would
      start from step 0 while gpuguard holds a committed checkpoint is refused (``resume=False`` allows it).
    - random number generators (torch CPU/CUDA, numpy, Python ``random``) come back where Trainer's own
      resume puts them (before the epoch's dataloader iterator for a checkpoint at an epoch's end, after
      the skipped batches otherwise), and each evaluation leaves them as it found them (a resume does not
      repeat the evaluation that followed its checkpoint), so a resume is bitwise identical with dropout.
    - ``on_step_end`` (once per optimizer step, so not on gradient-accumulation micro-batches):
      ``guard.step(state.global_step)``, a flag read in the steady state. On an evacuation every rank
      checkpoints the same optimizer step and `gpuguard.Evacuation` is raised from the hook at once: no
      logging, evaluation, Trainer save or further batch runs. ``train`` raises it (a ``SystemExit``):
      the process exits 75 (or 76), also when teardown on the failed GPU raises meanwhile.
    - SIGTERM (and the other ``preemption_signals``): the guard's handler records it and the next
      optimizer step is checkpointed on every rank, then the process exits 75.

    Supported: one process, and data parallelism (DDP) under torchrun or ``gpuguard-run`` (``accelerate
    launch`` starts DDP workers through torchrun too). FSDP and DeepSpeed through Trainer, and Trainer's
    ``enable_jit_checkpoint``, are refused when the Trainer is created.

    Args:
        checkpoint_dir: fsspec URL of gpuguard's checkpoints (or ``GPUGUARD_CHECKPOINT_DIR``).
        resume: False lets ``train()`` start from step 0 over committed checkpoints (with a warning),
            and `resume_path` returns None.
        config_file: a YAML file of guard settings.
        nvml: a ``pynvml``-compatible module (`gpuguard.fakenvml.FakeNvml` in tests).
        plugins: objects with ``@gpuguard.hookimpl`` methods.
        **settings: any `gpuguard.GuardConfig` field (``sync_every``, ``checkpoint_every_steps``,
            ``replicated=True`` for DDP: the ranks split the writing).

    Attributes:
        guard: the `gpuguard.Guard` doing the work.
        evacuation: the `gpuguard.Evacuation` this ``train`` left with, if any.
        resumed_from: the gpuguard checkpoint this ``train`` resumed from, if any.

    Raises:
        ConfigError: at construction, for a bad setting or plugin.

    Example:
        >>> from gpuguard.transformers import GpuGuardCallback
        >>> callback = GpuGuardCallback(checkpoint_dir="memory://doc-transformers")
    """

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
        self.guard = Guard(checkpoint_dir, {}, config_file=config_file, nvml=nvml, plugins=plugins, **settings)
        self.resume = resume
        self.evacuation: Evacuation | None = None
        self.resumed_from: Any = None  # gpuguard.CheckpointInfo
        self._args: TrainingArguments | None = None
        self._trained = False
        self._saved: SavedRun | None = None  # read by resume_path, applied in on_train_begin
        self._folder: Path | None = None  # resume_path's folder, removed once Trainer has read it
        self._progress: TrainerProgress | None = None
        self._rng_at: str | None = None  # "epoch" or "step": where the resumed loop gets the saved RNG states
        self._saved_rng: dict[str, Any] = {}
        self._rng_before_eval: dict[str, Any] | None = None

    # -- before train() -------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._args = args
        if jit_checkpoint_enabled(args):
            raise ConfigError(
                "TrainingArguments.enable_jit_checkpoint",
                True,
                "GpuGuardCallback takes the emergency checkpoint on SIGTERM itself; two savers would share the "
                "pod's grace period: leave enable_jit_checkpoint off",
            )
        # FSDP and DeepSpeed come from TrainingArguments or from `accelerate launch` (its environment).
        for name, value in sharding_settings(args).items():
            if value:
                raise ConfigError(
                    name,
                    value,
                    "GpuGuardCallback supports one process and data parallelism (DDP); with FSDP use "
                    "gpuguard.Guard in your own loop (it checkpoints fully_shard state)",
                )

    def resume_path(self) -> str | None:
        """Agree on gpuguard's newest checkpoint and lay out what ``Trainer.train`` resumes from.

        Call it on every rank after creating the Trainer with this callback, and pass the result to
        ``train(resume_from_checkpoint=...)``. Returns None when gpuguard holds no committed checkpoint
        (or ``resume=False``): the run starts from step 0.

        Raises:
            GpuGuardError: called before the Trainer was created with this callback.
            CheckpointError: checkpoints exist, and none can be read on every rank.
            StorageError: rank 0 cannot list the checkpoints (never read as "nothing to resume").
        """
        if self._args is None:
            raise GpuGuardError(
                "resume_path() needs the Trainer: create Trainer(..., callbacks=[callback]) first, then call "
                f"{RESUME_LINE}"
            )
        if not self.resume:
            log.info("gpuguard: resume=False; train() starts from Trainer's own state")
            return None
        config = self.guard.config
        with CheckpointStore(config.checkpoint_dir, config.storage_options) as store:
            saved = read_saved_run(store)  # a collective: every rank gets the same checkpoint, or raises
        if saved is None:
            log.info("gpuguard: no committed checkpoint under %s: training starts from step 0", config.checkpoint_dir)
            return None
        folder = resume_folder(config.checkpoint_dir, saved.info.id)
        writer = int(getattr(self._args, "local_process_index", 0)) == 0
        problem: Exception | None = None
        if writer:  # one copy per node: the node's ranks read the same files
            try:
                lay_out(folder, saved)
            except (OSError, GpuGuardError) as exc:
                problem = exc
        if not all_ranks_ok(problem is None):  # also the barrier before the other local ranks read it
            raise CheckpointError(f"the resume files for {saved.info.id} could not be written in {folder}") from problem
        saved.entries.pop("model")  # Trainer reads the model from the folder: no second copy in memory
        self._saved = saved
        self._folder = folder if writer else None
        log.warning(
            "gpuguard: resuming from checkpoint %s (global step %d, %s)",
            saved.info.id,
            saved.info.step,
            saved.info.reason,
        )
        return str(folder)

    # -- start ----------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._trained:
            # A guard's threads, agreement and store live for one train(); another needs its own.
            raise ConfigError("GpuGuardCallback", "reused", "one callback serves one Trainer.train; make a new one")
        self._trained = True
        self.evacuation = None
        model, optimizer, scheduler = kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        self._progress = TrainerProgress(state, control)
        entries: dict[str, Any] = {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler}
        entries["trainer"] = self._progress
        scaler = gradient_scaler(optimizer)
        if scaler is not None:
            entries["scaler"] = scaler
        self.guard.state.update({k: v for k, v in entries.items() if v is not None})
        self.guard.start()  # the process group exists; its start-up collective means every rank got here
        if self._folder is not None:
            # Every rank has read the files by now (Trainer reads them before on_train_begin, and the
            # guard's start agreed across the ranks): the node-local copy of the model can go.
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        try:
            if self._saved is not None:
                self._put_back(state, model, optimizer, scheduler, scaler)
            else:
                self._check_fresh_start(state)
        except BaseException:
            self.guard.close()
            raise

    def _put_back(self, state: TrainerState, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> None:
        saved = self._saved
        assert saved is not None
        self._saved = None
        if state.global_step != saved.info.step:
            raise ConfigError(
                "train(resume_from_checkpoint=...)",
                f"global step {state.global_step}",
                f"resume_path() laid out gpuguard's checkpoint {saved.info.id} (global step {saved.info.step}); "
                f"pass its result: {RESUME_LINE}",
            )
        for name, live in (("optimizer", optimizer), ("lr_scheduler", scheduler)):
            value = saved.entries.get(name)
            if value is None:
                raise CheckpointError(f"{saved.info.url} holds no {name} state: it cannot resume a Trainer run")
            if name == "optimizer" and live is not None:
                value = optimizer_state(live, model, value, saved.info.url)  # stored keyed by parameter name
            if live is not None:  # Trainer has created both by on_train_begin
                live.load_state_dict(value)
        saved_scaler = saved.entries.get("scaler")
        if scaler is not None and saved_scaler is not None:
            scaler.load_state_dict(saved_scaler)
        elif scaler is not None or saved_scaler is not None:  # the run's precision changed since the checkpoint
            log.warning(
                "gpuguard: %s",
                "the checkpoint holds no gradient scaler state: this run's (fp16) starts afresh"
                if scaler is not None
                else "this run has no gradient scaler (not fp16): the checkpoint's scaler state is not used",
            )
        epoch = float(saved.trainer_state.get("epoch") or 0.0)
        # Where Trainer's own resume restores the generators (Trainer._run_epoch): a checkpoint at an
        # epoch's end resumes at the next epoch's start, before its dataloader iterator is created; one
        # in the middle of an epoch, after the skipped batches, before the next optimizer step's.
        self._rng_at = "epoch" if epoch.is_integer() else "step"
        self._saved_rng = saved.rng
        if getattr(self._args, "ignore_data_skip", False) and self._rng_at == "step":
            log.warning(
                "gpuguard: ignore_data_skip=True: Trainer resumes this epoch from its first batch, so the data "
                "differs from an uninterrupted run's"
            )
        self.resumed_from = saved.info
        log.warning("gpuguard: resumed from checkpoint %s: global step %d", saved.info.id, state.global_step)

    def _check_fresh_start(self, state: TrainerState) -> None:
        assert self.guard.store is not None
        rank, _ = rank_and_world()
        latest, error = None, None
        if rank == 0:
            try:
                info = self.guard.store.latest()
            except StorageError as exc:
                error = str(exc)
            else:
                latest = None if info is None else (info.id, info.step)
        latest, error = broadcast_from_zero((latest, error))  # every rank refuses, or none
        if error is not None:
            raise StorageError(
                f"rank 0 cannot tell whether gpuguard holds a checkpoint under {self.guard.config.checkpoint_dir}, "
                f"so this run cannot know it starts from step 0 rightly: {error}"
            )
        if latest is None:
            if state.global_step == 0:
                log.info(
                    "gpuguard: no checkpoint under %s: training starts from step 0", self.guard.config.checkpoint_dir
                )
            return
        checkpoint_id, step = latest
        if state.global_step > 0:
            log.warning(
                "gpuguard: train() resumed from a Trainer checkpoint at global step %d, not from gpuguard's newest "
                "checkpoint %s (step %d)",
                state.global_step,
                checkpoint_id,
                step,
            )
        elif self.resume:
            raise ConfigError(
                "train(resume_from_checkpoint=...)",
                None,
                f"gpuguard holds checkpoint {checkpoint_id} (global step {step}) under "
                f"{self.guard.config.checkpoint_dir}, and this run would train from step 0 over it: resume with "
                f"{RESUME_LINE}, or pass GpuGuardCallback(..., resume=False) to start over",
            )
        else:
            log.warning(
                "gpuguard: resume=False: training starts from step 0 although checkpoint %s (step %d) exists",
                checkpoint_id,
                step,
            )

    # -- the loop -------------------------------------------------------------------------------

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._rng_at == "epoch":
            restore_rng(self._saved_rng)
            self._rng_at = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._rng_at == "step":
            restore_rng(self._saved_rng)
            self._rng_at = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.control = control
        if args.eval_strategy != "no":
            # An evaluation may follow this step; its dataloader iterator draws from the global
            # generator. A resume does not repeat an evaluation that followed its checkpoint, so
            # training must not depend on it: the states go back after every evaluation.
            self._rng_before_eval = capture_rng()
        try:
            self.guard.step(int(state.global_step))
        except Evacuation as evacuation:
            # Every rank checkpointed this optimizer step: leave now, before this step's logging,
            # evaluation or save, and before another batch. train() raises it (exit 75/76).
            self.evacuation = evacuation
            keep_exit_code()
            log.warning(
                "gpuguard: leaving the trainer after global step %d; the process exits %d",
                state.global_step,
                evacuation.code,
            )
            # Leaving for the GPU's or the pod's sake: periodic saves still in flight get a short bound.
            self.guard.close(min(10.0, self.guard.config.commit_timeout_s))
            raise

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._rng_before_eval is not None:
            restore_rng(self._rng_before_eval)

    # -- the end --------------------------------------------------------------------------------

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._rng_before_eval = None
        self.guard.close()  # waits for periodic checkpoints in flight


__all__ = ["RESUME_LINE", "GpuGuardCallback", "TrainerProgress"]
