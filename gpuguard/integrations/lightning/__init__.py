"""PyTorch Lightning: `GpuGuardCallback`, a thin adapter that hands the work to `gpuguard.Guard`.

Users import it from `gpuguard.lightning`. Layout: ``_callback`` (the hooks), ``_checkpoint``
(Lightning's checkpoint dictionary in gpuguard's store), ``_internals`` (every private Lightning
entry point the adapter needs, tested against the oldest and newest supported releases).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpuguard.integrations.lightning._callback import GuardHooks
from gpuguard.integrations.lightning._checkpoint import GpuGuardCheckpointIO, load_lightning_checkpoint


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


_DOC = """A Lightning callback that watches this rank's GPU, resumes from gpuguard's checkpoints and
    evacuates through the trainer.

    What it does, and where:

    - ``setup``: starts the guard (the process group exists by then), watching this rank's GPU.
    - ``on_fit_start``: without a ``ckpt_path`` given to ``fit``, loads gpuguard's newest committed
      checkpoint (rank 0 chooses, every rank loads the same one) and hands it to Lightning's own restore
      (model, optimizers, schedulers, precision plugin, callbacks, loops; and the dataloader's position
      when it is stateful, e.g. torchdata's ``StatefulDataLoader``). A ``ckpt_path`` you pass wins.
    - after each optimizer step (``on_train_batch_end``; an epoch's last step at ``on_train_epoch_end``):
      ``guard.step(trainer.global_step)``, a flag read in the steady state. On an evacuation every rank
      writes the emergency checkpoint (Lightning's whole checkpoint dictionary) at the same batch and
      raises `gpuguard.Evacuation` from the hook at once: no validation and no further batch runs.
      Lightning then calls every callback's ``on_exception`` with that Evacuation (check
      ``isinstance(exception, gpuguard.Evacuation)`` to tell an orderly evacuation from a crash), tears
      down, and ``fit`` raises it: a ``SystemExit``, so the process exits 75 (or 76). Should a teardown
      on the failed GPU raise meanwhile, the process still exits with the evacuation's code.
    - random number generators: the saving rank's states come back where the resumed loop draws as the
      uninterrupted one did (before the next epoch's dataloader iterator for an epoch-end checkpoint,
      after the resumed iterator otherwise), and each validation leaves them as it found them (a resume
      skips a validation that followed its checkpoint), so a resume is bitwise identical even with
      dropout and a loader without a generator of its own.

    Args:
        checkpoint_dir: fsspec URL of gpuguard's checkpoints (or ``GPUGUARD_CHECKPOINT_DIR``).
        resume: load gpuguard's newest checkpoint when ``fit`` gets no ``ckpt_path``.
        config_file: a YAML file of guard settings.
        nvml: a ``pynvml``-compatible module (`gpuguard.fakenvml.FakeNvml` in tests).
        plugins: objects with ``@gpuguard.hookimpl`` methods.
        **settings: any `gpuguard.GuardConfig` field (``sync_every``, ``checkpoint_every_steps``, ...).

    Attributes:
        guard: the `gpuguard.Guard` doing the work.
        evacuation: the `gpuguard.Evacuation` this fit left with, if any.
        resumed_from: the gpuguard checkpoint this fit resumed from, if any.

    Raises:
        ConfigError: at construction, for a bad setting or plugin.

    Example:
        >>> from gpuguard.lightning import GpuGuardCallback
        >>> callback = GpuGuardCallback(checkpoint_dir="memory://doc-lightning")
    """

if TYPE_CHECKING:  # what type checkers see: the behaviour; at run time the Lightning base(s) join it

    class GpuGuardCallback(GuardHooks):
        pass

else:
    GpuGuardCallback = type(
        "GpuGuardCallback", (GuardHooks, *_callback_bases()), {"__module__": "gpuguard.lightning", "__doc__": _DOC}
    )

__all__ = ["GpuGuardCallback", "GpuGuardCheckpointIO", "load_lightning_checkpoint"]
