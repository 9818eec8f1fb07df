"""Hugging Face ``transformers.Trainer``: `GpuGuardCallback`, a thin adapter that hands the work to `gpuguard.Guard`.

Users import it from `gpuguard.transformers`. Layout: ``_callback`` (the hooks, and the Trainer's state
as a checkpoint entry), ``_resume`` (agreeing on a checkpoint across ranks, reading it, and laying out
what ``Trainer.train(resume_from_checkpoint=...)`` reads).
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "gpuguard.transformers needs Hugging Face transformers: pip install 'gpuguard[transformers]'"
    ) from exc

from gpuguard.integrations.transformers._callback import GpuGuardCallback

__all__ = ["GpuGuardCallback"]
