"""The node-local tier: each rank's own complete copy of its periodic checkpoints, on a node-local path.

Rank r of a world of N keeps its part in ``{local_dir}/job-<key>/world-N/rank-r/`` as a one-process
checkpoint (`CheckpointStore` saved as rank 0 of 1, no collective) under the job-wide checkpoint id, so an
id names the same save in both tiers and a restore can mix them rank by rank (`_tiered`). It needs no file
system shared between nodes: each rank reads back only what it wrote. The job key is derived from
``checkpoint_dir``, so two jobs sharing one node's ``/dev/shm`` never read each other's checkpoints.
DTensors are kept as this rank's pieces and come back only into the same layout (`_local_copy`).

What it costs: its own staging buffer (one buffer, so host memory for one more copy of the state) and a
write to a local disk or memory. The training thread snapshots the state once per save, into this tier's
buffer (with overlap on, parameters are copied while forward and backward run); a save that also goes to
object storage lends that snapshot to object storage's, which copies it into its own buffer on a thread
(`LentSnapshot`), never from the live state. What it survives: a container restarted in place (the volume
stays), not a pod moved to another node (then object storage has the checkpoint).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gpuguard.checkpoint import CheckpointStore, PendingSave
from gpuguard.checkpoint._crc import crc32c
from gpuguard.checkpoint._local_copy import prepare_copy, save_copy
from gpuguard.checkpoint._tree import FlatState
from gpuguard.errors import GpuGuardError
from gpuguard.guard.config import GuardConfig

log = logging.getLogger("gpuguard")


def local_path(config: GuardConfig, rank: int, world_size: int) -> str:
    """Where rank ``rank`` of a ``world_size``-rank job keeps its local tier."""
    assert config.local_dir is not None
    root = config.local_dir.removeprefix("file://")
    key = f"{crc32c(config.checkpoint_dir.encode()):08x}"
    return os.path.join(root, f"job-{key}", f"world-{world_size}", f"rank-{rank}")


def open_local_tier(config: GuardConfig, state: Mapping[str, Any], rank: int, world_size: int) -> LocalTier | None:
    """The local tier, or None when it is off or cannot hold this state (said once, in one warning)."""
    if config.local_dir is None:
        return None
    path = local_path(config, rank, world_size)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning(
            "gpuguard: local tier off: cannot create %s (%s); checkpoints go to %s", path, exc, config.checkpoint_dir
        )
        return None
    return LocalTier(config, path)


class LocalTier:
    """This rank's local tier: saves in the background, pruned by count and bytes after each commit."""

    def __init__(self, config: GuardConfig, path: str) -> None:
        self.path = path
        # One staging buffer: host memory for one more copy of the state. A save due while the last one
        # still writes waits for it (a local write is fast; a stall here says the tier is too slow).
        self.store = CheckpointStore(path, keep=config.keep, keep_bytes=config.local_keep_bytes, staging_buffers=1)
        self.pending: list[PendingSave] = []
        # Whether a save that also goes to object storage lends it this tier's snapshot (one snapshot on the
        # training thread). Off only to measure what two snapshots cost (benchmarks/local_tier.py).
        self.lends_snapshot = True

    def prepare(self, state: Mapping[str, Any]) -> None:
        prepare_copy(self.store, state)

    def save(
        self,
        flat: FlatState,
        step: int,
        checkpoint_id: str,
        overlap_with: Sequence[torch.optim.Optimizer],
        extra: Mapping[str, Any] | None = None,
        *,
        lend: bool = False,
        started: float | None = None,
    ) -> PendingSave | None:
        """Snapshot the state ``flat`` into this tier (this rank's complete part); None when the save could not
        start. With ``lend`` (and `lends_snapshot`), the save lends its snapshot (``pending._lent``), which the
        caller must hand to a save that releases it (`Saver.save_flat`'s ``source``)."""
        self.pending = [p for p in self.pending if not p.done()]
        lend = lend and self.lends_snapshot
        try:
            pending = save_copy(self.store, flat, step, checkpoint_id, overlap_with, extra, lend=lend, started=started)
        except GpuGuardError as exc:
            log.error("gpuguard: local checkpoint at step %d not taken: %s", step, exc)
            return None
        pending.add_done_callback(self._after)
        self.pending.append(pending)
        return pending

    def _after(self, pending: PendingSave) -> None:
        error = pending.exception()
        if error is not None:
            log.error("gpuguard: local checkpoint %s in %s failed: %s", pending.id, self.path, error)
            return
        try:
            self.store.prune()
        except Exception as exc:  # a writer thread: the next save's prune tries again
            log.warning("gpuguard: pruning the local tier %s failed: %s", self.path, exc)

    def wait(self, timeout_s: float) -> None:
        for pending in self.pending:
            try:
                pending.wait(timeout=timeout_s)
            except TimeoutError:
                log.error("gpuguard: local checkpoint %s not committed within %.0fs", pending.id, timeout_s)
            except Exception:  # said by `_after`
                pass
        self.pending = []

    def close(self) -> None:
        self.store.close()
