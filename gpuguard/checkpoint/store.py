"""`CheckpointStore`: save a training state fast, commit it atomically, find it, load it back."""

from __future__ import annotations

import builtins
import dataclasses
import datetime as _dt
import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from gpuguard._version import __version__
from gpuguard.checkpoint import _layout, _reshard, _sharding
from gpuguard.checkpoint._crc import crc32c, crc32c_combine
from gpuguard.checkpoint._manifest import (
    CHECKPOINT_DIR,
    MANIFEST,
    Manifest,
    ShardRecord,
    checkpoint_name,
    shard_file,
    shard_record_file,
    state_file,
)
from gpuguard.checkpoint._staging import Readiness, StagingBuffer, StagingPool
from gpuguard.checkpoint._storage import RetryPolicy, Storage
from gpuguard.checkpoint._tree import RNG_KEY, FlatState, flatten, restore
from gpuguard.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError, ConfigError

log = logging.getLogger("gpuguard.checkpoint")

Reason = Literal["emergency", "periodic", "manual"]
REASONS = ("emergency", "periodic", "manual")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as its manifest describes it."""

    id: str
    step: int
    world_size: int
    reason: str
    evidence: Mapping[str, Any]
    created_at: str
    total_bytes: int
    url: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "step": self.step,
            "world_size": self.world_size,
            "reason": self.reason,
            "evidence": dict(self.evidence),
            "created_at": self.created_at,
            "bytes": self.total_bytes,
            "url": self.url,
        }


@dataclass(frozen=True)
class SaveTimings:
    """Where a save's time went, in seconds: ``stall_s`` is what the training thread waited."""

    stall_s: float = 0.0
    durable_s: float = 0.0


class PendingSave:
    """A save in flight. `wait` returns once it is durable and committed.

    The snapshot is already taken when you hold this: training may change its tensors freely.
    """

    def __init__(
        self, checkpoint_id: str, step: int, future: Future[CheckpointInfo | None], stall_s: float, started: float
    ) -> None:
        self.id = checkpoint_id
        self.step = step
        self._future = future
        self._stall_s = stall_s
        self._started = started
        self._durable_at: float | None = None
        future.add_done_callback(lambda _: self._mark())

    def _mark(self) -> None:
        self._durable_at = time.perf_counter()

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until durable (and committed, unless another rank commits); re-raises the save's error.

        Returns:
            The committed checkpoint, or None for a rank whose shard another rank commits.
        Raises:
            StorageError: the storage failed; the previous checkpoint is intact.
            TimeoutError: not done within ``timeout`` seconds.
        """
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, callback: Callable[[PendingSave], None]) -> None:
        """Call ``callback(self)`` when the save ends, on the writer's thread (at once if it has)."""
        self._future.add_done_callback(lambda _: callback(self))

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None

    @property
    def timings(self) -> SaveTimings:
        durable = (self._durable_at - self._started) if self._durable_at else 0.0
        return SaveTimings(stall_s=self._stall_s, durable_s=durable)


@dataclass
class VerifyReport:
    """What `CheckpointStore.verify` found: ``ok`` is False when any problem is listed."""

    id: str
    bytes_read: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ok": self.ok, "bytes_read": self.bytes_read, "problems": self.problems}


class CheckpointStore:
    """Checkpoints under one fsspec URL: one folder per checkpoint, the manifest written last commits it.

    Args:
        url: where checkpoints live, e.g. ``s3://bucket/run1``, ``file:///mnt/ckpt``, ``memory://run``.
        storage_options: for the fsspec filesystem (endpoint, credentials, ...).
        keep: committed checkpoints to keep when pruning; the newest valid one is never deleted.
        io_threads: concurrent writers per shard (threads for local disks, parts for S3).
        staging_buffers: snapshots that may be in flight at once.
        retry: backoff for transient storage errors.

    Example:
        >>> store = CheckpointStore("memory://example", keep=2)
        >>> model = torch.nn.Linear(2, 2)
        >>> store.save({"model": model}, step=10).wait().step
        10
        >>> store.load({"model": model})
        10
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        keep: int = 3,
        io_threads: int = 8,
        staging_buffers: int = 2,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ConfigError("keep", keep, "must be a whole number, 1 or greater")
        if not isinstance(io_threads, int) or io_threads < 1:
            raise ConfigError("io_threads", io_threads, "must be a whole number, 1 or greater")
        self.url = url
        self.keep = keep
        self.storage = Storage(url, storage_options, retry=retry, io_threads=io_threads)
        self._staging = StagingPool(staging_buffers)
        self._saver = ThreadPoolExecutor(staging_buffers, thread_name_prefix="gpuguard-ckpt")
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._deferred = threading.Condition()
        self._deferred_in_flight = 0
        self.last_step_wait_s = 0.0  # how long the last optimizer step waited for a deferred copy
        self.last_load_bytes_read = 0  # tensor bytes the last sharded load read (issue 13)

    # -- saving ---------------------------------------------------------------------------------

    def prepare(self, state: Mapping[str, Any], *, rng: bool = True) -> float:
        """Allocate the staging buffer for this state now, so that a save later does not.

        Run it when training starts (a guard does, in the background). Returns the seconds it took.
        """
        flat = flatten(state, rng=rng)
        _sharding.localize(flat, _process_rank())  # issue 13 hook: DTensors → local chunks, refused early
        layout = _layout.plan([(n, t.dtype, tuple(t.shape)) for n, t in flat.tensors.items()])
        return self._staging.prepare(layout, pin=_wants_pinned(flat)).alloc_s

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
    ) -> PendingSave:
        """Snapshot ``state`` and write it in the background.

        Returns once the snapshot is in the staging buffer: after that, training may step and the
        save is unaffected. With ``world_size`` > 1 every rank calls this with the same
        ``checkpoint_id``, and rank 0 commits once every rank's files are durable (waiting up to
        ``commit_timeout_s`` for them).

        With ``overlap_with``, the tensors those optimizers own (parameters and optimizer state, which
        change only in ``optimizer.step()``) are copied while training runs its next forward and
        backward; each of those optimizers' next ``step()`` waits for the copy. Everything else (buffers,
        RNG states, schedulers) is copied before ``save`` returns. The stall becomes the copy of the
        rest plus max(0, copy time - forward/backward time).

        With ``replicated``, every rank holds the same state (plain data parallelism): the tensors
        are split between the ranks by size, each rank snapshots and writes only its part, and a
        load reads every part, so time to durable falls with the number of ranks and a job may
        resume with a different number of them.

        DTensor values (FSDP2's ``fully_shard``, tensor parallelism, any DTensor in ``state``) are
        saved as chunks: each rank writes its local shard once (one replica of each chunk writes it),
        and the manifest holds each chunk's global shape, offsets and per-block checksums, so a load
        on any world size and mesh reads only the pieces that overlap its own shards.

        Raises:
            UnsupportedStateError: the state holds something that cannot be stored without pickling.
            ConfigError: a bad step, reason, rank or checkpoint id.
        """
        started = time.perf_counter()
        self._check_args(step, reason, rank, world_size, checkpoint_id)
        name = checkpoint_id or checkpoint_name(step, secrets.token_hex(4))
        flat = flatten(state, rng=rng)
        tree = json.dumps({"tree": flat.tree, "devices": flat.devices}).encode()
        # issue 13 hook: each DTensor → the chunk this rank writes. Sharded state is not replicated:
        # its chunks are split by their own placements, and every rank keeps its plain tensors.
        replicated = replicated and not _sharding.holds_dtensors(flat)
        chunks = _sharding.localize(flat, rank)
        if replicated and world_size > 1:
            flat.tensors = _partition(flat.tensors, rank, world_size)
        layout = _layout.plan(
            [(n, t.dtype, tuple(t.shape)) for n, t in flat.tensors.items()],
            metadata={"format": "pt", "gpuguard": __version__},
        )
        buffer = self._staging.acquire(layout, pin=_wants_pinned(flat))
        readiness = Readiness(layout.data_bytes)
        with self._lock:
            self._in_flight.add(name)
        meta = {
            "reason": reason,
            "evidence": dict(evidence or {}),
            "extra": dict(extra or {}),
            "layout": "replicated" if replicated and world_size > 1 else "per_rank",
            "commit_timeout_s": commit_timeout_s,
            "chunks": chunks,
        }
        later = _owned_by(overlap_with, flat.tensors) if overlap_with else set()
        # The writer starts first and follows the snapshot as it fills the buffer.
        future = self._saver.submit(self._write, name, step, rank, world_size, buffer, readiness, tree, meta)
        try:
            if later:
                finish = buffer.snapshot_deferred(flat.tensors, later)
                self._hold_steps(overlap_with, finish, readiness)
            else:
                buffer.snapshot(flat.tensors, readiness)
        except BaseException as exc:
            readiness.fail(exc)
            raise
        stall = time.perf_counter() - started
        pending = PendingSave(name, step, future, stall, started)
        future.add_done_callback(lambda _: self._finish(name))
        return pending

    def _hold_steps(
        self, optimizers: Sequence[torch.optim.Optimizer], finish: Callable[[], None], readiness: Readiness
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

    def _check_args(self, step: int, reason: str, rank: int, world_size: int, checkpoint_id: str | None) -> None:
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
    ) -> CheckpointInfo | None:
        chunks = meta["chunks"]
        blocks = None
        if chunks:  # issue 13 hook: per-block checksums of DTensor chunks, computed beside the writes
            block = _sharding.BLOCK_BYTES
            args = (buffer.layout, buffer.memoryview(), readiness, list(chunks), block)
            blocks = self.storage.submit(_sharding.block_checksums, *args)
        try:
            record = self._write_files(name, rank, world_size, buffer, readiness, tree)
            if blocks is not None:
                described = _sharding.chunk_records(buffer.layout, chunks, blocks.result(), _sharding.BLOCK_BYTES)
                record = dataclasses.replace(record, chunks=described)
        finally:
            self._staging.release(buffer)
        if world_size == 1:
            return self._commit(name, step, 1, {0: record}, meta)
        self.storage.put_atomic(
            self.storage.path(name, shard_record_file(rank, world_size)), json.dumps(record.to_dict()).encode()
        )
        if rank == 0:
            return self.commit(
                name,
                step=step,
                world_size=world_size,
                reason=meta["reason"],
                evidence=meta["evidence"],
                extra=meta["extra"],
                layout=meta["layout"],
                timeout_s=meta["commit_timeout_s"],
            )
        return None

    def _write_files(
        self, name: str, rank: int, world_size: int, buffer: StagingBuffer, readiness: Readiness, tree: bytes
    ) -> ShardRecord:
        folder = self.storage.path(name)
        self.storage.makedirs(folder)
        layout = buffer.layout
        data = buffer.memoryview()
        shard_path = self.storage.path(name, shard_file(rank, world_size))
        # Checksums run on the I/O pool beside the writes: crc32c releases the GIL.
        checksums = self.storage.submit(_tensor_checksums, layout, data, readiness)
        self.storage.write_shard(shard_path, layout.header, data, readiness.wait)
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
        self.storage.put_atomic(state_path, tree)
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

    def commit(
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
        """Write the manifest once every rank's files are durable (multi-rank saves call this on rank 0).

        Raises:
            TimeoutError: some rank's record did not appear within ``timeout_s``.
        """
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
        return self._commit(checkpoint_id, step, world_size, records, meta)

    def _commit(
        self, name: str, step: int, world_size: int, records: dict[int, ShardRecord], meta: dict[str, Any]
    ) -> CheckpointInfo:
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
        return self._info(manifest)

    # -- finding --------------------------------------------------------------------------------

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints with a valid manifest, oldest first. Folders without one are skipped."""
        return [self._info(m) for m in self._manifests()]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None."""
        manifests = self._manifests()
        return self._info(manifests[-1]) if manifests else None

    def _manifests(self) -> builtins.list[Manifest]:
        found = []
        for folder in self.storage.list_dirs():
            if not CHECKPOINT_DIR.match(folder):
                continue
            manifest = self._manifest(folder, missing_ok=True)
            if manifest is not None:
                found.append(manifest)
        found.sort(key=lambda m: (m.step, m.created_at))
        return found

    def _manifest(self, name: str, *, missing_ok: bool = False) -> Manifest | None:
        path = self.storage.path(name, MANIFEST)
        try:
            raw = self.storage.cat(path)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise CheckpointNotFoundError(f"no committed checkpoint {name!r} under {self.url}") from None
        try:
            manifest = Manifest.from_json(raw, where=path)
        except CheckpointCorruptError as exc:
            if missing_ok:
                log.warning("ignoring %s: %s", name, exc)
                return None
            raise
        if manifest.id != name:
            if missing_ok:
                return None
            raise CheckpointCorruptError(f"{path}: names checkpoint {manifest.id!r}", shard=MANIFEST)
        return manifest

    def _info(self, manifest: Manifest) -> CheckpointInfo:
        return CheckpointInfo(
            id=manifest.id,
            step=manifest.step,
            world_size=manifest.world_size,
            reason=manifest.reason,
            evidence=manifest.evidence,
            created_at=manifest.created_at,
            total_bytes=manifest.total_bytes,
            url=f"{self.url.rstrip('/')}/{manifest.id}",
        )

    # -- loading and verifying -------------------------------------------------------------------

    def load(
        self,
        state: MutableMapping[str, Any],
        checkpoint_id: str | None = None,
        *,
        rank: int = 0,
        fallback: bool = False,
        strict: bool = True,
    ) -> int:
        """Load a checkpoint into the live objects in ``state``; returns its step.

        Tensors are checked against their CRC-32C before anything is restored, so a corrupt shard
        changes nothing. DTensors in ``state`` (FSDP2, tensor parallel) receive their own shards of
        a sharded or plain checkpoint saved on any world size: each rank reads only the overlapping
        chunks' bytes. Module and optimizer tensors go back to their own devices (their
        ``load_state_dict`` copies); other tensors to the device they were saved from.

        Args:
            checkpoint_id: a specific checkpoint; the newest committed one when None.
            rank: whose shard to load.
            fallback: when the newest one is corrupt, try older ones instead of raising.
            strict: raise when ``state`` has a key the checkpoint lacks.

        Raises:
            CheckpointNotFoundError: nothing committed (or not that id).
            CheckpointCorruptError: names the shard and tensor; only when ``fallback`` is off or
                every checkpoint is corrupt.
        """
        if checkpoint_id is not None:
            candidates = [self._manifest(checkpoint_id)]
        else:
            candidates = list(reversed(self._manifests()))
            if not candidates:
                raise CheckpointNotFoundError(f"no committed checkpoint under {self.url}")
        errors = []
        for manifest in candidates:
            assert manifest is not None
            try:
                self._load_one(manifest, state, rank, strict)
                return manifest.step
            except CheckpointCorruptError as exc:
                if not fallback:
                    raise
                errors.append(f"{manifest.id}: {exc}")
                log.warning("checkpoint %s is corrupt (%s); falling back to an older one", manifest.id, exc)
        raise CheckpointCorruptError("every committed checkpoint is corrupt: " + "; ".join(errors))

    def _load_one(self, manifest: Manifest, state: MutableMapping[str, Any], rank: int, strict: bool) -> None:
        tensors: dict[str, torch.Tensor]
        if _reshard.applies(manifest, state):
            # issue 13 hook: sharded checkpoints and DTensor state, resharded onto the live sharding
            tensors, record, stats = _reshard.read_tensors(self.storage, manifest, state, rank, _process_world_size())
            self.last_load_bytes_read = stats.bytes_read
        elif manifest.layout == "replicated":
            # Every shard holds part of the one state; this rank's own shard goes last so that its
            # per-rank tensors (RNG states) win.
            record = manifest.shards[rank % manifest.world_size]
            tensors = {}
            for other in [*(s for s in manifest.shards if s is not record), record]:
                tensors.update(self._read_shard(manifest.id, other)[1])  # views keep their buffers alive
        else:
            if not 0 <= rank < manifest.world_size:
                raise CheckpointError(
                    f"{manifest.id} was saved by {manifest.world_size} rank(s); there is no rank {rank}"
                )
            record = manifest.shards[rank]
            tensors = self._read_shard(manifest.id, record)[1]
        tree_raw = self._read_state(manifest.id, record)
        try:
            doc = json.loads(tree_raw)
            tree, devices = doc["tree"], doc["devices"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointCorruptError(
                f"{manifest.id}/{record.state_file}: unreadable ({exc})", shard=record.state_file
            ) from None
        restore(state, tree, tensors, devices, strict=strict)

    def _read_shard(
        self, name: str, record: ShardRecord, problems: builtins.list[CheckpointCorruptError] | None = None
    ) -> tuple[bytearray, dict[str, torch.Tensor]]:
        """Read and check a shard. Raises at the first bad tensor, or collects them all into ``problems``."""
        where = f"{name}/{record.file}"
        try:
            data = self.storage.read(self.storage.path(name, record.file))
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{where}: missing", shard=record.file) from None
        if len(data) != record.bytes:
            raise CheckpointCorruptError(
                f"{where}: {len(data)} bytes, the manifest says {record.bytes}", shard=record.file
            )
        base, header = _layout.parse_header(memoryview(data), where=where)
        view = memoryview(data)
        tensors, spans = {}, []
        for tensor_name, expected in record.tensors.items():
            tensor = _layout.view(data, base, header, tensor_name, where=where)
            start, end = header[tensor_name]["data_offsets"]
            got = crc32c(view[base + start : base + end])
            spans.append((start, end, got))
            if got != expected:
                error = CheckpointCorruptError(
                    f"{where}: tensor {tensor_name!r} fails its checksum (crc32c {got:08x}, expected {expected:08x})",
                    shard=record.file,
                    tensor=tensor_name,
                )
                if problems is None:
                    raise error
                problems.append(error)
            tensors[tensor_name] = tensor
        # The whole file's checksum, combined from the parts: catches a changed header, which the
        # tensors' own checksums cannot see.
        whole = crc32c(view[:base])
        for start, end, crc in sorted(spans):
            whole = crc32c_combine(whole, crc, end - start)
        if whole != record.crc32c and not (problems and problems[-1].shard == record.file):
            error = CheckpointCorruptError(
                f"{where}: the file fails its checksum (crc32c {whole:08x}, expected {record.crc32c:08x}) "
                "though its tensors pass: the header was changed",
                shard=record.file,
            )
            if problems is None:
                raise error
            problems.append(error)
        return data, tensors

    def _read_state(self, name: str, record: ShardRecord) -> bytes:
        try:
            raw = self.storage.cat(self.storage.path(name, record.state_file))
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{name}/{record.state_file}: missing", shard=record.state_file) from None
        if crc32c(raw) != record.state_crc32c or len(raw) != record.state_bytes:
            raise CheckpointCorruptError(f"{name}/{record.state_file}: fails its checksum", shard=record.state_file)
        return raw

    def verify(self, checkpoint_id: str | None = None, *, progress: Progress | None = None) -> VerifyReport:
        """Re-read every shard of a checkpoint and check every checksum.

        Args:
            checkpoint_id: the newest committed one when None.
            progress: called with (bytes read, bytes in all) after each file.

        Raises:
            CheckpointNotFoundError: nothing committed, or not that id.
            CheckpointCorruptError: the manifest itself is invalid.
        """
        if checkpoint_id is None:
            latest = self.latest()
            if latest is None:
                raise CheckpointNotFoundError(f"no committed checkpoint under {self.url}")
            checkpoint_id = latest.id
        manifest = self._manifest(checkpoint_id)
        assert manifest is not None
        report = VerifyReport(manifest.id)
        total = manifest.total_bytes
        for record in manifest.shards:
            found: builtins.list[CheckpointCorruptError] = []
            try:
                self._read_shard(manifest.id, record, found)
            except CheckpointCorruptError as exc:  # the file as a whole: missing, truncated, bad header
                found.append(exc)
            report.bytes_read += record.bytes
            if progress:
                progress(report.bytes_read, total)
            try:
                self._read_state(manifest.id, record)
            except CheckpointCorruptError as exc:
                found.append(exc)
            report.bytes_read += record.state_bytes
            if progress:
                progress(report.bytes_read, total)
            report.problems += [{"shard": e.shard, "tensor": e.tensor, "error": str(e)} for e in found]
        return report

    # -- retention ------------------------------------------------------------------------------

    def prune(self) -> builtins.list[str]:
        """Delete committed checkpoints beyond the newest ``keep``, and uncommitted leftovers.

        Never deletes the newest committed checkpoint, nor a folder this store is still writing.
        A checkpoint's manifest is deleted first, so a pruned folder is never mistaken for valid.

        Returns:
            The ids deleted.
        """
        manifests = self._manifests()
        committed = {m.id for m in manifests}
        newest_step = manifests[-1].step if manifests else -1
        doomed = [m.id for m in manifests[: max(0, len(manifests) - self.keep)]]
        with self._lock:
            busy = set(self._in_flight)
        for folder in self.storage.list_dirs():
            match = CHECKPOINT_DIR.match(folder)
            if match and folder not in committed and folder not in busy and int(match.group(1)) <= newest_step:
                doomed.append(folder)  # an interrupted save, older than what is committed
        for name in doomed:
            self.storage.delete(self.storage.path(name, MANIFEST))
            self.storage.delete(self.storage.path(name), recursive=True)
            log.info("pruned %s", name)
        return doomed

    def close(self) -> None:
        """Wait for saves in flight and release the writer threads."""
        self._saver.shutdown(wait=True)
        self.storage.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _owned_by(optimizers: Sequence[torch.optim.Optimizer], tensors: dict[str, torch.Tensor]) -> set[str]:
    """Names of the tensors that only these optimizers' ``step()`` changes: parameters and their state."""
    owned: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            owned.update(p.data_ptr() for p in group["params"])
        for per_param in optimizer.state.values():
            owned.update(v.data_ptr() for v in per_param.values() if isinstance(v, torch.Tensor))
    return {name for name, t in tensors.items() if t.numel() and t.data_ptr() in owned}


def _partition(tensors: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's share of a replicated state: largest tensors first, each to the least loaded rank.

    Deterministic from names and sizes alone, so every rank computes the same split. RNG states differ
    between ranks, so each rank keeps its own.
    """
    loads = [0] * world_size
    mine = {}
    for name in sorted(tensors, key=lambda n: (-tensors[n].numel() * tensors[n].element_size(), n)):
        if name.startswith(RNG_KEY + "/"):
            owner = rank
        else:
            owner = min(range(world_size), key=lambda r: (loads[r], r))
            loads[owner] += tensors[name].numel() * tensors[name].element_size()
        if owner == rank:
            mine[name] = tensors[name]
    return mine


def _process_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _process_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _wants_pinned(flat: FlatState) -> bool:
    return torch.cuda.is_available() and any(t.device.type == "cuda" for t in flat.tensors.values())


def _tensor_checksums(layout: _layout.ShardLayout, data: memoryview, readiness: Readiness) -> dict[str, int]:
    crcs = {}
    for slot in layout.slots:
        readiness.wait(slot.end)
        crcs[slot.name] = crc32c(data[slot.start : slot.end])
    return crcs
