"""Committing: gather every rank's record of its durable files, then write the manifest."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gpuguard._version import __version__
from gpuguard.checkpoint import _leases as leases
from gpuguard.checkpoint._catalog import Catalog, CheckpointInfo
from gpuguard.checkpoint._manifest import MANIFEST, Manifest, ShardRecord, shard_record_file
from gpuguard.checkpoint._storage import Storage
from gpuguard.errors import CheckpointError, StorageError

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
        attempt: str = "",
        lease: leases.Lease | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> CheckpointInfo:
        """Wait for every rank's record of this ``attempt``, then commit (rank 0 of a multi-rank save).

        A record from another attempt (a crashed run that used the same checkpoint id) is not this
        save's: it is never committed over, and the wait goes on for the record of this attempt.
        ``abandoned`` ends the wait early with `CheckpointError` (a rank it waits for died).
        """
        deadline = time.monotonic() + timeout_s
        records: dict[int, ShardRecord] = {}
        stale: dict[int, str] = {}
        while True:
            for rank in range(world_size):
                if rank in records:
                    continue
                path = self.storage.path(checkpoint_id, shard_record_file(rank, world_size))
                try:
                    doc = json.loads(self.storage.cat(path))
                    theirs = str(doc["attempt"])
                    if theirs != attempt:
                        stale[rank] = theirs
                        continue
                    records[rank] = ShardRecord.from_dict(doc["record"])
                except FileNotFoundError:
                    continue
                except (ValueError, KeyError, TypeError, AttributeError):
                    stale[rank] = "(unreadable record)"
                    continue
            if len(records) == world_size:
                break
            if abandoned is not None and abandoned():
                missing = sorted(set(range(world_size)) - set(records))
                raise CheckpointError(f"{checkpoint_id}: abandoned: rank(s) {missing} are gone; nothing committed")
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(records))
                why = "".join(
                    f"; rank {r}'s record belongs to attempt {stale[r]!r}, not this one ({attempt!r})"
                    for r in missing
                    if r in stale
                )
                raise TimeoutError(f"{checkpoint_id}: rank(s) {missing} did not finish writing in {timeout_s:g}s{why}")
            time.sleep(0.05)
        meta = {"reason": reason, "evidence": dict(evidence or {}), "extra": dict(extra or {}), "layout": layout}
        return self.commit(checkpoint_id, step, world_size, records, meta, lease=lease)

    def commit(
        self,
        name: str,
        step: int,
        world_size: int,
        records: dict[int, ShardRecord],
        meta: dict[str, Any],
        *,
        lease: leases.Lease | None = None,
    ) -> CheckpointInfo:
        """Write the manifest over ``records``: from here on, readers see the checkpoint.

        Raises:
            StorageError: the folder's files are gone (another process removed the folder): the
                manifest is not written over missing shards.
        """
        self._check_files(name, records, lease)
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
        self.storage.put_atomic(self.storage.path(name, MANIFEST), manifest.to_json(), create_folder=False)
        try:
            # After the manifest (see _leases). A single writer knows its lease; after a multi-rank
            # save every rank's lease goes.
            leases.release(self.storage, name, lease if world_size == 1 else None)
        except Exception as exc:  # committed all the same; an unexpired lease in a committed folder is harmless
            log.warning("checkpoint %s committed, but its leases stay: %s", name, exc)
        log.info("checkpoint %s committed (%s, %.1f MiB)", name, meta["reason"], manifest.total_bytes / 2**20)
        return self.catalog.info(manifest)

    def _check_files(self, name: str, records: dict[int, ShardRecord], lease: leases.Lease | None) -> None:
        if lease is not None and not leases.held(self.storage, lease):
            raise StorageError(
                f"committing {name}: its lease {lease.file} is gone (another process collected the save as a leftover)",
                path=self.storage.path(name),
                operation="committing",
            )
        # Every rank's files, this one's too: a folder removed by hand (or by a tool that ignores
        # leases) must fail the commit, not get a manifest over missing shards.
        for record in records.values():
            for file, expected in ((record.file, record.bytes), (record.state_file, record.state_bytes)):
                path = self.storage.path(name, file)
                try:
                    size = self.storage.size(path)
                except FileNotFoundError:
                    size = -1
                if size != expected:
                    found = "is missing" if size < 0 else f"holds {size} bytes, not {expected}"
                    raise StorageError(
                        f"committing {name}: {file} {found}; the manifest is not written",
                        path=path,
                        operation="committing",
                    )
