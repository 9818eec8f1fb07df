"""DTensor-valued state at save time: each global chunk of each sharded tensor is written once.

A DTensor (FSDP2's parameters and optimizer state, tensor-parallel weights, any DTensor in ``state``)
is replaced in the flattened state by its local shard. The manifest records, per written chunk, the
tensor's global shape and dtype, the chunk's offsets and sizes in the global tensor, where its bytes
start in the rank's file, and a CRC-32C per fixed-size block of those bytes, so a loader that reads
only part of a chunk (a rank resumed with another sharding) can still verify every byte it reads.

Supported: meshes of any number of dimensions whose placements are ``Shard(d)`` (any dim, uneven
sizes, several mesh dims on one tensor dim), ``_StridedShard`` (FSDP2 over a tensor-parallel model)
and ``Replicate()``, wherever each rank's piece is a box of the global tensor (it is for every layout
FSDP2 and tensor parallelism produce). ``Partial`` and pieces that are not boxes are refused at save
and at ``prepare`` with the tensor's path, rather than saved in a form no loader can place.

Who writes a chunk is decided over the whole job, not over the tensor's own mesh: a DTensor on a
submesh (TP on ``mesh["tp"]`` inside a DP×TP job, HSDP's replicas, any replicated dimension, inside or
outside the tensor's mesh) has the same chunk on several ranks. Every rank reports the chunks it holds
(one small collective, see `assign_writers`), and each distinct chunk gets one writer, the least loaded
of its holders, so replicas share the writing. `tiling_problems` checks that a checkpoint's chunks tile
every tensor exactly; commits and ``verify`` refuse any that do not.

The chunk arithmetic mirrors DTensor's own (``Shard._split_tensor``: torch.chunk semantics, chunks of
ceil(n / k), the last ones shorter or empty; ``_StridedShard._split_tensor``: split in ``split_factor``
pieces first, then each piece in k, and take chunk i of every piece), applied mesh dim by mesh dim as
``torch.distributed.tensor._utils._compute_local_shape_and_global_offset`` does; `chunk_specs` checks
the result against each DTensor's actual local shape, so a torch that shards differently fails loudly.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch

from gpuguard.checkpoint._crc import crc32c
from gpuguard.checkpoint._layout import DTYPE_CODES, DTYPES_BY_CODE, ShardLayout
from gpuguard.checkpoint._staging import Readiness
from gpuguard.checkpoint._tree import FlatState
from gpuguard.errors import CheckpointCorruptError, ConfigError, UnsupportedStateError

BLOCK_BYTES: Final = 256 << 10  # the largest checksum block of chunk bytes
MIN_BLOCK_BYTES: Final = 4 << 10  # the smallest (a page): below it, a manifest entry per block costs more than it saves
BLOCKS_PER_CHUNK: Final = 128


def block_size(nbytes: int, largest: int = BLOCK_BYTES) -> int:
    """The checksum block of a chunk of ``nbytes``: 1/128 of it in whole 4 KiB pages, from 4 KiB to ``largest``.

    A rank that reads part of a chunk reads whole blocks, so each contiguous run of its part costs at
    most two blocks more: 1/64 of the chunk for chunks up to 32 MiB (a rank that needs half of a 1 MiB
    chunk reads at most 1.03x that), 512 KiB beyond. Below 512 KiB the 4 KiB floor governs: at most 8 KiB
    more per run. The manifest holds one checksum per block (128 per chunk up to 32 MiB).
    """
    wanted = -(-max(1, nbytes) // BLOCKS_PER_CHUNK)
    wanted = -(-wanted // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES
    return max(MIN_BLOCK_BYTES, min(largest, wanted))


_SUPPORTED: Final = (
    "supported: device meshes of any dimension with Shard(dim), _StridedShard (FSDP2 + tensor parallel) or "
    "Replicate() placements, where each rank's piece is a box of the global tensor"
)

try:  # torch built without distributed has no DTensor; then no state can hold one
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - every torch wheel gpuguard supports ships it
    DTensor = None  # type: ignore[assignment,misc]

Runs = list[tuple[int, int]]  # global index ranges [start, stop) along one dim, in the local tensor's order


class NotABoxError(ValueError):
    """A rank's piece of a tensor is not one box of the global tensor."""


@dataclass(frozen=True)
class ChunkSpec:
    """The piece of a global tensor that one rank holds."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for size in self.sizes:
            n *= size
        return n


def is_dtensor(value: object) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def _chunk(length: int, parts: int, index: int) -> tuple[int, int]:
    """Positions [lo, hi) of chunk ``index`` of ``parts`` (torch.chunk: ceil-sized, the last ones short or empty)."""
    full = -(-length // parts)
    lo = min(full * index, length)
    return lo, min(lo + full, length)


def _take(runs: Runs, lo: int, hi: int) -> Runs:
    """Positions [lo, hi) of the concatenated runs."""
    out: Runs = []
    position = 0
    for a, b in runs:
        start, stop = max(lo, position), min(hi, position + b - a)
        if start < stop:
            if out and out[-1][1] == a + start - position:
                out[-1] = (out[-1][0], a + stop - position)
            else:
                out.append((a + start - position, a + stop - position))
        position += b - a
    return out


def _split(runs: Runs, placement: Any, parts: int, index: int) -> Runs:
    length = sum(b - a for a, b in runs)
    if type(placement) is _StridedShard:
        # Sharded right to left (FSDP2 over TP): ``split_factor`` pieces first, then chunk ``index`` of each.
        out: Runs = []
        factor = int(placement.split_factor)
        for piece in range(factor):
            a, b = _chunk(length, factor, piece)
            lo, hi = _chunk(b - a, parts, index)
            for run in _take(runs, a + lo, a + hi):
                if out and out[-1][1] == run[0]:
                    out[-1] = (out[-1][0], run[1])
                else:
                    out.append(run)
        return out
    lo, hi = _chunk(length, parts, index)
    return _take(runs, lo, hi)


def local_region(
    global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[Any]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the piece held at ``coordinate``; DTensor's chunking, mesh dim by mesh dim.

    Raises:
        NotABoxError: the piece is not one box of the global tensor (an empty piece always is one).
    """
    runs: list[Runs] = [[(0, int(d))] if int(d) else [] for d in global_shape]
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, (Shard, _StridedShard)):  # not subclasses of one another in every torch
            dim = placement.dim % len(runs)
            runs[dim] = _split(runs[dim], placement, int(mesh_shape[mesh_dim]), int(coordinate[mesh_dim]))
    if any(not r for r in runs):
        return (0,) * len(runs), tuple(sum(b - a for a, b in r) for r in runs)
    if any(len(r) > 1 for r in runs):
        raise NotABoxError(f"indices {[r for r in runs if len(r) > 1]} are not one range")
    return tuple(r[0][0] for r in runs), tuple(r[0][1] - r[0][0] for r in runs)


def check_placements(name: str, value: Any) -> None:
    """Refuse what no loader could place; raises `UnsupportedStateError` naming the tensor."""
    mesh = value.device_mesh
    for placement in value.placements:
        # type() is exact on purpose: a new Shard subclass may lay chunks out differently.
        if type(placement) not in (Shard, _StridedShard, Replicate):
            raise UnsupportedStateError(
                f"tensor {name!r}: placement {placement!r} on mesh {tuple(mesh.shape)}; {_SUPPORTED} "
                "(a Partial tensor must be reduced first, e.g. with .redistribute(placements=[Replicate()]))"
            )


def check_sharding(state: Mapping[str, Any]) -> None:
    """Refuse, before training starts, DTensors that no checkpoint could place (see `check_placements`).

    Raises:
        UnsupportedStateError: naming the tensor and its placement.
    """
    from gpuguard.checkpoint._tree import flatten

    try:
        flat = flatten(state, rng=False)
    except UnsupportedStateError:
        return  # not a sharding problem: the first save names it with its path
    for name, tensor in flat.tensors.items():
        if is_dtensor(tensor):
            _spec(name, tensor)


def holds_dtensors(flat: FlatState) -> bool:
    return any(is_dtensor(t) for t in flat.tensors.values())


def _spec(name: str, value: Any) -> tuple[ChunkSpec, torch.Tensor] | None:
    check_placements(name, value)
    mesh = value.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is outside the tensor's mesh: it holds none of it
        return None
    try:
        offsets, sizes = local_region(tuple(value.shape), tuple(mesh.shape), coordinate, value.placements)
    except NotABoxError as exc:
        raise UnsupportedStateError(
            f"tensor {name!r}: placements {tuple(value.placements)} on mesh {tuple(mesh.shape)} give mesh "
            f"coordinate {tuple(coordinate)} a piece that is not a box of {tuple(value.shape)} ({exc}); {_SUPPORTED}"
        ) from None
    local = value.to_local()
    if tuple(local.shape) != sizes:
        raise UnsupportedStateError(
            f"tensor {name!r}: local shard {tuple(local.shape)} at mesh coordinate {tuple(coordinate)} is not "
            f"the {sizes} of DTensor's chunking of {tuple(value.shape)} by {tuple(value.placements)}; {_SUPPORTED}"
        )
    return ChunkSpec(tuple(value.shape), value.dtype, offsets, sizes), local


def chunk_specs(flat: FlatState, rank: int) -> dict[str, tuple[ChunkSpec, torch.Tensor]]:
    """Every DTensor's piece on this rank (replicas included, empty ones left out), with its local tensor.

    Copies no tensor data; changes nothing.

    Raises:
        UnsupportedStateError: a placement or mesh gpuguard cannot checkpoint, naming the tensor.
        ConfigError: ``rank`` is not this process's rank in the default process group.
    """
    names = [name for name, t in flat.tensors.items() if is_dtensor(t)]
    if not names:
        return {}
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != rank:
        raise ConfigError("rank", rank, f"must be this process's rank in the process group, {dist.get_rank()}")
    specs = {}
    for name in names:
        found = _spec(name, flat.tensors[name])
        if found is not None and found[1].numel():
            specs[name] = found
    return specs


def localize(
    flat: FlatState, specs: Mapping[str, tuple[ChunkSpec, torch.Tensor]], writes: Collection[str]
) -> dict[str, ChunkSpec]:
    """Replace each DTensor in ``flat`` by its local piece when this rank writes it, else drop it.

    Returns the chunks this rank writes, by tensor name.
    """
    for name in [name for name, t in flat.tensors.items() if is_dtensor(t)]:
        del flat.tensors[name]
    written = {}
    for name in writes:
        spec, local = specs[name]
        flat.tensors[name] = local
        written[name] = spec
    return written


def held(specs: Mapping[str, tuple[ChunkSpec, torch.Tensor]]) -> list[list[Any]]:
    """What this rank reports to the others: [name, offsets, sizes, bytes] of every piece it holds (JSON)."""
    return [[name, list(spec.offsets), list(spec.sizes), spec.nbytes] for name, (spec, _) in sorted(specs.items())]


def fingerprint(report: list[list[Any]]) -> int:
    return crc32c(json.dumps(report, separators=(",", ":")).encode())


def assign_writers(reports: Sequence[Sequence[Sequence[Any]]]) -> list[set[str]]:
    """Who writes what: each distinct chunk (name, offsets, sizes) once, by the least loaded rank holding it.

    ``reports`` holds every rank's `held` list, in rank order; every rank computes the same answer from
    the same reports. The largest chunks are placed first, so replicas share the bytes about evenly.
    """
    holders: dict[tuple[str, tuple[int, ...], tuple[int, ...]], list[int]] = {}
    sizes: dict[tuple[str, tuple[int, ...], tuple[int, ...]], int] = {}
    for rank, report in enumerate(reports):
        for name, offsets, chunk_sizes, nbytes in report:
            key = (str(name), tuple(offsets), tuple(chunk_sizes))
            holders.setdefault(key, []).append(rank)
            sizes[key] = int(nbytes)
    load = [0] * len(reports)
    writes: list[set[str]] = [set() for _ in reports]
    for key in sorted(holders, key=lambda k: (-sizes[k], k)):
        writer = min(holders[key], key=lambda r: (load[r], r))
        load[writer] += sizes[key]
        writes[writer].add(key[0])
    return writes


def block_checksums(
    layout: ShardLayout, data: memoryview, readiness: Readiness, names: Sequence[str], block_bytes: int
) -> dict[str, list[int]]:
    """CRC-32C per block of each chunk's bytes (`block_size`, at most ``block_bytes``), as the snapshot fills
    the buffer."""
    out: dict[str, list[int]] = {}
    wanted = set(names)
    for slot in layout.slots:
        if slot.name not in wanted:
            continue
        readiness.wait(slot.end)
        size = block_size(slot.nbytes, block_bytes)
        out[slot.name] = [
            crc32c(data[start : min(slot.end, start + size)]) for start in range(slot.start, slot.end, size)
        ]
    return out


def chunk_records(
    layout: ShardLayout, specs: Mapping[str, ChunkSpec], blocks: Mapping[str, list[int]], block_bytes: int
) -> dict[str, dict[str, Any]]:
    """The manifest's description of this rank's chunks (JSON: no pickling on the way back)."""
    header = len(layout.header)
    slots = {slot.name: slot for slot in layout.slots}
    return {
        name: {
            "global_shape": list(spec.global_shape),
            "dtype": DTYPE_CODES[spec.dtype],
            "offsets": list(spec.offsets),
            "sizes": list(spec.sizes),
            "file_offset": header + slots[name].start,
            "block_bytes": block_size(slots[name].nbytes, block_bytes),
            "blocks": [f"{crc:08x}" for crc in blocks[name]],
        }
        for name, spec in specs.items()
    }


@dataclass(frozen=True)
class SavedChunk:
    """A chunk as the manifest describes it, checked for consistency when parsed."""

    file: str
    name: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file_offset: int
    block_bytes: int
    blocks: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for size in self.sizes:
            n *= size
        return n

    @classmethod
    def parse(cls, file: str, name: str, data: Mapping[str, Any]) -> SavedChunk:
        where = f"{file}: chunk of {name!r}"
        try:
            chunk = cls(
                file=file,
                name=name,
                global_shape=tuple(int(d) for d in data["global_shape"]),
                dtype=DTYPES_BY_CODE[data["dtype"]],
                offsets=tuple(int(d) for d in data["offsets"]),
                sizes=tuple(int(d) for d in data["sizes"]),
                file_offset=int(data["file_offset"]),
                block_bytes=int(data["block_bytes"]),
                blocks=tuple(int(c, 16) for c in data["blocks"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointCorruptError(f"{where} is malformed ({exc})", shard=file, tensor=name) from None
        ndim = len(chunk.global_shape)
        fits = len(chunk.offsets) == ndim == len(chunk.sizes) and all(
            o >= 0 and s >= 0 and o + s <= g
            for o, s, g in zip(chunk.offsets, chunk.sizes, chunk.global_shape, strict=True)
        )
        if not fits or chunk.block_bytes < 1 or len(chunk.blocks) != -(-chunk.nbytes // chunk.block_bytes):
            raise CheckpointCorruptError(f"{where} does not fit its tensor", shard=file, tensor=name)
        return chunk


def tiling_problems(records: Sequence[Any]) -> list[CheckpointCorruptError]:
    """Every sharded tensor whose chunks do not tile its global shape exactly (overlap, gap, disagreement).

    ``records`` are the manifest's shard records (``.file``, ``.chunks``). A checkpoint with a problem
    here cannot be loaded, whatever its checksums say: commits refuse it and ``verify`` reports it.
    """
    by_name: dict[str, list[SavedChunk]] = {}
    problems: list[CheckpointCorruptError] = []
    for record in records:
        for name, data in record.chunks.items():
            try:
                by_name.setdefault(name, []).append(SavedChunk.parse(record.file, name, data))
            except CheckpointCorruptError as exc:
                problems.append(exc)
    for name, chunks in sorted(by_name.items()):
        first = chunks[0]
        if any(c.global_shape != first.global_shape or c.dtype != first.dtype for c in chunks):
            seen = sorted({(c.global_shape, str(c.dtype)) for c in chunks})
            problems.append(
                CheckpointCorruptError(f"tensor {name!r}: its chunks disagree on shape or dtype: {seen}", tensor=name)
            )
            continue
        total = 1
        for d in first.global_shape:
            total *= d
        boxes = sorted((c for c in chunks if all(c.sizes)), key=lambda c: c.offsets)
        overlap = _first_overlap(boxes)
        if overlap is not None:
            a, b = overlap
            problems.append(
                CheckpointCorruptError(
                    f"tensor {name!r}: chunk {_box(a)} in {a.file} and chunk {_box(b)} in {b.file} overlap: the "
                    "checkpoint holds some elements twice and cannot be loaded",
                    shard=b.file,
                    tensor=name,
                )
            )
            continue
        covered = sum(_volume(c.sizes) for c in boxes)
        if covered != total:
            problems.append(
                CheckpointCorruptError(
                    f"tensor {name!r}: its chunks cover {covered} of its {total} elements "
                    f"(global shape {first.global_shape}): the checkpoint cannot be loaded",
                    tensor=name,
                )
            )
    return problems


def _volume(sizes: Sequence[int]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _box(chunk: SavedChunk) -> str:
    return "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(chunk.offsets, chunk.sizes, strict=True)) + "]"


def _first_overlap(boxes: Sequence[SavedChunk]) -> tuple[SavedChunk, SavedChunk] | None:
    """Two boxes that share an element; ``boxes`` sorted by offsets (a sweep along the first dim)."""
    if not boxes or not boxes[0].sizes:
        return (boxes[0], boxes[1]) if len(boxes) > 1 else None  # 0-d: any two chunks overlap
    for i, a in enumerate(boxes):
        end = a.offsets[0] + a.sizes[0]
        for b in boxes[i + 1 :]:
            if b.offsets[0] >= end:
                break
            if all(
                bo < ao + asz and ao < bo + bsz
                for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
            ):
                return a, b
    return None
