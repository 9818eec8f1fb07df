"""Emergency and periodic checkpoints on any fsspec storage: atomic, verified, low stall."""

from gpuguard.checkpoint._retry import RetryPolicy
from gpuguard.checkpoint.store import CheckpointInfo, CheckpointStore, PendingSave, SaveTimings, VerifyReport

__all__ = ["CheckpointInfo", "CheckpointStore", "PendingSave", "RetryPolicy", "SaveTimings", "VerifyReport"]
