"""DTensor-valued state at save time: each rank writes its own piece of each sharded tensor, once.

A DTensor (FSDP2's parameters and optimizer state, tensor-parallel weights, any DTensor in ``state``)
is replaced in the flattened state by its local shard. The manifest records, per written chunk, the
tensor's global shape and dtype, the chunk's offsets and sizes in the global tensor, where its bytes
start in the rank's file, and a CRC-32C per fixed-size block of those bytes, so a loader that reads
only part of a chunk (a rank resumed with another sharding) can still verify every byte it reads.

Supported: meshes of 1 or 2 dimensions whose placements are ``Shard(d)`` (any dim, uneven sizes,
several mesh dims on one tensor dim) or ``Replicate()``. Replicas of one chunk (the ranks that differ
only in a ``Replicate`` mesh dim) are written by the replica at coordinate 0 of those dims. Anything
else (``Partial``, strided shards from FSDP2+TP flattening, 3-D meshes) is refused at save and at
``prepare`` with the tensor's path, rather than saved in a form no loader can place.

The chunk arithmetic mirrors DTensor's own ``Shard._split_tensor`` (torch.chunk semantics: chunks of
ceil(n / k), the last ones shorter or empty) applied mesh dim by mesh dim, as in
``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``; `localize` checks the
result against each DTensor's actual local shape, so a torch that shards differently fails loudly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch

from gpuguard.checkpoint._crc import crc32c
from gpuguard.checkpoint._layout import DTYPE_CODES, DTYPES_BY_CODE, ShardLayout
from gpuguard.checkpoint._staging import Readiness
from gpuguard.checkpoint._tree import FlatState
from gpuguard.errors import CheckpointCorruptError, ConfigError, UnsupportedStateError

BLOCK_BYTES: Final = 256 << 10  # checksum granularity of chunk bytes: a partial read costs at most this extra
_SUPPORTED: Final = "supported: 1-D or 2-D device meshes with Shard(dim) or Replicate() placements"

try:  # torch built without distributed has no DTensor; then no state can hold one
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - every torch wheel gpuguard supports ships it
    DTensor = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class ChunkSpec:
    """The piece of a global tensor that one rank writes."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def is_dtensor(value: object) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def local_region(
    global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[Any]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the shard held at ``coordinate``; DTensor's chunking, mesh dim by mesh dim."""
    sizes = [int(d) for d in global_shape]
    offsets = [0] * len(sizes)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            dim = placement.dim % len(sizes)
            parts = int(mesh_shape[mesh_dim])
            full = -(-sizes[dim] // parts)  # ceil: torch.chunk's chunk size
            start = min(full * int(coordinate[mesh_dim]), sizes[dim])
            offsets[dim] += start
            sizes[dim] = min(full, sizes[dim] - start)
    return tuple(offsets), tuple(sizes)


def check_placements(name: str, value: Any) -> None:
    """Refuse what no loader could place; raises `UnsupportedStateError` naming the tensor."""
    mesh = value.device_mesh
    if mesh.ndim not in (1, 2):
        raise UnsupportedStateError(f"tensor {name!r}: a DTensor on a {mesh.ndim}-D device mesh; {_SUPPORTED}")
    for placement in value.placements:
        # type() is exact on purpose: _StridedShard subclasses Shard and lays chunks out differently.
        if type(placement) is not Shard and type(placement) is not Replicate:
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
            check_placements(name, tensor)


def holds_dtensors(flat: FlatState) -> bool:
    return any(is_dtensor(t) for t in flat.tensors.values())


def localize(flat: FlatState, rank: int) -> dict[str, ChunkSpec]:
    """Replace each DTensor in ``flat`` by the chunk this rank writes (or drop it: a replica or empty).

    Returns the chunks this rank writes, by tensor name. Copies no tensor data.

    ``rank`` is this process's rank, or (the survivors of a sudden loss writing a dead rank's files)
    another rank whose chunks this process holds too: the same coordinate on every ``Shard`` mesh dim,
    so the same local shards. Whether a chunk is written is then decided by ``rank``'s coordinate.

    Raises:
        UnsupportedStateError: a placement or mesh gpuguard cannot checkpoint, naming the tensor.
        ConfigError: ``rank`` is neither this process's rank nor a replica of its shards.
    """
    specs: dict[str, ChunkSpec] = {}
    names = [name for name, t in flat.tensors.items() if is_dtensor(t)]
    if not names:
        return specs
    import torch.distributed as dist

    me = dist.get_rank() if dist.is_initialized() else rank
    for name in names:
        value: Any = flat.tensors.pop(name)
        check_placements(name, value)
        mesh = value.device_mesh
        coordinate = mesh.get_coordinate()
        if rank != me:
            coordinate = _replica_coordinate(name, value, rank, coordinate)
        if coordinate is None:  # this rank is outside the tensor's mesh: it holds none of it
            continue
        offsets, sizes = local_region(tuple(value.shape), tuple(mesh.shape), coordinate, value.placements)
        local = value.to_local()
        if tuple(local.shape) != sizes:
            raise UnsupportedStateError(
                f"tensor {name!r}: local shard {tuple(local.shape)} at mesh coordinate {tuple(coordinate)} is not "
                f"the {sizes} of DTensor's even chunking of {tuple(value.shape)}; {_SUPPORTED}"
            )
        writes = all(c == 0 for c, p in zip(coordinate, value.placements, strict=True) if isinstance(p, Replicate))
        if writes and local.numel():
            flat.tensors[name] = local
            specs[name] = ChunkSpec(tuple(value.shape), value.dtype, offsets, sizes)
    return specs


def _replica_coordinate(name: str, value: Any, rank: int, mine: Sequence[int] | None) -> list[int] | None:
    """``rank``'s coordinate on ``value``'s mesh, checked to hold the same shards as this process's."""
    found = (value.device_mesh.mesh == rank).nonzero()
    theirs = None if found.numel() == 0 else [int(c) for c in found[0]]
    same = (theirs is None and mine is None) or (
        theirs is not None
        and mine is not None
        and all(t == m for t, m, p in zip(theirs, mine, value.placements, strict=True) if isinstance(p, Shard))
    )
    if not same:
        raise ConfigError(
            "rank",
            rank,
            f"must be this process's rank or hold the same shards of {name!r} (coordinate {theirs} vs {mine})",
        )
    return theirs


def block_checksums(
    layout: ShardLayout, data: memoryview, readiness: Readiness, names: Sequence[str], block_bytes: int
) -> dict[str, list[int]]:
    """CRC-32C per ``block_bytes`` of each chunk's bytes, as the snapshot fills the buffer."""
    out: dict[str, list[int]] = {}
    wanted = set(names)
    for slot in layout.slots:
        if slot.name not in wanted:
            continue
        readiness.wait(slot.end)
        out[slot.name] = [
            crc32c(data[start : min(slot.end, start + block_bytes)])
            for start in range(slot.start, slot.end, block_bytes)
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
            "block_bytes": block_bytes,
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
