"""Hugging Face Trainer with gpuguard (``pip install 'gpuguard[transformers]'``).

Usage (on every rank)::

    from gpuguard.transformers import GpuGuardCallback

    callback = GpuGuardCallback(checkpoint_dir="s3://bucket/run1")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.resume_path())   # exits 75 on an evacuation

See `GpuGuardCallback` for what it does and where; the implementation lives in
``gpuguard.integrations.transformers``.
"""

from gpuguard.integrations.transformers import GpuGuardCallback

__all__ = ["GpuGuardCallback"]
