"""Loading onto the live state's own sharding, whatever world size and mesh saved the checkpoint.

For every tensor, the target is what the live state holds: a DTensor's local shard (its region of
the global tensor, from its mesh and placements), or the whole tensor for a plain one. The sources
are the saved chunks: the manifest's sharded chunks, or a plain tensor as one chunk covering it all.
Each rank reads only the bytes of the chunks that overlap its target: the overlap is split into
contiguous runs (row-major), the runs widened to the chunk's checksum blocks, and neighbouring blocks
read as one ranged read, as are the ranges of chunks that follow one another in a file; reads run in
parallel, and every block is checked against its CRC-32C
before a byte of it is used. Nothing is unpickled. A plain tensor has one checksum (its own), so a
rank that needs part of one (a single-process checkpoint loaded into a sharded model) reads it whole,
verifies it, and keeps its part.

Per-rank state that is not sharded (RNG states, plain tensors, the JSON tree) comes from the file of
the same rank, or of ``rank % saved_world_size`` when the world size changed (said in a warning).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from gpuguard.checkpoint import _layout
from gpuguard.checkpoint._crc import crc32c
from gpuguard.checkpoint._manifest import Manifest, ShardRecord
from gpuguard.checkpoint._optim_names import parameter_names
from gpuguard.checkpoint._sharding import NotABoxError, SavedChunk, is_dtensor, local_region, tiling_problems
from gpuguard.checkpoint._storage import Storage
from gpuguard.checkpoint._tree import flatten
from gpuguard.errors import CheckpointCorruptError, CheckpointError, UnsupportedStateError

log = logging.getLogger("gpuguard.checkpoint")
PART_BYTES: Final = 32 << 20  # one ranged read at most: long ranges are split into parallel parts


def is_sharded(manifest: Manifest) -> bool:
    return any(record.chunks for record in manifest.shards)


def applies(manifest: Manifest, state: Mapping[str, Any]) -> bool:
    """Whether a load needs this module: a sharded checkpoint, or DTensors in the live state."""
    if is_sharded(manifest):
        return True
    return any(is_dtensor(t) for t in _live_tensors(state).values())


@dataclass
class _Target:
    name: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtensor: Any = None  # the live DTensor (or optimizer parameter) whose sharding to take
    out: torch.Tensor | None = None
    filled: int = 0


@dataclass
class ReadStats:
    bytes_read: int = 0
    reads: int = 0
    files: set[str] = field(default_factory=set)


def read_tensors(
    storage: Storage, manifest: Manifest, state: Mapping[str, Any], rank: int, world_size: int
) -> tuple[dict[str, torch.Tensor], ShardRecord, ReadStats]:
    """This rank's tensors, shaped like the live state; returns them, the record whose tree to use, stats.

    Raises:
        CheckpointCorruptError: a block fails its checksum, or the saved chunks do not cover a tensor.
        CheckpointError: a saved tensor's global shape differs from the live one's.
    """
    saved_ws = manifest.world_size
    sharded = is_sharded(manifest)
    tiling = tiling_problems(manifest.shards)  # chunks twice or missing: no placement could be right
    if tiling:
        raise CheckpointCorruptError(f"{manifest.id}: {tiling[0]}", shard=tiling[0].shard, tensor=tiling[0].tensor)
    if rank >= saved_ws and not sharded and saved_ws != 1:
        raise CheckpointError(f"{manifest.id} was saved by {saved_ws} rank(s); there is no rank {rank}")
    source = manifest.shards[rank % saved_ws]
    if world_size != saved_ws:
        log.warning(
            "%s was saved by %d rank(s) and is loaded by %d: sharded tensors are resharded; rank %d takes "
            "the unsharded per-rank state (RNG, plain tensors) of saved rank %d",
            manifest.id,
            saved_ws,
            world_size,
            rank,
            source.rank,
        )
    chunks = _sources(storage, manifest, source)
    live = _live_tensors(state)
    targets = {name: _target(name, pieces, live, state) for name, pieces in chunks.items()}
    stats = ReadStats()
    _fill(storage, manifest.id, chunks, targets, stats)
    tensors: dict[str, torch.Tensor] = {}
    for name, target in targets.items():
        assert target.out is not None
        tensors[name] = _wrap(target)
    return tensors, source, stats


def _live_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    try:
        return flatten(state, rng=False).tensors
    except UnsupportedStateError:  # a live value the checkpoint replaces anyway: no sharding to take from it
        return {}


def _sources(storage: Storage, manifest: Manifest, source: ShardRecord) -> dict[str, list[SavedChunk]]:
    """Every saved piece by tensor name: sharded chunks from all ranks, plain tensors from ``source``."""
    chunks: dict[str, list[SavedChunk]] = {}
    for record in manifest.shards:
        for name, data in record.chunks.items():
            chunks.setdefault(name, []).append(SavedChunk.parse(record.file, name, data))
    # Plain tensors: one chunk covering all of each. In a replicated checkpoint every shard holds
    # part of the one state, and the rank's own shard goes last so its RNG states win.
    records = (
        [source] if manifest.layout != "replicated" else [*(s for s in manifest.shards if s is not source), source]
    )
    for record in records:
        plain = [n for n in record.tensors if n not in record.chunks]
        if not plain:
            continue
        base, header = _read_header(storage, manifest.id, record)
        for name in plain:
            entry = header.get(name)
            try:
                dtype = _layout.DTYPES_BY_CODE[entry["dtype"]]  # type: ignore[index]
                shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
                start, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
            except (KeyError, TypeError, ValueError):
                raise CheckpointCorruptError(
                    f"{manifest.id}/{record.file}: tensor {name!r} has a malformed or missing header entry",
                    shard=record.file,
                    tensor=name,
                ) from None
            nbytes = dtype.itemsize * _numel(shape)
            if end - start != nbytes or base + end > record.bytes:
                raise CheckpointCorruptError(
                    f"{manifest.id}/{record.file}: tensor {name!r} lies outside the file",
                    shard=record.file,
                    tensor=name,
                )
            chunks[name] = [
                SavedChunk(
                    file=record.file,
                    name=name,
                    global_shape=shape,
                    dtype=dtype,
                    offsets=(0,) * len(shape),
                    sizes=shape,
                    file_offset=base + start,
                    block_bytes=max(1, nbytes),  # one block: the tensor's own checksum
                    blocks=(record.tensors[name],),
                )
            ]
    return chunks


def _read_header(storage: Storage, name: str, record: ShardRecord) -> tuple[int, dict[str, Any]]:
    path = storage.path(name, record.file)
    try:
        raw = storage.call("reading", path, lambda: bytes(storage.fs.cat_file(path, start=0, end=record.header_bytes)))
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{name}/{record.file}: missing", shard=record.file) from None
    return _layout.parse_header(raw, where=f"{name}/{record.file}")


def _target(name: str, pieces: list[SavedChunk], live: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> _Target:
    global_shape = pieces[0].global_shape
    if any(p.global_shape != global_shape or p.dtype != pieces[0].dtype for p in pieces):
        raise CheckpointCorruptError(f"tensor {name!r}: its saved chunks disagree on shape or dtype", tensor=name)
    current: Any = live.get(name)
    if current is None:
        current = _optimizer_param(name, state)
        if current is not None and tuple(current.shape) != global_shape:
            current = None  # per-parameter state that is not shaped like it (Adam's step): plain
    if current is not None and is_dtensor(current):
        if tuple(current.shape) != global_shape:
            raise CheckpointError(
                f"tensor {name!r}: saved with global shape {global_shape}, the live state has {tuple(current.shape)}"
            )
        mesh = current.device_mesh
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            offsets, sizes = (0,) * len(global_shape), (0,) * len(global_shape)
        else:
            try:
                offsets, sizes = local_region(global_shape, tuple(mesh.shape), coordinate, current.placements)
            except NotABoxError as exc:
                raise UnsupportedStateError(
                    f"tensor {name!r}: the live placements {tuple(current.placements)} give this rank a piece "
                    f"that is not a box of {global_shape} ({exc})"
                ) from None
        return _Target(name, global_shape, offsets, sizes, dtensor=current)
    return _Target(name, global_shape, (0,) * len(global_shape), global_shape)


def _optimizer_param(name: str, state: Mapping[str, Any]) -> Any:
    """A fresh optimizer has no state yet: its state ``<key>/state/<i or name>/...`` is sharded like that parameter."""
    parts = name.split("/")
    if len(parts) < 4 or parts[1] != "state":
        return None
    optimizer = state.get(_unescape(parts[0]))
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not parts[2].isdigit():  # keyed by parameter name (see _optim_names)
        wanted = _unescape(parts[2])
        return next((p for p in params if parameter_names(state).get(id(p)) == wanted), None)
    index = int(parts[2])
    return params[index] if index < len(params) else None


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def _fill(
    storage: Storage,
    checkpoint: str,
    chunks: Mapping[str, list[SavedChunk]],
    targets: Mapping[str, _Target],
    stats: ReadStats,
) -> None:
    """Plan the ranged reads of every overlap, run them in parallel, verify, copy into the targets."""
    plans: list[tuple[_Target, SavedChunk, list[tuple[int, int]], list[tuple[tuple[Any, ...], int, int]]]] = []
    for name, target in targets.items():
        target.out = torch.empty(target.sizes, dtype=chunks[name][0].dtype)
        for chunk in chunks[name]:
            runs = _runs(chunk, target)
            if runs:
                plans.append((target, chunk, _block_ranges(chunk, runs), runs))
    parts: list[_Part] = []
    buffers: list[list[tuple[int, bytearray]]] = []
    for _, chunk, ranges, _ in plans:
        # Long ranges are read in block-aligned parts, in parallel (S3 serves each GET at its own pace).
        part = max(1, PART_BYTES // chunk.block_bytes) * chunk.block_bytes
        pieces = []
        for start, end in ranges:
            buffer = bytearray(end - start)
            pieces.append((start, buffer))
            for a in range(start, end, part):
                b = min(end, a + part)
                parts.append(_Part(chunk, a, b, memoryview(buffer)[a - start : b - start]))
        buffers.append(pieces)
    reads: list[Future[None]] = []
    for batch in _batches(parts):
        path = storage.path(checkpoint, batch[0].chunk.file)
        reads.append(storage.submit(_read_verified, storage, checkpoint, path, batch))
        stats.reads += 1
    for future in reads:
        future.result()
    for (target, chunk, _, runs), pieces in zip(plans, buffers, strict=True):
        stats.bytes_read += sum(len(p) for _, p in pieces)
        stats.files.add(chunk.file)
        _copy_runs(target, chunk, runs, pieces)
    for target in targets.values():
        if target.filled != _numel(target.sizes):
            raise CheckpointCorruptError(
                f"{checkpoint}: tensor {target.name!r}: the saved chunks cover {target.filled} of the "
                f"{_numel(target.sizes)} elements this rank needs",
                tensor=target.name,
            )


def _runs(chunk: SavedChunk, target: _Target) -> list[tuple[tuple[Any, ...], int, int]]:
    """The overlap of a chunk and a target as contiguous runs of the chunk's bytes.

    Each run is (index into the target, byte start within the chunk, byte length).
    """
    ndim = len(chunk.sizes)
    lo = [max(c, t) for c, t in zip(chunk.offsets, target.offsets, strict=True)]
    hi = [
        min(c + cs, t + ts)
        for c, cs, t, ts in zip(chunk.offsets, chunk.sizes, target.offsets, target.sizes, strict=True)
    ]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return []
    item = chunk.dtype.itemsize
    if ndim == 0:
        return [((), 0, item)]
    strides = [1] * ndim
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * chunk.sizes[d + 1]
    # The innermost dims that the overlap covers whole merge into one run with the dim before them.
    k = ndim - 1
    while k > 0 and lo[k] == chunk.offsets[k] and hi[k] == chunk.offsets[k] + chunk.sizes[k]:
        k -= 1
    run_len = (hi[k] - lo[k]) * strides[k]
    tail = tuple(slice(lo[d] - target.offsets[d], hi[d] - target.offsets[d]) for d in range(k, ndim))
    runs = []
    for lead in itertools.product(*(range(lo[d], hi[d]) for d in range(k))):
        start = sum(
            (i - o) * s for i, o, s in zip(lead, chunk.offsets, strides, strict=False)
        )  # lead: the first k dims
        start += (lo[k] - chunk.offsets[k]) * strides[k]
        index = tuple(i - t for i, t in zip(lead, target.offsets, strict=False)) + tail
        runs.append((index, start * item, run_len * item))
    return runs


def _block_ranges(chunk: SavedChunk, runs: list[tuple[tuple[Any, ...], int, int]]) -> list[tuple[int, int]]:
    """Byte ranges of the chunk to read: the runs widened to whole checksum blocks, neighbours merged."""
    size = chunk.block_bytes
    ranges: list[tuple[int, int]] = []
    for _, start, length in runs:
        a = start // size * size
        b = min(chunk.nbytes, -(-(start + length) // size) * size)
        if ranges and a <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], b))
        else:
            ranges.append((a, b))
    return ranges


@dataclass(frozen=True)
class _Part:
    """Bytes [start, end) of a chunk (block-aligned), bound for ``into``."""

    chunk: SavedChunk
    start: int
    end: int
    into: memoryview

    @property
    def file_start(self) -> int:
        return self.chunk.file_offset + self.start

    @property
    def file_end(self) -> int:
        return self.chunk.file_offset + self.end


def _batches(parts: list[_Part]) -> list[list[_Part]]:
    """Read tasks: parts that follow one another in one file (the small chunks of several tensors a rank
    needs whole, say), up to `PART_BYTES` a task, read in one ranged read (one GET on object stores)
    instead of one each; any other part is a task of its own."""
    batches: list[list[_Part]] = []
    size = 0
    for part in sorted(parts, key=lambda p: (p.chunk.file, p.file_start)):
        last = batches[-1][-1] if batches else None
        n = part.end - part.start
        follows = last is not None and last.chunk.file == part.chunk.file and last.file_end == part.file_start
        if follows and size + n <= PART_BYTES:
            batches[-1].append(part)
            size += n
        else:
            batches.append([part])
            size = n
    return batches


def _read_verified(storage: Storage, checkpoint: str, path: str, batch: list[_Part]) -> None:
    """Read a batch's bytes in one ranged read, check every block's CRC-32C, then fill each part's buffer."""
    file = batch[0].chunk.file
    a, b = batch[0].file_start, batch[-1].file_end
    try:
        data = memoryview(storage.call("reading", path, lambda: storage.fs.cat_file(path, start=a, end=b)))
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{checkpoint}/{file}: missing", shard=file) from None
    for part in batch:
        chunk, start, end = part.chunk, part.start, part.end
        view = data[part.file_start - a : part.file_end - a]
        if len(view) != end - start:
            raise CheckpointCorruptError(
                f"{checkpoint}/{file}: short read of tensor {chunk.name!r} ({len(view)} of {end - start} bytes)",
                shard=file,
                tensor=chunk.name,
            )
        for block in range(start // chunk.block_bytes, -(-end // chunk.block_bytes)):
            lo = block * chunk.block_bytes - start
            got = crc32c(view[lo : min(lo + chunk.block_bytes, len(view))])
            if got != chunk.blocks[block]:
                raise CheckpointCorruptError(
                    f"{checkpoint}/{file}: tensor {chunk.name!r} fails its checksum in block {block} "
                    f"(crc32c {got:08x}, expected {chunk.blocks[block]:08x})",
                    shard=file,
                    tensor=chunk.name,
                )
    for part in batch:  # every block of the batch verified
        part.into[:] = data[part.file_start - a : part.file_end - a]


def _copy_runs(
    target: _Target,
    chunk: SavedChunk,
    runs: list[tuple[tuple[Any, ...], int, int]],
    pieces: list[tuple[int, bytearray]],  # block ranges read, in order
) -> None:
    assert target.out is not None
    out = target.out
    ndim = len(target.sizes)
    piece = 0
    for index, start, length in runs:
        while pieces[piece][0] + len(pieces[piece][1]) < start + length:
            piece += 1
        base, data = pieces[piece]
        values = torch.frombuffer(data, dtype=chunk.dtype, count=length // chunk.dtype.itemsize, offset=start - base)
        dest = out[index] if ndim else out
        dest.copy_(values.reshape(dest.shape))
        target.filled += values.numel()


def _wrap(target: _Target) -> torch.Tensor:
    assert target.out is not None
    if target.dtensor is None:
        return target.out
    from torch.distributed.tensor import DTensor

    live = target.dtensor
    local = target.out
    device = live.to_local().device if live.device_mesh.get_coordinate() is not None else local.device
    if local.device != device:
        local = local.to(device)
    stride = [1] * len(target.global_shape)
    for d in range(len(stride) - 2, -1, -1):
        stride[d] = stride[d + 1] * target.global_shape[d + 1]
    return DTensor.from_local(
        local,
        live.device_mesh,
        live.placements,
        run_check=False,
        shape=torch.Size(target.global_shape),
        stride=tuple(stride),
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
