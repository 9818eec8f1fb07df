"""PyTorch Lightning with gpuguard (``pip install 'gpuguard[lightning]'``; lightning or pytorch_lightning).

Usage::

    from gpuguard.lightning import GpuGuardCallback

    guard = GpuGuardCallback(checkpoint_dir="s3://bucket/run1")
    trainer = lightning.pytorch.Trainer(callbacks=[guard], strategy="ddp", max_epochs=10)
    trainer.fit(model, datamodule)        # resumes from gpuguard's newest checkpoint; exits 75 on an evacuation

See `GpuGuardCallback` for what it does and where; the implementation lives in
``gpuguard.integrations.lightning``.
"""

from gpuguard.integrations.lightning import GpuGuardCallback, GpuGuardCheckpointIO, load_lightning_checkpoint

__all__ = ["GpuGuardCallback", "GpuGuardCheckpointIO", "load_lightning_checkpoint"]
