"""Loading: read a checkpoint's shards, check every checksum, restore the live state."""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from gpuguard.checkpoint import _layout, _reshard
from gpuguard.checkpoint._catalog import Catalog
from gpuguard.checkpoint._collective import RankGroup, default_group
from gpuguard.checkpoint._consensus import agree_newest
from gpuguard.checkpoint._crc import crc32c, crc32c_combine
from gpuguard.checkpoint._fit import misfits
from gpuguard.checkpoint._manifest import Manifest, ShardRecord
from gpuguard.checkpoint._storage import Storage
from gpuguard.checkpoint._tree import restore
from gpuguard.errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError

log = logging.getLogger("gpuguard.checkpoint")


@dataclass
class PreparedLoad:
    """One rank's part of a checkpoint, read and checked, not yet applied to the live state."""

    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    devices: dict[str, str]
    strict: bool

    def apply(self, state: MutableMapping[str, Any]) -> None:
        restore(state, self.tree, self.tensors, self.devices, strict=self.strict)


class Loader:
    """Reads checkpoints back; nothing read is unpickled."""

    def __init__(self, storage: Storage, catalog: Catalog) -> None:
        self.storage = storage
        self.catalog = catalog
        self.url = catalog.url
        self.last_bytes_read = 0  # tensor bytes the last sharded load read

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
            return list(reversed(self.catalog.manifests()))

        agreed = agree_newest(
            group,
            listing,
            lambda manifest: self.prepare_one(manifest, state, rank, strict, live_world),
            fallback=fallback,
            nothing=f"no committed checkpoint under {self.url}",
        )
        agreed.value.apply(state)
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
        tensors: dict[str, torch.Tensor]
        if _reshard.applies(manifest, state):
            # Sharded checkpoints and DTensor state: resharded onto the live sharding, reading only the
            # chunks' byte ranges that overlap this rank's shards.
            tensors, record, stats = _reshard.read_tensors(self.storage, manifest, state, rank, world_size)
            self.last_bytes_read = stats.bytes_read
        elif manifest.layout == "replicated":
            # Every shard holds part of the one state; this rank's own shard goes last so that its
            # per-rank tensors (RNG states) win.
            record = manifest.shards[rank % manifest.world_size]
            tensors = {}
            for other in [*(s for s in manifest.shards if s is not record), record]:
                tensors.update(self.read_shard(manifest.id, other)[1])  # views keep their buffers alive
        else:
            if manifest.world_size != world_size:
                raise CheckpointMismatchError(
                    f"{manifest.id} holds per-rank state of {manifest.world_size} rank(s); this job has "
                    f"{world_size}: loading it would drop or invent ranks' state (resume with "
                    f"{manifest.world_size} ranks, or save with replicated=True)",
                    entries=[f"world_size: {manifest.world_size} in the checkpoint, {world_size} live"],
                )
            if not 0 <= rank < manifest.world_size:
                raise CheckpointError(
                    f"{manifest.id} was saved by {manifest.world_size} rank(s); there is no rank {rank}"
                )
            record = manifest.shards[rank]
            tensors = self.read_shard(manifest.id, record)[1]
        tree_raw = self.read_state(manifest.id, record)
        try:
            doc = json.loads(tree_raw)
            tree, devices = doc["tree"], doc["devices"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointCorruptError(
                f"{manifest.id}/{record.state_file}: unreadable ({exc})", shard=record.state_file
            ) from None
        problems = misfits(state, tree, tensors, strict=strict)
        if problems:
            shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise CheckpointMismatchError(
                f"{manifest.id} does not fit the live state, which is left unchanged: {shown}", entries=problems
            )
        return PreparedLoad(tree, tensors, devices, strict)

    def read_shard(
        self, name: str, record: ShardRecord, problems: list[CheckpointCorruptError] | None = None
    ) -> tuple[bytearray, dict[str, torch.Tensor]]:
        """Read and check a shard. Raises at the first bad tensor, or collects them all into ``problems``."""
        where = f"{name}/{record.file}"
        try:
            data = self.storage.read(self.storage.path(name, record.file), record.bytes)
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

    def read_state(self, name: str, record: ShardRecord) -> bytes:
        try:
            raw = self.storage.cat(self.storage.path(name, record.state_file))
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{name}/{record.state_file}: missing", shard=record.state_file) from None
        if crc32c(raw) != record.state_crc32c or len(raw) != record.state_bytes:
            raise CheckpointCorruptError(f"{name}/{record.state_file}: fails its checksum", shard=record.state_file)
        return raw


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1
