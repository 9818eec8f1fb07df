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
from gpuguard.checkpoint import _leases as leases
from gpuguard.checkpoint._catalog import Catalog, CheckpointInfo
from gpuguard.checkpoint._manifest import COMMIT_FAILED, MANIFEST, Manifest, ShardRecord, shard_record_file
from gpuguard.checkpoint._pending import CommitGate
from gpuguard.checkpoint._sharding import tiling_problems
from gpuguard.checkpoint._storage import Storage
from gpuguard.errors import CheckpointCorruptError, CheckpointError, CheckpointExistsError, CommitError, StorageError

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
        gate: CommitGate | None = None,
    ) -> CheckpointInfo:
        """Wait for every rank's record of this ``attempt``, then commit (rank 0 of a multi-rank save).

        A ``gate`` closed meanwhile (the save was abandoned) ends the wait: nothing is committed.

        A record from another attempt (a crashed run that used the same checkpoint id) is not this
        save's: it is never committed over, and the wait goes on for the record of this attempt.
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
            if gate is not None and gate.closed:
                raise CheckpointError(f"{checkpoint_id}: abandoned (its deadline passed) while waiting for every rank")
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(records))
                why = "".join(
                    f"; rank {r}'s record belongs to attempt {stale[r]!r}, not this one ({attempt!r})"
                    for r in missing
                    if r in stale
                )
                raise TimeoutError(f"{checkpoint_id}: rank(s) {missing} did not finish writing in {timeout_s:g}s{why}")
            time.sleep(0.05)
        meta = {
            "reason": reason,
            "evidence": dict(evidence or {}),
            "extra": dict(extra or {}),
            "layout": layout,
            "attempt": attempt,
        }
        if gate is not None and not gate.enter():
            raise CheckpointError(f"{checkpoint_id}: abandoned (its deadline passed) before its commit: not committed")
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
        tiling = tiling_problems(list(records.values()))
        if tiling:
            raise CheckpointCorruptError(
                f"{name} is not committed: its ranks' chunks do not tile every tensor, so it could never be loaded: "
                + "; ".join(str(p) for p in tiling[:5])
                + (f"; and {len(tiling) - 5} more" if len(tiling) > 5 else ""),
                tensor=tiling[0].tensor,
            )
        # Checked last, right before the put: a committed checkpoint is never written over.
        self.refuse_committed(name)
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
            attempt=str(meta.get("attempt", "")),
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

    def refuse_committed(self, name: str) -> None:
        """Raise `CheckpointExistsError` when ``name`` has a manifest: committed checkpoints are immutable.

        Object stores have no conditional put that fsspec exposes, so two saves racing under one id can
        both pass this check; a save under an id that is already committed (a rerun deriving ids from
        steps, a retry) is refused before it writes anything.
        """
        path = self.storage.path(name, MANIFEST)
        try:
            raw = self.storage.cat(path)
        except FileNotFoundError:
            return
        committed = self.catalog.manifest(name, missing_ok=True)
        what = (
            f"step {committed.step}, {committed.reason}, committed {committed.created_at}"
            if committed
            else (f"its manifest holds {len(raw)} bytes")
        )
        raise CheckpointExistsError(
            f"checkpoint {name} is already committed ({what}) under {self.catalog.url}: a committed checkpoint is "
            "never overwritten; save under a new id",
            checkpoint_id=name,
        )

    def note_failure(self, name: str, attempt: str, exc: BaseException) -> None:
        """Tell the other ranks of a multi-rank save that it will not be committed (best effort)."""
        note = json.dumps({"attempt": attempt, "error": f"{type(exc).__name__}: {exc}"}).encode()
        try:
            self.storage.put_atomic(self.storage.path(name, COMMIT_FAILED), note, create_folder=False)
        except Exception as cleanup:  # the other ranks then wait out their deadline
            log.warning("could not tell the other ranks that %s failed: %s", name, cleanup)

    def wait_committed(self, name: str, *, attempt: str, timeout_s: float, world_size: int = 2) -> CheckpointInfo:
        """Wait for the manifest of this save (a rank that does not commit); returns it once it is there.

        Raises:
            CommitError: the committing rank reported a failure, or no manifest appeared in ``timeout_s``
                (that rank is gone or stuck): this rank's save is not committed.
            CheckpointExistsError: another attempt committed this id meanwhile.
        """
        deadline = time.monotonic() + timeout_s
        # Every rank but one polls: quickly at first (the commit follows the slowest rank's record by one put),
        # and slower with more ranks, so that a job reads about 1,500 small objects a second at most
        # (S3 serves 5,500 GETs a second per prefix). The failure note is read every fourth time.
        pause = floor = max(0.02, (world_size - 1) / 1500)
        polls = 0
        while True:
            manifest = self.catalog.manifest(name, missing_ok=True)
            if manifest is not None:
                if manifest.attempt != attempt:
                    raise CheckpointExistsError(
                        f"checkpoint {name} was committed by another attempt ({manifest.attempt!r}, not this save's "
                        f"{attempt!r}): this save is not the one committed",
                        checkpoint_id=name,
                    )
                return self.catalog.info(manifest)
            expired = time.monotonic() > deadline
            if polls % 4 == 3 or expired:
                self._raise_noted_failure(name, attempt)
            if expired:
                raise CommitError(
                    f"checkpoint {name} is not committed: no manifest within {timeout_s:.1f}s (the committing rank "
                    "is gone or stuck); this rank's files stay for it, and a prune collects them if it never commits",
                    checkpoint_id=name,
                    timed_out=True,
                )
            time.sleep(pause)
            polls += 1
            pause = min(max(0.25, 4 * floor), pause * 1.25)

    def _raise_noted_failure(self, name: str, attempt: str) -> None:
        try:
            note = json.loads(self.storage.cat(self.storage.path(name, COMMIT_FAILED)))
        except FileNotFoundError:
            return
        except ValueError:
            note = {"attempt": attempt, "error": "(an unreadable failure note)"}
        if isinstance(note, dict) and note.get("attempt") == attempt:
            raise CommitError(
                f"checkpoint {name} is not committed: the committing rank failed: {note.get('error')}",
                checkpoint_id=name,
            )

    def _check_files(self, name: str, records: dict[int, ShardRecord], lease: leases.Lease | None) -> None:
        if lease is not None and not leases.held(self.storage, lease):
            raise StorageError(
                f"committing {name}: its lease {lease.file} is gone (another process collected the save as a leftover)"
                " or lapsed (it could not be renewed in time)",
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
