"""Reading a shard's tensors at the read floor: straight into the memory they end up in, verified on the way.

A shard's header says where each tensor's bytes lie; the manifest holds each tensor's CRC-32C. A read
groups the tensors into tasks of at most `PART_BYTES` (runs of small tensors that follow one another
in the file, or parts of a big one), reads them on the I/O threads (``preadv`` into each destination on
local disks, one ranged read per task elsewhere) and checksums each piece while it is still in the
CPU's cache, so verifying costs little beyond the read. Nothing is viewed at the file's own
offsets: every destination is memory gpuguard or the live state allocated, aligned for its dtype
(format 1 files, whose tensors could lie 8 bytes off a complex128's alignment, load too).

Destinations are chosen by the caller (`_loading`): memory that is already touched (the live tensors'
own memory once everything verified, or the staging pool's buffer), memory the restored state keeps
(a fresh optimizer's state), nothing (a pass that only verifies), or a GPU tensor, filled through two
pinned buffers per I/O thread so that the copy to the device overlaps the next read.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch

from gpuguard.checkpoint import _layout
from gpuguard.checkpoint._crc import crc32c, crc32c_combine
from gpuguard.checkpoint._manifest import ShardRecord
from gpuguard.checkpoint._storage import Storage
from gpuguard.errors import CheckpointCorruptError

log = logging.getLogger("gpuguard.checkpoint")

PART_BYTES: Final = 32 << 20  # one read task at most: small tensors share one, a big one is split between several
ALIGNMENT: Final = 64  # of every tensor gpuguard allocates for a load (a cache line; 16 is what complex128 needs)
SLOT_BYTES: Final = 8 << 20  # each pinned buffer on the way to a GPU
_MADV_HUGEPAGE: Final = 14  # linux/mman.h


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a shard: where its bytes lie in the file, and the checksum the manifest holds."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int
    crc: int

    def meta(self) -> torch.Tensor:
        """A tensor of this shape and dtype without data (for the checks before a load)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


@dataclass
class Target:
    """Where one tensor's bytes go: host memory, a GPU tensor (through pinned memory), or nowhere (verify)."""

    stored: StoredTensor
    host: memoryview | None = None
    device: torch.Tensor | None = None


def describe(storage: Storage, checkpoint: str, record: ShardRecord) -> list[StoredTensor]:
    """The tensors of a shard, from its header alone, checked against the manifest.

    Reads the header only. The file's size must be the manifest's, the tensors must tile its byte
    section, and the header must be the one committed: the file's CRC-32C, combined from the header's
    and the manifest's per-tensor checksums, must match (a tensor's own bytes are checked when read).

    Raises:
        CheckpointCorruptError: naming the shard (and the tensor, when one entry is at fault).
    """
    where = f"{checkpoint}/{record.file}"
    path = storage.path(checkpoint, record.file)
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{where}: missing", shard=record.file) from None
    if size != record.bytes:
        raise CheckpointCorruptError(f"{where}: {size} bytes, the manifest says {record.bytes}", shard=record.file)
    if not 8 <= record.header_bytes <= record.bytes:
        raise CheckpointCorruptError(
            f"{where}: a header of {record.header_bytes} bytes does not fit", shard=record.file
        )
    head = bytearray(record.header_bytes)
    try:
        got, header_crc = storage.read_range(path, 0, record.header_bytes, memoryview(head))
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{where}: missing", shard=record.file) from None
    base, header = _layout.parse_header(memoryview(head)[:got], where=where)
    if base != record.header_bytes:
        raise CheckpointCorruptError(
            f"{where}: the header is {base} bytes, the manifest says {record.header_bytes}", shard=record.file
        )
    stored = [_entry(header, name, crc, base, size, where, record.file) for name, crc in record.tensors.items()]
    whole, at = header_crc, base
    for tensor in sorted(stored, key=lambda t: t.offset):
        if tensor.offset != at:
            raise CheckpointCorruptError(
                f"{where}: tensor {tensor.name!r} overlaps another or leaves a gap",
                shard=record.file,
                tensor=tensor.name,
            )
        whole = crc32c_combine(whole, tensor.crc, tensor.nbytes)
        at += tensor.nbytes
    if at != size or whole != record.crc32c:
        raise CheckpointCorruptError(
            f"{where}: the file fails its checksum (crc32c {whole:08x}, expected {record.crc32c:08x}): the header "
            "was changed",
            shard=record.file,
        )
    return stored


def _entry(header: dict[str, Any], name: str, crc: int, base: int, size: int, where: str, file: str) -> StoredTensor:
    entry = header.get(name)
    if not isinstance(entry, dict):
        raise CheckpointCorruptError(f"{where}: tensor {name!r} is missing", shard=file, tensor=name)
    try:
        dtype = _layout.DTYPES_BY_CODE[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        start, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointCorruptError(
            f"{where}: tensor {name!r} has a malformed entry", shard=file, tensor=name
        ) from None
    numel = 1
    for d in shape:
        numel *= d
    if min(shape, default=0) < 0 or end - start != dtype.itemsize * numel or start < 0 or base + end > size:
        raise CheckpointCorruptError(f"{where}: tensor {name!r} lies outside the file", shard=file, tensor=name)
    return StoredTensor(name, dtype, shape, base + start, end - start, crc)


def read(
    storage: Storage,
    checkpoint: str,
    file: str,
    targets: Sequence[Target],
    problems: list[CheckpointCorruptError] | None = None,
) -> int:
    """Read every target's bytes of ``file`` on the I/O threads, checking each tensor's CRC-32C.

    Raises at the first tensor that fails, or, given ``problems``, collects them all and goes on.
    Returns the bytes read.

    Raises:
        CheckpointCorruptError: a tensor fails its checksum, or the file is missing or shorter.
        StorageError: the storage failed (a read that timed out may still be writing into its target:
            the caller must not reuse that memory).
    """
    path = storage.path(checkpoint, file)
    where = f"{checkpoint}/{file}"
    batches = [(batch, storage.submit(_read_batch, storage, path, batch)) for batch in _batches(targets)]
    failure: BaseException | None = None
    crcs: dict[str, int] = {}
    for batch, future in batches:  # every batch ends before this returns: none writes later
        try:
            results = future.result()
        except FileNotFoundError:
            failure = failure or CheckpointCorruptError(f"{where}: missing", shard=file)
            continue
        except BaseException as exc:
            failure = failure or exc
            continue
        if failure is not None:
            continue  # waiting for the other batches only
        for (target, start, end), (got, crc) in zip(batch, results, strict=True):
            name = target.stored.name
            if got != end - start:
                failure = CheckpointCorruptError(
                    f"{where}: short read of tensor {name!r} ({got} of {end - start} bytes)", shard=file, tensor=name
                )
                break
            crcs[name] = crc if start == target.stored.offset else crc32c_combine(crcs[name], crc, end - start)
    if isinstance(failure, CheckpointCorruptError) and problems is not None:
        problems.append(failure)
        return 0
    if failure is not None:
        raise failure
    for target in targets:
        t = target.stored
        got = crcs.get(t.name, crc32c(b""))
        if got != t.crc:
            error = CheckpointCorruptError(
                f"{where}: tensor {t.name!r} fails its checksum (crc32c {got:08x}, expected {t.crc:08x})",
                shard=file,
                tensor=t.name,
            )
            if problems is None:
                raise error
            problems.append(error)
    return sum(t.stored.nbytes for t in targets)


Segment = tuple[Target, int, int]  # a target and the file range [start, end) of its bytes to read


def _batches(targets: Sequence[Target]) -> list[list[Segment]]:
    """Read tasks: runs of tensors that follow one another in the file, up to `PART_BYTES` each (one
    storage call, one GET on object stores); a bigger tensor is split into parts read in parallel."""
    batches: list[list[Segment]] = []
    size = 0
    for target in sorted(targets, key=lambda t: t.stored.offset):
        t = target.stored
        for start in range(t.offset, t.offset + t.nbytes, PART_BYTES):
            end = min(t.offset + t.nbytes, start + PART_BYTES)
            last = batches[-1][-1] if batches else None
            follows = last is not None and last[2] == start and last[0].device is None and target.device is None
            if follows and size + end - start <= PART_BYTES:
                batches[-1].append((target, start, end))
                size += end - start
            else:
                batches.append([(target, start, end)])
                size = end - start
    return batches


def _read_batch(storage: Storage, path: str, batch: list[Segment]) -> list[tuple[int, int]]:
    if batch[0][0].device is not None:  # alone in its batch (see `_batches`)
        target, start, end = batch[0]
        return [_read_to_device(storage, path, target, start, end)]
    segments = []
    for target, start, end in batch:
        into = None
        if target.host is not None:
            into = target.host[start - target.stored.offset : end - target.stored.offset]
        segments.append((start, end, into))
    return storage.read_segments(path, segments)


class _Slots(threading.local):
    """Per I/O thread: two pinned buffers and a stream per device, allocated on first use."""

    def __init__(self) -> None:
        self.pinned: list[tuple[torch.Tensor, memoryview]] = []
        self.events: list[Any] = []
        self.streams: dict[torch.device, Any] = {}


_slots = _Slots()


def _read_to_device(storage: Storage, path: str, target: Target, start: int, end: int) -> tuple[int, int]:
    """Read [start, end) through this thread's pinned buffers into ``target.device``: while one buffer is
    copied to the GPU on a side stream, the next piece is read into the other."""
    assert target.device is not None
    device = target.device.device
    if not _slots.pinned:
        for _ in range(2):
            pinned = torch.empty(SLOT_BYTES, dtype=torch.uint8, pin_memory=True)
            _slots.pinned.append((pinned, host_view(pinned)))
            _slots.events.append(None)
    stream = _slots.streams.get(device)
    if stream is None:
        stream = _slots.streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
    dest = target.device.reshape(-1).view(torch.uint8)
    crc, at, piece = 0, start, 0
    while at < end:
        n = min(SLOT_BYTES, end - at)
        pinned, view = _slots.pinned[piece % 2]
        event = _slots.events[piece % 2]
        if event is not None:
            event.synchronize()  # the copy that last used this buffer is done
        got, crc = storage.read_range(path, at, at + n, view[:n], crc)
        if got < n:
            stream.synchronize()
            return at - start + got, crc
        lo = at - target.stored.offset
        with torch.cuda.stream(stream):
            dest[lo : lo + n].copy_(pinned[:n], non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        _slots.events[piece % 2] = event
        at += n
        piece += 1
    stream.synchronize()
    return end - start, crc


def host_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, writable, without a copy (the tensor must outlive the view)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    raw = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    return memoryview(raw).cast("B")


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def fresh_host_bytes(nbytes: int) -> torch.Tensor:
    """Host memory that a read fills (aligned to `ALIGNMENT`): its pages are faulted in by the I/O
    threads, in parallel, and on Linux the kernel is asked for transparent huge pages (512 times fewer
    faults; advice, never required)."""
    block = torch.empty(aligned(nbytes) + ALIGNMENT, dtype=torch.uint8)
    shift = -block.data_ptr() % ALIGNMENT
    block = block[shift : shift + aligned(nbytes)]
    _advise_huge_pages(block.data_ptr(), nbytes)
    return block


def fresh_tensor(stored: StoredTensor) -> torch.Tensor:
    """A host tensor of its own for ``stored`` (the restored state keeps it: no storage shared with others)."""
    tensor = torch.empty(stored.shape, dtype=stored.dtype)
    _advise_huge_pages(tensor.data_ptr(), stored.nbytes)
    return tensor


def _advise_huge_pages(address: int, nbytes: int) -> None:
    if nbytes < 4 << 20 or _libc is None:
        return
    start = address - address % 4096
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), _MADV_HUGEPAGE)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "madvise") else None
    except OSError:  # not a platform with a C library to load: pages fault in the usual way
        return None


_libc = _load_libc()


def tensor_at(block: torch.Tensor, offset: int, stored: StoredTensor) -> torch.Tensor:
    """A tensor of ``stored``'s dtype and shape over ``block[offset:]`` (``offset`` aligned)."""
    if stored.nbytes == 0:
        return torch.empty(stored.shape, dtype=stored.dtype, device=block.device)
    return block[offset : offset + stored.nbytes].view(stored.dtype).reshape(stored.shape)
