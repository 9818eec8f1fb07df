"""Saving: snapshot a state into a staging buffer on the training thread, write it in the background."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch

from gpuguard._version import __version__
from gpuguard.checkpoint import _layout, _sharding
from gpuguard.checkpoint import _leases as leases
from gpuguard.checkpoint._catalog import CheckpointInfo
from gpuguard.checkpoint._collective import default_group
from gpuguard.checkpoint._committing import Committer
from gpuguard.checkpoint._crc import crc32c, crc32c_combine
from gpuguard.checkpoint._manifest import (
    CHECKPOINT_DIR,
    ShardRecord,
    checkpoint_name,
    shard_file,
    shard_record_file,
    state_file,
)
from gpuguard.checkpoint._overlap import OverlapCheck, Versions
from gpuguard.checkpoint._owners import owned_by, partition
from gpuguard.checkpoint._pending import CommitGate, PendingSave
from gpuguard.checkpoint._pruning import collect_dead
from gpuguard.checkpoint._staging import LentSnapshot, Readiness, StagingBuffer, StagingPool
from gpuguard.checkpoint._storage import Storage
from gpuguard.checkpoint._tree import FlatState, flatten
from gpuguard.errors import CheckpointCorruptError, CheckpointError, CheckpointExistsError, ConfigError, StorageError

log = logging.getLogger("gpuguard.checkpoint")

Reason = Literal["emergency", "periodic", "manual"]
REASONS = ("emergency", "periodic", "manual")


class Saver:
    """Takes snapshots and writes them on its own threads; ``staging_buffers`` saves may be in flight."""

    def __init__(self, storage: Storage, committer: Committer, staging_buffers: int, lease_s: float) -> None:
        self.storage = storage
        self.lease_s = lease_s
        self.committer = committer
        self._staging = StagingPool(staging_buffers)
        self._saver = ThreadPoolExecutor(staging_buffers, thread_name_prefix="gpuguard-ckpt")
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._deferred = threading.Condition()
        self._deferred_in_flight = 0
        self._abandoned: set[str] = set()
        self.last_step_wait_s = 0.0
        self.overlap = OverlapCheck()  # turns overlap off at the first tensor changed outside optimizer.step()
        # Who writes which DTensor chunk, by every rank's fingerprint of what it holds (see `_agree`).
        self._writers: dict[tuple[int, ...], set[str]] = {}
        self.prepared_bytes = 0
        self._collected = False  # dead writers' leftovers, looked for once, before the first save

    def _collect_dead(self) -> None:
        """At this store's first save: what writers that died here left (a crash loop's leftovers)."""
        try:
            collect_dead(self.committer.catalog, self.in_flight)
        except Exception as exc:  # housekeeping: the save goes on, a later prune tries again
            log.warning("could not collect the leftovers of dead writers: %s", exc)

    @property
    def staging(self) -> StagingPool:
        """The staging buffers (a load borrows a free one to read into)."""
        return self._staging

    def in_flight(self) -> set[str]:
        with self._lock:
            return set(self._in_flight)

    def close(self) -> None:
        self._saver.shutdown(wait=True)

    def abandon(self) -> list[str]:
        """Saves in flight now will not commit: a rank they wait for is gone. Their commit waits end at once
        (the committing rank's wait for every record, another rank's wait for the manifest)."""
        with self._lock:
            names = sorted(self._in_flight)
            self._abandoned.update(names)
        return names

    def prepare(
        self,
        state: Mapping[str, Any],
        *,
        rng: bool = True,
        background: bool = False,
        replicated: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        as_local: bool = False,
    ) -> float:
        """Allocate the staging buffer for this state now, so that a save later does not.

        See `CheckpointStore.prepare`, the documented API. Returns the seconds it took (with
        ``background``, the seconds the calling thread spent: the allocation goes on in a thread).
        With ``as_local``, DTensors are laid out as this rank's pieces (the local tier's copies, `_local_copy`).
        """
        started = time.perf_counter()
        flat = flatten(state, rng=rng)  # state_dict() runs here, on the calling thread
        if as_local:
            for name, tensor in list(flat.tensors.items()):
                if _sharding.is_dtensor(tensor):
                    flat.tensors[name] = tensor.to_local()  # type: ignore[attr-defined]
        rank = process_rank() if rank is None else rank
        world_size = process_world_size() if world_size is None else world_size
        # With DTensors, the ranks agree on who writes what (a collective): decided on holding DTensors at
        # all, never on holding non-empty pieces, which differs between ranks (small tensors, many ranks).
        sharded = _sharding.holds_dtensors(flat)
        specs = _sharding.chunk_specs(flat, rank)  # DTensors → their pieces (refused early if unplaceable)
        _, writes = self._agree(specs, rank, world_size, None, sharded=sharded, collective=sharded)
        _sharding.localize(flat, specs, writes)
        if replicated and not sharded and world_size > 1:  # a replicated save stages only this rank's part
            flat.tensors = partition(flat.tensors, rank, world_size, flat.per_rank)
        # The same metadata as a save's, so that the save finds this very layout.
        layout = _layout.plan(
            [(n, t.dtype, tuple(t.shape)) for n, t in flat.tensors.items()],
            metadata={"format": "pt", "gpuguard": __version__},
        )
        self.prepared_bytes = layout.data_bytes  # for estimating a save's time (the guard's deadline check)
        pin = _wants_pinned(flat)
        if not background:
            return self._staging.prepare(layout, pin=pin).alloc_s
        self._staging.expect(layout)  # a save before the thread allocates waits for it rather than allocating too
        try:
            thread = threading.Thread(target=self._prepare_quietly, args=(layout, pin), name="gpuguard-prepare")
            thread.daemon = True
            thread.start()
        except BaseException:
            self._staging.unexpect(layout)
            raise
        return time.perf_counter() - started

    def _prepare_quietly(self, layout: _layout.ShardLayout, pin: bool) -> None:
        try:
            self._staging.prepare(layout, pin=pin, expected=True)
        except Exception as exc:  # the first save allocates instead; training goes on
            log.warning("could not prepare the staging buffer: %s", exc)

    def _agree(
        self,
        specs: Mapping[str, tuple[_sharding.ChunkSpec, torch.Tensor]],
        rank: int,
        world_size: int,
        attempt: str | None,
        *,
        sharded: bool,
        collective: bool = True,
    ) -> tuple[str, set[str]]:
        """The save's attempt token and the DTensor chunks this rank writes, the same answer on every rank.

        In a process group of ``world_size`` ranks, one small collective: every rank sends a fresh
        token and a fingerprint of the pieces it holds. Rank 0's token binds the save (unique to this
        launch and this save, so a crashed attempt's records are never committed under a reused id).
        When the fingerprints are new, a second collective gathers every rank's pieces, and each
        distinct chunk gets one writer (`_sharding.assign_writers`); the answer is kept for the next
        saves of the same layout. Without a process group: the default token, and this rank writes
        every piece it holds.
        """
        group = default_group(world_size) if world_size > 1 else None
        if sharded:
            import torch.distributed as dist

            live = dist.get_world_size() if dist.is_initialized() else 1
            if live != world_size:
                raise ConfigError(
                    "world_size",
                    world_size,
                    f"must be the process group's size, {live}: the state holds DTensors, whose chunks every rank "
                    "of the group writes",
                )
        if group is None or group.size == 1 or not collective:
            return (default_attempt() if attempt is None else attempt), set(specs)
        held = _sharding.held(specs)
        # One collective of two int64 per rank in the steady state (it synchronises the ranks, like any).
        first = group.all_gather_ints([secrets.randbits(63), _sharding.fingerprint(held)])
        key = tuple(fingerprint for _, fingerprint in first)
        writes = self._writers.get(key)
        if writes is None:
            writes = _sharding.assign_writers(group.all_gather(held))[group.rank]
            if len(self._writers) > 8:  # layouts change rarely; keep the cache small
                self._writers.clear()
            self._writers[key] = writes
        return (f"{first[0][0]:016x}" if attempt is None else attempt), writes

    def save(
        self,
        state: Mapping[str, Any],
        step: int,
        *,
        reason: Reason = "manual",
        evidence: Mapping[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        checkpoint_id: str | None = None,
        rng: bool = True,
        extra: Mapping[str, Any] | None = None,
        replicated: bool = False,
        commit_timeout_s: float = 600.0,
        overlap_with: Sequence[torch.optim.Optimizer] = (),
        attempt: str | None = None,
    ) -> PendingSave:
        """Snapshot ``state`` and write it in the background; see `CheckpointStore.save`, the documented API."""
        started = time.perf_counter()
        _check_args(step, reason, rank, world_size, checkpoint_id)
        flat = flatten(state, rng=rng)
        return self.save_flat(
            flat,
            step,
            reason=reason,
            evidence=evidence,
            rank=rank,
            world_size=world_size,
            checkpoint_id=checkpoint_id,
            extra=extra,
            replicated=replicated,
            commit_timeout_s=commit_timeout_s,
            overlap_with=overlap_with,
            attempt=attempt,
            started=started,
        )

    def save_flat(
        self,
        flat: FlatState,
        step: int,
        *,
        reason: Reason = "manual",
        evidence: Mapping[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        checkpoint_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
        replicated: bool = False,
        commit_timeout_s: float = 600.0,
        overlap_with: Sequence[torch.optim.Optimizer] = (),
        attempt: str | None = None,
        started: float | None = None,
        survivors: bool = False,
        source: LentSnapshot | None = None,
        lend: bool = False,
    ) -> PendingSave:
        """`save` of a state already taken apart.

        With ``source``, another save's snapshot of this very state holding every tensor this save writes
        (the local tier's, which holds this rank's complete part): the snapshot is copied from there on a
        thread, never from the live tensors, so the training thread pays for one snapshot, not two; the
        source is released once copied, or at once if this save does not start (a source that does not
        hold every tensor as it is here is released too, and the live tensors are copied now instead).
        With ``lend``, the returned save lends its own snapshot as ``pending._lent``, held until the
        borrower releases it.

        With ``survivors`` (the survivors of a sudden loss, `gpuguard.peers`), no collective: a peer in
        the process group is dead, so neither the attempt token nor the DTensor chunk writers can be
        gathered. ``attempt`` is then required (the survivors agreed on it over the side channel), the
        writers of every chunk are computed from the meshes alone (the same answer on every survivor),
        and ``rank`` may be another rank than this process's: a dead rank whose files this process writes
        from its own replica of that rank's tensors (its DTensor pieces must be that rank's).
        """
        try:
            return self._save_flat(
                flat,
                step,
                reason=reason,
                evidence=evidence,
                rank=rank,
                world_size=world_size,
                checkpoint_id=checkpoint_id,
                extra=extra,
                replicated=replicated,
                commit_timeout_s=commit_timeout_s,
                overlap_with=overlap_with,
                attempt=attempt,
                started=started,
                survivors=survivors,
                source=source,
                lend=lend,
            )
        except BaseException:
            if source is not None:  # never started to copy it: its lender's buffer is free for its next save
                source.release()
            raise

    def _save_flat(
        self,
        flat: FlatState,
        step: int,
        *,
        reason: Reason,
        evidence: Mapping[str, Any] | None,
        rank: int,
        world_size: int,
        checkpoint_id: str | None,
        extra: Mapping[str, Any] | None,
        replicated: bool,
        commit_timeout_s: float,
        overlap_with: Sequence[torch.optim.Optimizer],
        attempt: str | None,
        started: float | None,
        survivors: bool,
        source: LentSnapshot | None,
        lend: bool,
    ) -> PendingSave:
        started = time.perf_counter() if started is None else started
        _check_args(step, reason, rank, world_size, checkpoint_id)
        if survivors and attempt is None:
            raise ConfigError("attempt", attempt, "must be given for the survivors' save (no collective can agree one)")
        name = checkpoint_id or checkpoint_name(step, secrets.token_hex(4))
        doc = {"tree": flat.tree, "devices": flat.devices} | ({"storages": flat.storages} if flat.storages else {})
        tree = json.dumps(doc).encode()
        # Sharded state is not replicated: its chunks are split by their own placements, and every rank
        # keeps its plain tensors. Each DTensor becomes the chunk this rank writes.
        sharded = _sharding.holds_dtensors(flat)
        if replicated and sharded:
            log.info("replicated=True ignored: the state holds DTensors, whose placements say who writes what")
            replicated = False
        specs = _sharding.chunk_specs(flat, rank, replica=survivors)
        if survivors:
            writes = _survivor_writes(flat, specs, rank, world_size)
        else:
            attempt, writes = self._agree(specs, rank, world_size, attempt, sharded=sharded)
        chunks = _sharding.localize(flat, specs, writes)
        if replicated and world_size > 1:
            flat.tensors = partition(flat.tensors, rank, world_size, flat.per_rank)
        layout = _layout.plan(
            [(n, t.dtype, tuple(t.shape)) for n, t in flat.tensors.items()],
            metadata={"format": "pt", "gpuguard": __version__},
        )
        copied = None
        if source is not None:
            copied = source.views_for(flat.tensors)
            if copied is None:  # not this state's snapshot as it is here: the live tensors, as without one
                log.warning("save %s: the lent snapshot does not hold this save's tensors; copying them again", name)
                source.release()
                source = None
        on_gpu = _wants_pinned(flat)
        buffer = self._staging.acquire(layout, pin=on_gpu, training=not survivors)
        readiness = Readiness(layout.data_bytes)
        lent = LentSnapshot(self._staging, buffer, readiness) if lend else None
        with self._lock:
            self._in_flight.add(name)
        meta: dict[str, Any] = {
            "reason": reason,
            "evidence": dict(evidence or {}),
            "extra": dict(extra or {}),
            "layout": "replicated" if replicated and world_size > 1 else "per_rank",
            "commit_timeout_s": commit_timeout_s,
            "attempt": attempt,
            "chunks": chunks,
        }
        overlap_with = self.overlap.usable(overlap_with) if overlap_with and source is None else []
        later = owned_by(overlap_with, flat.tensors) if overlap_with else set()
        # A copy from the GPU runs on its DMA engines, so the writer starts first and follows the snapshot
        # as it fills the buffer. A copy between host tensors needs the same cores and memory bandwidth as
        # the writer's pwrite and checksums: there the writer waits for the whole snapshot. On the 2-core
        # CI machine that made the stall of 1 GiB 1.19x a bare memory copy instead of 1.34x (medians of 8
        # alternating saves), with time to durable unchanged: the disk, not the copy, bounds it.
        meta["after_snapshot"] = not on_gpu or source is not None
        gate = meta["gate"] = CommitGate()
        future = self._saver.submit(self._write, name, step, rank, world_size, buffer, readiness, tree, meta)
        future.add_done_callback(lambda _: self._finish(name))
        try:
            if source is not None and copied is not None:
                source.copy_into(buffer, copied, readiness)  # off the training thread; releases the source
            elif later:
                versions = Versions(step, {n: flat.tensors[n] for n in later})
                finish = buffer.snapshot_deferred(flat.tensors, later)
                self.overlap.watch(versions)
                self._hold_steps(overlap_with, finish, readiness, versions)
            else:
                buffer.snapshot(flat.tensors, readiness)
        except BaseException as exc:
            readiness.fail(exc)
            if lent is not None:
                lent.release()
            raise
        stall = time.perf_counter() - started
        pending = PendingSave(name, step, future, stall, started, gate)
        pending._lent = lent
        return pending

    def _hold_steps(
        self,
        optimizers: Sequence[torch.optim.Optimizer],
        finish: Callable[[], None],
        readiness: Readiness,
        versions: Versions,
    ) -> None:
        """Finish a deferred copy on a thread; until it is done, the optimizers' ``step()`` waits."""
        for optimizer in optimizers:
            if optimizer not in self._hooked:
                optimizer.register_step_pre_hook(self._wait_for_deferred_copies)
                self._hooked.add(optimizer)
        with self._deferred:
            self._deferred_in_flight += 1

        def run() -> None:
            try:
                finish()
                self.overlap.after_copy(versions)  # a tensor changed before its copy was done: never committed
                readiness.advance(readiness.total)
            except BaseException as exc:
                readiness.fail(exc)
            finally:
                with self._deferred:
                    self._deferred_in_flight -= 1
                    self._deferred.notify_all()

        threading.Thread(target=run, name="gpuguard-ckpt-snapshot", daemon=True).start()

    def _wait_for_deferred_copies(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # An optimizer step pre-hook, registered once per optimizer: free unless a copy is in flight.
        if self._deferred_in_flight:
            started = time.perf_counter()
            with self._deferred:
                while self._deferred_in_flight:
                    self._deferred.wait()
            self.last_step_wait_s = time.perf_counter() - started
        self.overlap.before_step()  # free unless an overlapped save is being watched

    def _finish(self, name: str) -> None:
        with self._lock:
            self._in_flight.discard(name)

    def _write(
        self,
        name: str,
        step: int,
        rank: int,
        world_size: int,
        buffer: StagingBuffer,
        readiness: Readiness,
        tree: bytes,
        meta: dict[str, Any],
    ) -> CheckpointInfo:
        lease: leases.Lease | None = None
        posted = False  # once this rank's record is out, its files belong to the committing rank
        started = time.monotonic()
        try:
            try:
                if meta["after_snapshot"]:
                    readiness.wait(readiness.total)  # raises the snapshot's error, if it failed
                if not self._collected and rank == 0:  # beside this save, never holding it up
                    self._collected = True
                    threading.Thread(target=self._collect_dead, name="gpuguard-ckpt-collect", daemon=True).start()
                # A committed checkpoint is immutable: refused before a single byte goes into its folder.
                self.committer.refuse_committed(name)
                # The lease is the first write: from here on, no pruner anywhere collects this folder. Its
                # heartbeat renews it until the save ends, however long the writes and the commit wait take.
                lease = leases.take(self.storage, name, rank=rank, attempt=meta["attempt"], lease_s=self.lease_s)
                blocks = None
                if meta["chunks"]:  # per-block checksums of DTensor chunks, computed beside the writes
                    args = (buffer.layout, buffer.memoryview(), readiness, list(meta["chunks"]), _sharding.BLOCK_BYTES)
                    blocks = self.storage.submit(_sharding.block_checksums, *args)
                record = self._write_files(name, rank, world_size, buffer, readiness, tree, meta["gate"])
                if blocks is not None:
                    described = _sharding.chunk_records(
                        buffer.layout, meta["chunks"], blocks.result(), _sharding.BLOCK_BYTES
                    )
                    record = dataclasses.replace(record, chunks=described)
            finally:
                with contextlib.suppress(Exception):  # the buffer is not reused while a snapshot fills it
                    readiness.wait(readiness.total)
                self._staging.release(buffer)
            if world_size == 1:
                _enter(meta["gate"], name)
                return self.committer.commit(name, step, 1, {0: record}, meta, lease=lease)
            if rank != 0:
                # This rank's record is its part of the commit: the committing rank commits only with every
                # rank's record. So a save abandoned here never commits on any rank (its record never comes),
                # and once the record is out, `abandon()` says the commit has begun and `wait()` tells how it
                # ended (the committing rank's own gate, or its failure note, decides).
                _enter(meta["gate"], name)
            done = {"attempt": meta["attempt"], "record": record.to_dict()}
            self.storage.put_atomic(
                self.storage.path(name, shard_record_file(rank, world_size)),
                json.dumps(done).encode(),
                create_folder=False,
            )
            posted = True
            if rank == 0:
                return self.committer.gather(
                    name,
                    step=step,
                    world_size=world_size,
                    reason=meta["reason"],
                    evidence=meta["evidence"],
                    extra=meta["extra"],
                    layout=meta["layout"],
                    timeout_s=meta["commit_timeout_s"],
                    attempt=meta["attempt"],
                    lease=lease,
                    gate=meta["gate"],
                    abandoned=lambda: name in self._abandoned,
                )
            # Success here means committed: the manifest of this very save is there to read. The
            # committing rank may be as slow to write its own files as this one was: it gets that long
            # on top of the commit timeout (and at least one storage deadline to put the manifest).
            took = time.monotonic() - started
            return self.committer.wait_committed(
                name,
                attempt=meta["attempt"],
                timeout_s=meta["commit_timeout_s"] + max(took, self.storage.retry.deadline_s),
                world_size=world_size,
                abandoned=lambda: name in self._abandoned,
            )
        except BaseException as exc:
            if rank == 0 and world_size > 1 and not isinstance(exc, CheckpointExistsError):
                self.committer.note_failure(name, meta["attempt"], exc)  # the other ranks stop waiting
            if not (posted and rank != 0):
                self._abort(name, rank, world_size, lease, exc)
            raise
        finally:
            # Committed (the commit released the leases), aborted, or this rank's part is done and rank 0
            # commits: the folder is rank 0's to keep alive now. Its lease file expires if nobody releases it.
            leases.stop(lease)

    def _abort(self, name: str, rank: int, world_size: int, lease: leases.Lease | None, exc: BaseException) -> None:
        """Best effort, at once: remove what this failed save wrote, so that a full disk frees up.

        Skipped when the storage did not answer or kept failing transiently (cleaning would wait out
        another deadline, so ``wait()`` would end past one); the leftover's lease then expires and
        any prune collects it. Never done for a save refused because its id is committed: the files
        there are the committed checkpoint's. A rank other than the committing one keeps its files
        once its record is out (the commit may still happen), so this is not called then.
        """
        if isinstance(exc, CheckpointExistsError):
            return
        if isinstance(exc, StorageError) and (exc.timed_out or exc.transient):
            log.warning("save %s failed (%s); its files stay until a prune collects them", name, exc)
            return
        quick = min(5.0, self.storage.retry.deadline_s)
        try:
            if world_size == 1:
                self.storage.delete(self.storage.path(name), recursive=True, deadline_s=quick)
            else:  # other ranks write into the same folder: remove this rank's files only
                for file in (
                    shard_record_file(rank, world_size),
                    shard_file(rank, world_size),
                    state_file(rank, world_size),
                ):
                    self.storage.delete(self.storage.path(name, file), deadline_s=quick)
            if lease is not None:
                leases.release(self.storage, name, lease, deadline_s=quick)
        except Exception as cleanup:  # the save's own error is the one to report
            log.warning("could not clean up after the failed save %s (%s); a prune collects it later", name, cleanup)

    def _write_files(
        self,
        name: str,
        rank: int,
        world_size: int,
        buffer: StagingBuffer,
        readiness: Readiness,
        tree: bytes,
        gate: CommitGate,
    ) -> ShardRecord:
        layout = buffer.layout

        def ready(end: int) -> None:  # called before each part: an abandoned save stops writing
            if gate.closed:
                raise CheckpointError(f"save {name} abandoned (its deadline passed): not written further")
            readiness.wait(end)

        data = buffer.memoryview()
        shard_path = self.storage.path(name, shard_file(rank, world_size))
        # Checksums run on the I/O pool beside the writes: crc32c releases the GIL.
        checksums = self.storage.submit(_tensor_checksums, layout, data, readiness)
        self.storage.write_shard(shard_path, layout.header, data, ready)
        tensor_crcs = checksums.result()
        shard_crc = crc32c(layout.header)
        for slot in layout.slots:
            shard_crc = crc32c_combine(shard_crc, tensor_crcs[slot.name], slot.nbytes)
        written = self.storage.size(shard_path)
        if written != layout.file_bytes:
            raise CheckpointCorruptError(
                f"{shard_path}: wrote {written} bytes, expected {layout.file_bytes}", shard=shard_file(rank, world_size)
            )
        state_path = self.storage.path(name, state_file(rank, world_size))
        self.storage.put_atomic(state_path, tree, create_folder=False)
        return ShardRecord(
            rank=rank,
            file=shard_file(rank, world_size),
            bytes=layout.file_bytes,
            crc32c=shard_crc,
            header_bytes=len(layout.header),
            tensors=tensor_crcs,
            state_file=state_file(rank, world_size),
            state_bytes=len(tree),
            state_crc32c=crc32c(tree),
        )


def _survivor_writes(
    flat: FlatState, specs: Mapping[str, tuple[_sharding.ChunkSpec, torch.Tensor]], rank: int, world_size: int
) -> set[str]:
    """The DTensor chunks ``rank`` writes, as a healthy save's agreement would assign them, with no collective."""
    writes = _sharding.assign_writers(_sharding.held_by_every_rank(flat, world_size))[rank]
    missing = sorted(writes - set(specs))
    if missing:
        raise CheckpointError(f"rank {rank} is to write chunks of {missing} that this process does not hold")
    return writes


def _enter(gate: CommitGate, name: str) -> None:
    if not gate.enter():
        raise CheckpointError(f"save {name} abandoned (its deadline passed) before its commit: not committed")


def _wants_pinned(flat: FlatState) -> bool:
    return torch.cuda.is_available() and any(t.device.type == "cuda" for t in flat.tensors.values())


def _tensor_checksums(layout: _layout.ShardLayout, data: memoryview, readiness: Readiness) -> dict[str, int]:
    crcs = {}
    for slot in layout.slots:
        readiness.wait(slot.end)
        crcs[slot.name] = crc32c(data[slot.start : slot.end])
    return crcs


def _check_args(step: int, reason: str, rank: int, world_size: int, checkpoint_id: str | None) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**12:
        raise ConfigError("step", step, "must be a whole number from 0 to 10**12 - 1")
    if reason not in REASONS:
        raise ConfigError("reason", reason, "allowed: " + ", ".join(REASONS))
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError("world_size", world_size, "must be a whole number, 1 or greater")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError("rank", rank, f"must be from 0 to world_size - 1 = {world_size - 1}")
    if checkpoint_id is not None:
        match = CHECKPOINT_DIR.match(checkpoint_id)
        if not match or int(match.group(1)) != step:
            raise ConfigError("checkpoint_id", checkpoint_id, f"must look like {checkpoint_name(step, '0123abcd')}")
    elif world_size > 1:
        raise ConfigError("checkpoint_id", None, "required when world_size > 1: every rank must name the same one")


def default_attempt() -> str:
    """The attempt token every rank of one launch shares without a collective.

    torchrun (torch.distributed.elastic) sets the same ``TORCHELASTIC_RUN_ID`` and
    ``TORCHELASTIC_RESTART_COUNT`` on every worker of one attempt, and a new count on each restart.
    A job that reuses checkpoint ids across restarts some other way passes ``attempt`` itself.
    """
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}"


def process_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def process_world_size() -> int:
    """The default process group's size (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
