"""Loading: read a checkpoint's shards, check every checksum, restore the live state."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from gpuguard.checkpoint import _reading, _reshard
from gpuguard.checkpoint._catalog import Catalog
from gpuguard.checkpoint._collective import RankGroup, default_group
from gpuguard.checkpoint._consensus import agree_newest
from gpuguard.checkpoint._crc import crc32c
from gpuguard.checkpoint._fit import misfits
from gpuguard.checkpoint._manifest import Manifest, ShardRecord
from gpuguard.checkpoint._staging import StagingPool, host_copy
from gpuguard.checkpoint._storage import Storage
from gpuguard.checkpoint._tree import flatten, restore
from gpuguard.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    StorageError,
    UnsupportedStateError,
)

log = logging.getLogger("gpuguard.checkpoint")


@dataclass
class Completion:
    """What is left of a verified read once every rank may load: moving the bytes into the live
    tensors (``finish``), and giving back the staging memory they wait in (``release``)."""

    finish: Callable[[], None] | None = None
    release: Callable[[], None] | None = None

    def discard(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()


@dataclass
class PreparedLoad:
    """One rank's part of a checkpoint, read and checked, not yet applied to the live state."""

    doc: StateDocument
    tensors: dict[str, torch.Tensor]
    strict: bool
    completion: Completion

    def apply(self, state: MutableMapping[str, Any]) -> None:
        try:
            if self.completion.finish is not None:
                self.completion.finish()
        finally:
            self.completion.discard()
        restore(state, self.doc.tree, self.tensors, self.doc.devices, strict=self.strict, storages=self.doc.storages)

    def discard(self) -> None:
        """Not applied (another rank could not load this checkpoint): frees what it holds."""
        self.completion.discard()


class Loader:
    """Reads checkpoints back; nothing read is unpickled."""

    def __init__(self, storage: Storage, catalog: Catalog, staging: StagingPool) -> None:
        self.storage = storage
        self.catalog = catalog
        self.staging = staging  # its free buffers are touched memory to read into
        self.url = catalog.url
        self.last_bytes_read = 0  # tensor bytes the last sharded load read
        self.last_loaded: Manifest | None = None  # the checkpoint the last load applied (every rank the same)
        self.last_loaded_id: str | None = None  # the checkpoint the last load applied

    def load(
        self,
        state: MutableMapping[str, Any],
        checkpoint_id: str | None = None,
        *,
        rank: int = 0,
        fallback: bool = False,
        strict: bool = True,
        world_size: int | None = None,
        group: RankGroup | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> int:
        """Load a checkpoint into ``state``; returns its step. See `CheckpointStore.load`, the documented API.

        With a ``group`` of several ranks, every rank reads and checks its part of a candidate before
        any rank changes its state, and all load the newest one every rank could (see `_consensus`).
        """
        live_world = _world_size() if world_size is None else world_size
        group = default_group(live_world) if group is None else group

        def listing() -> list[Manifest]:
            if checkpoint_id is not None:
                manifest = self.catalog.manifest(checkpoint_id)
                assert manifest is not None
                return [manifest]
            return [m for m in reversed(self.catalog.manifests()) if m.id not in exclude]

        prepared: list[PreparedLoad] = []

        def check(manifest: Manifest) -> PreparedLoad:
            part = self.prepare_one(manifest, state, rank, strict, live_world)
            prepared.append(part)
            return part

        try:
            agreed = agree_newest(
                group, listing, check, fallback=fallback, nothing=f"no committed checkpoint under {self.url}"
            )
        except BaseException:
            for part in prepared:
                part.discard()
            raise
        for part in prepared:
            if part is not agreed.value:
                part.discard()
        agreed.value.apply(state)
        self.last_loaded = agreed.candidate
        self.last_loaded_id = agreed.candidate.id
        return agreed.candidate.step

    def load_one(
        self, manifest: Manifest, state: MutableMapping[str, Any], rank: int, strict: bool, world_size: int
    ) -> None:
        self.prepare_one(manifest, state, rank, strict, world_size).apply(state)

    def prepare_one(
        self, manifest: Manifest, state: MutableMapping[str, Any], rank: int, strict: bool, world_size: int
    ) -> PreparedLoad:
        """Read and check this rank's part of ``manifest`` against ``state``; changes nothing yet.

        Raises:
            CheckpointCorruptError: a file or tensor fails its checksum.
            CheckpointMismatchError: the checkpoint does not fit ``state``.
        """
        if _reshard.applies(manifest, state):
            # Sharded checkpoints and DTensor state: resharded onto the live sharding, reading only the
            # chunks' byte ranges that overlap this rank's shards.
            tensors, record, stats = _reshard.read_tensors(self.storage, manifest, state, rank, world_size)
            self.last_bytes_read = stats.bytes_read
            doc = self.read_tree(manifest.id, record)
            self._check_fit(manifest, state, doc, tensors, strict)
            return PreparedLoad(doc, tensors, strict, Completion())
        records = self._records(manifest, rank, world_size)
        stored: dict[str, tuple[ShardRecord, _reading.StoredTensor]] = {}
        for record in records:  # this rank's file last: its per-rank tensors (RNG states) win
            for tensor in _reading.describe(self.storage, manifest.id, record):
                stored[tensor.name] = (record, tensor)
        doc = self.read_tree(manifest.id, records[-1])
        # Everything that can be checked without the tensors' bytes is, before any is read.
        self._check_fit(manifest, state, doc, {name: t.meta() for name, (_, t) in stored.items()}, strict)
        tensors, completion = self._read_into(manifest.id, stored, state, doc.devices)
        return PreparedLoad(doc, tensors, strict, completion)

    def _records(self, manifest: Manifest, rank: int, world_size: int) -> list[ShardRecord]:
        """The files an unsharded load reads, this rank's last."""
        if manifest.layout == "replicated":
            # Every shard holds part of the one state.
            own = manifest.shards[rank % manifest.world_size]
            return [*(s for s in manifest.shards if s is not own), own]
        if manifest.world_size != world_size:
            raise CheckpointMismatchError(
                f"{manifest.id} holds per-rank state of {manifest.world_size} rank(s); this job has "
                f"{world_size}: loading it would drop or invent ranks' state (resume with "
                f"{manifest.world_size} ranks, or save with replicated=True)",
                entries=[f"world_size: {manifest.world_size} in the checkpoint, {world_size} live"],
            )
        if not 0 <= rank < manifest.world_size:
            raise CheckpointError(f"{manifest.id} was saved by {manifest.world_size} rank(s); there is no rank {rank}")
        return [manifest.shards[rank]]

    def _check_fit(
        self,
        manifest: Manifest,
        state: MutableMapping[str, Any],
        doc: StateDocument,
        tensors: Mapping[str, torch.Tensor],
        strict: bool,
    ) -> None:
        problems = misfits(state, doc.tree, tensors, strict=strict)
        if problems:
            shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise CheckpointMismatchError(
                f"{manifest.id} does not fit the live state, which is left unchanged: {shown}", entries=problems
            )

    def _read_into(
        self,
        checkpoint: str,
        stored: Mapping[str, tuple[ShardRecord, _reading.StoredTensor]],
        state: Mapping[str, Any],
        devices: Mapping[str, str],
    ) -> tuple[dict[str, torch.Tensor], Completion]:
        """Read every stored tensor, verified, into the memory it ends up in; the live state is written
        only once every byte has passed its checksum (a corrupt shard changes nothing), by the returned
        `Completion`'s ``finish``, which runs once every rank has verified its part.

        Tensors the live state does not hold yet (a fresh optimizer's state, a tensor it lacks) are read
        once into memory the restored state keeps, checksummed on the way; bound for a GPU, they go
        through pinned memory while the next bytes are read. A live host tensor of the same dtype and
        shape receives its bytes in place, after they verified: from a local disk, a first pass
        checksums them (in a small buffer that stays in cache, beside the reads of the others) and a
        second reads them straight into the live tensor, checksummed again; from other storage, they
        are read into the staging buffer (memory already touched) and moved into the live tensor.
        """
        live = _live_tensors(state)
        in_place: list[tuple[_reading.StoredTensor, torch.Tensor]] = []
        tensors: dict[str, torch.Tensor] = {}
        first: dict[str, list[_reading.Target]] = {}  # by file
        for _, tensor in stored.values():
            file = stored[tensor.name][0].file
            target = live.get(tensor.name)
            if target is not None and _receives_in_place(target, tensor):
                in_place.append((tensor, target))
                tensors[tensor.name] = target
                continue
            device = _device_for(tensor.name, live, devices)
            if device.type == "cpu":
                value = _reading.fresh_tensor(tensor)
                first.setdefault(file, []).append(_target(tensor, host=value))
            else:
                value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                first.setdefault(file, []).append(_reading.Target(tensor, device=value))
            tensors[tensor.name] = value
        if self.storage.is_local:
            return tensors, self._read_local(checkpoint, stored, in_place, first)
        return tensors, self._read_staged(checkpoint, stored, in_place, first)

    def _read_local(
        self,
        checkpoint: str,
        stored: Mapping[str, tuple[ShardRecord, _reading.StoredTensor]],
        in_place: list[tuple[_reading.StoredTensor, torch.Tensor]],
        first: dict[str, list[_reading.Target]],
    ) -> Completion:
        for tensor, _ in in_place:  # checksummed only, in the pass that reads the others
            first.setdefault(stored[tensor.name][0].file, []).append(_reading.Target(tensor))
        for file, targets in first.items():
            _reading.read(self.storage, checkpoint, file, targets)
        second: dict[str, list[_reading.Target]] = {}
        for tensor, target in in_place:
            second.setdefault(stored[tensor.name][0].file, []).append(_target(tensor, host=target))
        if not second:
            return Completion()
        storage = self.storage

        def finish() -> None:
            partly = "the live tensors read so far hold part of the checkpoint"
            try:
                for file, targets in second.items():
                    _reading.read(storage, checkpoint, file, targets)
            except CheckpointCorruptError as exc:  # it verified a moment ago: something rewrote the file since
                raise CheckpointCorruptError(
                    f"{exc} (it changed while it was being read: {partly})", shard=exc.shard, tensor=exc.tensor
                ) from None
            except StorageError as exc:  # the disk failed between two reads of the same bytes
                raise StorageError(
                    f"{exc} ({partly})",
                    path=exc.path,
                    transient=exc.transient,
                    operation=exc.operation,
                    elapsed_s=exc.elapsed_s,
                    timed_out=exc.timed_out,
                ) from exc

        return Completion(finish=finish)

    def _read_staged(
        self,
        checkpoint: str,
        stored: Mapping[str, tuple[ShardRecord, _reading.StoredTensor]],
        in_place: list[tuple[_reading.StoredTensor, torch.Tensor]],
        first: dict[str, list[_reading.Target]],
    ) -> Completion:
        scratch_bytes = sum(_reading.aligned(t.nbytes) for t, _ in in_place)
        lent = self.staging.lend(scratch_bytes) if scratch_bytes else None
        scratch = lent.data[:scratch_bytes] if lent is not None else _reading.fresh_host_bytes(scratch_bytes)
        moves: list[tuple[torch.Tensor, torch.Tensor]] = []
        offset = 0
        for tensor, target in in_place:
            staged = _reading.tensor_at(scratch, offset, tensor)
            offset += _reading.aligned(tensor.nbytes)
            moves.append((target, staged))
            first.setdefault(stored[tensor.name][0].file, []).append(_target(tensor, host=staged))
        try:
            for file, targets in first.items():
                _reading.read(self.storage, checkpoint, file, targets)
        except BaseException as exc:
            if lent is not None:
                if isinstance(exc, StorageError) and exc.timed_out:  # that read may still write into the buffer
                    self.staging.discard(lent)  # never reused
                else:
                    self.staging.release(lent)
            raise
        staging = self.staging

        def release() -> None:
            if lent is not None:
                staging.release(lent)

        # every byte verified: the live tensors change once every rank may load
        return Completion(finish=lambda: host_copy(moves), release=release)

    def read_whole(self, manifest: Manifest, rank: int = 0) -> tuple[StateDocument, dict[str, torch.Tensor]]:
        """Rank ``rank``'s view of a checkpoint into host memory, every tensor whole and verified: a
        sharded tensor's chunks assembled into its global shape (for an export)."""
        if _reshard.is_sharded(manifest):
            tensors, record, _ = _reshard.read_tensors(self.storage, manifest, {}, rank, manifest.world_size)
            return self.read_tree(manifest.id, record), tensors
        records = self._records(manifest, rank, manifest.world_size)
        stored: dict[str, tuple[ShardRecord, _reading.StoredTensor]] = {}
        for record in records:
            for tensor in _reading.describe(self.storage, manifest.id, record):
                stored[tensor.name] = (record, tensor)
        tensors, completion = self._read_into(manifest.id, stored, {}, {})  # no live tensor: nothing to finish
        completion.discard()
        return self.read_tree(manifest.id, records[-1]), tensors

    def check_shard(self, name: str, record: ShardRecord, problems: list[CheckpointCorruptError]) -> None:
        """Re-read a shard and check every checksum, collecting what fails into ``problems`` (verify)."""
        try:
            stored = _reading.describe(self.storage, name, record)
        except CheckpointCorruptError as exc:  # the file as a whole: missing, truncated, bad header
            problems.append(exc)
            return
        _reading.read(self.storage, name, record.file, [_reading.Target(t) for t in stored], problems)

    def read_tree(self, name: str, record: ShardRecord) -> StateDocument:
        """The state file: the JSON tree, the devices tensors were saved from, shared storages."""
        raw = self.read_state(name, record)
        try:
            doc = json.loads(raw)
            return StateDocument(
                tree=dict(doc["tree"]), devices=dict(doc["devices"]), storages=list(doc.get("storages", []))
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointCorruptError(
                f"{name}/{record.state_file}: unreadable ({exc})", shard=record.state_file
            ) from None

    def read_state(self, name: str, record: ShardRecord) -> bytes:
        try:
            raw = self.storage.cat(self.storage.path(name, record.state_file))
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{name}/{record.state_file}: missing", shard=record.state_file) from None
        if crc32c(raw) != record.state_crc32c or len(raw) != record.state_bytes:
            raise CheckpointCorruptError(f"{name}/{record.state_file}: fails its checksum", shard=record.state_file)
        return raw


@dataclass(frozen=True)
class StateDocument:
    """A rank's state file (see docs/FORMAT.md)."""

    tree: dict[str, Any]
    devices: dict[str, str]
    storages: list[Any]


def _live_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    try:
        return flatten(state, rng=False).tensors
    except UnsupportedStateError:  # a value the checkpoint replaces anyway: nothing to receive bytes there
        return {}


def _receives_in_place(live: torch.Tensor, stored: _reading.StoredTensor) -> bool:
    """Whether a load may move ``stored``'s bytes straight into this live tensor's memory."""
    return (
        type(live) in (torch.Tensor, torch.nn.Parameter)
        and live.device.type == "cpu"
        and live.dtype == stored.dtype
        and tuple(live.shape) == stored.shape
        and stored.nbytes > 0
        and live.is_contiguous()
        and not live.is_conj()
        and not live.is_neg()
    )


def _device_for(name: str, live: Mapping[str, torch.Tensor], devices: Mapping[str, str]) -> torch.device:
    """Where a tensor the load allocates lives: the live tensor's device, else the one it was saved from."""
    current = live.get(name)
    if current is not None and type(current) in (torch.Tensor, torch.nn.Parameter):
        return current.device
    saved = torch.device(devices.get(name, "cpu"))
    if saved.type == "cuda" and torch.cuda.is_available() and (saved.index or 0) < torch.cuda.device_count():
        return saved
    return torch.device("cpu")


def _target(stored: _reading.StoredTensor, *, host: torch.Tensor) -> _reading.Target:
    return _reading.Target(stored, host=_reading.host_view(host) if stored.nbytes else None)


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1
