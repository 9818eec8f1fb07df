"""The safetensors layout, written by hand so staged bytes stream straight to storage.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
offsets of every tensor), then the tensors' raw bytes back to back with no holes. gpuguard lays the
staging buffer out exactly as that byte section, so writing a shard is the header plus slices of the
buffer, with no serialisation step. Tensors are ordered by element size, largest first, and the header
is padded with spaces so that the byte section starts at a multiple of `DATA_ALIGNMENT` (64) bytes:
every tensor then starts at a multiple of its element size from a 64-byte boundary, which is what its
dtype's kernels need once the file is mapped or read into aligned memory (format 1 padded to 8 bytes:
a complex128 tensor could land 8 bytes off its 16-byte alignment). docs/FORMAT.md is the specification.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch

from gpuguard.errors import CheckpointCorruptError

DTYPE_CODES: Final[dict[torch.dtype, str]] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
# Codes from the safetensors format (safetensors/src/tensor.rs, enum Dtype), then gpuguard's own for the
# dtypes that format lacks (complex128, complex32, the float8 "fnuz" variants, packed float4): readers
# other than gpuguard refuse those shards by name instead of misreading them.
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("complex128", "GPUGUARD_C128"),
    ("complex32", "GPUGUARD_C32"),
    ("float8_e4m3fnuz", "GPUGUARD_F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "GPUGUARD_F8_E5M2FNUZ"),
    ("float4_e2m1fn_x2", "GPUGUARD_F4_E2M1FN_X2"),
):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
DTYPES_BY_CODE: Final[dict[str, torch.dtype]] = {code: dtype for dtype, code in DTYPE_CODES.items()}

MAX_HEADER_BYTES: Final = 100 * 1024 * 1024
# Where the byte section starts, from the start of the file: a cache line, and a multiple of every
# element size (16 at most, complex128).
DATA_ALIGNMENT: Final = 64


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in a shard's byte section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardLayout:
    """A shard's tensors and header; ``data_bytes`` is the size of the staging buffer it needs."""

    slots: tuple[TensorSlot, ...]
    header: bytes  # the 8-byte length and the padded JSON header

    @property
    def data_bytes(self) -> int:
        return self.slots[-1].end if self.slots else 0

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes

    @property
    def signature(self) -> tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]:
        return tuple((s.name, s.dtype, s.shape) for s in self.slots)


def plan(
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> ShardLayout:
    """Lay out tensors (name, dtype, shape) as one safetensors shard."""
    # Every save of one job plans the same layout: the cache keeps its cost (3 ms for 342 tensors, a
    # few percent of a 1 GiB stall on the training thread) to the first save. Layouts are immutable.
    return _plan(tuple((n, d, tuple(s)) for n, d, s in tensors), tuple(sorted((metadata or {}).items())))


@functools.lru_cache(maxsize=16)
def _plan(
    tensors: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...], metadata_items: tuple[tuple[str, str], ...]
) -> ShardLayout:
    metadata = dict(metadata_items)
    ordered = sorted(tensors, key=lambda t: (-_itemsize(t[1]), t[0]))
    slots, offset = [], 0
    for name, dtype, shape in ordered:
        nbytes = _itemsize(dtype) * _numel(shape)
        slots.append(TensorSlot(name, dtype, tuple(shape), offset, offset + nbytes))
        offset += nbytes
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    for slot in slots:
        header[slot.name] = {
            "dtype": DTYPE_CODES[slot.dtype],
            "shape": list(slot.shape),
            "data_offsets": [slot.start, slot.end],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGNMENT)  # the spec allows trailing spaces; they align the data
    return ShardLayout(tuple(slots), struct.pack("<Q", len(raw)) + raw)


def parse_header(data: bytes | memoryview, *, where: str) -> tuple[int, dict[str, Any]]:
    """Read a shard's header; returns (offset of the byte section, header dict).

    Raises:
        CheckpointCorruptError: when the header is truncated or not a safetensors header.
    """
    if len(data) < 8:
        raise CheckpointCorruptError(f"{where}: shorter than a safetensors header", shard=where)
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise CheckpointCorruptError(f"{where}: header length {length} does not fit the file", shard=where)
    try:
        header = json.loads(bytes(data[8 : 8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"{where}: header is not JSON ({exc})", shard=where) from None
    if not isinstance(header, dict):
        raise CheckpointCorruptError(f"{where}: header is not an object", shard=where)
    return 8 + length, header


def _itemsize(dtype: torch.dtype) -> int:
    return int(dtype.itemsize)  # no allocation: plan() runs on the training thread at every save


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
