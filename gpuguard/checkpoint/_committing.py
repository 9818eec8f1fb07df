"""Committing: gather every rank's record of its durable files, then write the manifest."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

from gpuguard._version import __version__
from gpuguard.checkpoint._catalog import Catalog, CheckpointInfo
from gpuguard.checkpoint._manifest import MANIFEST, Manifest, ShardRecord, shard_record_file
from gpuguard.checkpoint._storage import Storage

log = logging.getLogger("gpuguard.checkpoint")


class Committer:
    """Writes manifests: the one write that makes a checkpoint visible to readers."""

    def __init__(self, storage: Storage, catalog: Catalog) -> None:
        self.storage = storage
        self.catalog = catalog

    def gather(
        self,
        checkpoint_id: str,
        *,
        step: int,
        world_size: int,
        reason: str = "manual",
        evidence: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        layout: str = "per_rank",
        timeout_s: float = 600.0,
    ) -> CheckpointInfo:
        """Wait for every rank's record, then commit (rank 0 of a multi-rank save)."""
        deadline = time.monotonic() + timeout_s
        records: dict[int, ShardRecord] = {}
        while True:
            for rank in range(world_size):
                if rank in records:
                    continue
                path = self.storage.path(checkpoint_id, shard_record_file(rank, world_size))
                try:
                    records[rank] = ShardRecord.from_dict(json.loads(self.storage.cat(path)))
                except FileNotFoundError:
                    continue
            if len(records) == world_size:
                break
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(records))
                raise TimeoutError(f"{checkpoint_id}: rank(s) {missing} did not finish writing in {timeout_s:g}s")
            time.sleep(0.05)
        meta = {"reason": reason, "evidence": dict(evidence or {}), "extra": dict(extra or {}), "layout": layout}
        return self.commit(checkpoint_id, step, world_size, records, meta)

    def commit(
        self, name: str, step: int, world_size: int, records: dict[int, ShardRecord], meta: dict[str, Any]
    ) -> CheckpointInfo:
        """Write the manifest over ``records``: from here on, readers see the checkpoint."""
        manifest = Manifest(
            id=name,
            step=step,
            world_size=world_size,
            reason=meta["reason"],
            evidence=meta["evidence"],
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            gpuguard_version=__version__,
            torch_version=torch.__version__,
            shards=tuple(records[r] for r in range(world_size)),
            extra=meta["extra"],
            layout=meta.get("layout", "per_rank"),
        )
        self.storage.put_atomic(self.storage.path(name, MANIFEST), manifest.to_json())
        log.info("checkpoint %s committed (%s, %.1f MiB)", name, meta["reason"], manifest.total_bytes / 2**20)
        return self.catalog.info(manifest)
