"""Staging buffers: where a snapshot lands so training can go on while the bytes are written.

A buffer is one flat byte tensor laid out exactly as a shard's safetensors byte section, allocated
ahead of need (pinning 6 GiB cost 3.2 s on an H200; copying into it took 0.117 s) and reused while
the state's layout stays the same. The pool holds up to ``max_buffers`` of them, so an emergency save
can start while a periodic one is still being written.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from gpuguard.checkpoint._layout import ShardLayout
from gpuguard.errors import CheckpointError

log = logging.getLogger("gpuguard.checkpoint")

# Threads for a snapshot from host memory. One thread's memcpy nearly saturates a socket's bandwidth;
# a second adds a little where a core is free. More would only take cores from the training job.
HOST_COPY_THREADS = max(1, min(2, os.cpu_count() or 1))


def host_copy(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    threads: int = HOST_COPY_THREADS,
    min_split_bytes: int = 64 * 2**20,
) -> None:
    """Copy ``src`` into ``dst`` for each ``(dst, src)`` pair of host tensors, fast and predictably.

    ``Tensor.copy_`` starts an OpenMP parallel region per tensor, and each region waits for its
    slowest thread: with a few hundred tensors on cores that other processes also use, that waiting
    made the copy 5x slower than one bulk copy of the same bytes (1 GiB, 342 tensors, 2 busy cores:
    2.5 s against 0.5 s). Plain memory moves of the raw bytes, split evenly over ``threads`` threads
    with one join at the end, have no per-tensor barrier (0.35 s on the same machine). Pairs that
    are not plain contiguous bytes of one dtype go through ``copy_``.
    """
    runs: list[tuple[int, int, int]] = []  # (dst address, src address, bytes)
    for dst, src in pairs:
        if not src.numel():
            continue
        if (
            src.device.type != "cpu"
            or dst.device.type != "cpu"
            or src.dtype != dst.dtype
            or src.shape != dst.shape
            or not src.is_contiguous()
            or not dst.is_contiguous()
            or src.is_conj()  # lazily conjugated or negated: the bytes are not the values
            or src.is_neg()
        ):
            dst.copy_(src)
            continue
        runs.append((dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size()))
    total = sum(n for _, _, n in runs)
    if not runs:
        return
    if threads <= 1 or total < min_split_bytes:  # a thread costs more than it saves on small states
        for d, s, n in runs:
            ctypes.memmove(d, s, n)  # a foreign call: releases the GIL while it copies
        return
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(threads)]
    per_share = -(-total // threads)
    share, room = 0, per_share
    for dst_at, src_at, nbytes in runs:
        done = 0
        while done < nbytes:
            take = min(nbytes - done, room)
            shares[share].append((dst_at + done, src_at + done, take))
            done, room = done + take, room - take
            if not room and share < threads - 1:
                share, room = share + 1, per_share
    errors: list[BaseException] = []

    def move(share_runs: list[tuple[int, int, int]]) -> None:
        try:
            for d, s, n in share_runs:
                ctypes.memmove(d, s, n)
        except BaseException as exc:  # pragma: no cover - memmove of valid ranges does not raise
            errors.append(exc)

    helpers = [
        threading.Thread(target=move, args=(runs_,), name="gpuguard-ckpt-copy", daemon=True) for runs_ in shares[1:]
    ]
    for helper in helpers:
        helper.start()
    move(shares[0])
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]


class Readiness:
    """How far a snapshot has reached in its buffer: writers start on the first bytes while the rest
    are still being copied, so time to durable is about max(copy, write) rather than their sum."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._ready = 0
        self._failed: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, upto: int) -> None:
        with self._cond:
            self._ready = max(self._ready, upto)
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._failed = exc
            self._cond.notify_all()

    def wait(self, upto: int) -> None:
        """Block until bytes [0, upto) hold the snapshot; raises if the snapshot failed."""
        with self._cond:
            while self._ready < upto and self._failed is None:
                self._cond.wait()
            if isinstance(self._failed, CheckpointError):  # a refusal with its reason (e.g. a torn overlap)
                raise CheckpointError(str(self._failed)) from self._failed
            if self._failed is not None:
                raise RuntimeError("the snapshot failed") from self._failed


class StagingBuffer:
    """Host memory for one snapshot of one layout (pinned when the state lives on a GPU)."""

    def __init__(self, layout: ShardLayout, *, pin: bool) -> None:
        started = time.perf_counter()
        self.layout = layout
        self.pinned = pin
        # zero_() touches every page now: an untouched buffer would fault its pages in during the
        # first snapshot, on the training thread's time.
        self.data = torch.empty(layout.data_bytes, dtype=torch.uint8, pin_memory=pin).zero_()
        self.views: dict[str, torch.Tensor] = {}
        for slot in layout.slots:
            region = self.data[slot.start : slot.end]
            self.views[slot.name] = region.view(slot.dtype).reshape(slot.shape) if slot.nbytes else region
        self.alloc_s = time.perf_counter() - started
        # Who uses it: the save writing it, and another save copying its snapshot (`StagingPool.hold`).
        # Free again for the next snapshot only when both are done.
        self.users = 0

    @property
    def in_use(self) -> bool:
        return self.users > 0

    def snapshot(self, tensors: dict[str, torch.Tensor], readiness: Readiness | None = None) -> None:
        """Copy the live tensors in; returns when the copy is complete and training may go on.

        Copies go in buffer order, in batches of about ``batch_bytes``; ``readiness`` learns of each
        finished batch so that writing can start before the whole snapshot is in.
        """
        batches = self._batches()
        on_gpu = [t for t in tensors.values() if t.device.type == "cuda"]
        with torch.no_grad():
            if not on_gpu:
                # From host memory the copy runs at memory speed; writers running beside it would
                # take cores and bandwidth from it and lengthen the stall, so they start after it.
                host_copy([(self.views[name], tensors[name]) for names, _ in batches for name in names])
                if readiness:
                    readiness.advance(self.layout.data_bytes)
                return
            # Copies on a side stream, ordered after the work that produced the tensors; an event
            # per batch tells when each part of the buffer is filled.
            device = on_gpu[0].device
            stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            stream.wait_stream(torch.cuda.current_stream(device))
            events = []
            with torch.cuda.stream(stream):
                for names, end in batches:
                    for name in names:
                        self.views[name].copy_(tensors[name], non_blocking=self.pinned)
                    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    event.record(stream)
                    events.append((event, end))
            for event, end in events:
                event.synchronize()
                if readiness:
                    readiness.advance(end)

    def snapshot_deferred(self, tensors: dict[str, torch.Tensor], later: set[str]) -> Callable[[], None]:
        """Copy every tensor not in ``later`` now; return the function that completes the rest.

        For tensors on a GPU, the copies of ``later`` are issued now, asynchronously, on a side stream
        (ordered after the work already queued), and the returned function waits for them. On the
        host, the returned function does the copying. Run it on another thread: until it returns,
        ``later`` must not change (they are parameters and optimizer state: the caller holds back the
        next optimizer step).
        """
        now = {n: t for n, t in tensors.items() if n not in later}
        deferred = {n: t for n, t in tensors.items() if n in later}
        with torch.no_grad():
            on_host = [(self.views[n], t) for n, t in now.items() if t.device.type == "cpu"]
            host_copy(on_host)
            for name, tensor in now.items():
                if tensor.numel() and tensor.device.type != "cpu":
                    self.views[name].copy_(tensor)
        on_gpu = [t for t in deferred.values() if t.device.type == "cuda"]
        if not on_gpu:

            def copy_on_host() -> None:
                with torch.no_grad():
                    host_copy([(self.views[n], t) for n, t in deferred.items()])

            return copy_on_host
        device = on_gpu[0].device
        stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for name, tensor in deferred.items():
                if tensor.numel():
                    self.views[name].copy_(tensor, non_blocking=self.pinned)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return event.synchronize

    def _batches(self, batch_bytes: int = 64 * 2**20) -> list[tuple[list[str], int]]:
        batches: list[tuple[list[str], int]] = []
        names: list[str] = []
        start = 0
        for slot in self.layout.slots:  # in buffer order
            if slot.nbytes:
                names.append(slot.name)
            if slot.end - start >= batch_bytes:
                batches.append((names, slot.end))
                names, start = [], slot.end
        batches.append((names, self.layout.data_bytes))
        return batches

    def memoryview(self) -> memoryview:
        """The buffer's bytes, without a copy, for writers and checksums."""
        n = self.layout.data_bytes
        if n == 0:
            return memoryview(b"")
        raw = (ctypes.c_char * n).from_address(self.data.data_ptr())
        return memoryview(raw).cast("B")


class StagingPool:
    """Hands out staging buffers for a layout, allocating at most ``max_buffers``."""

    def __init__(self, max_buffers: int = 2) -> None:
        self.max_buffers = max_buffers
        self._buffers: list[StagingBuffer] = []
        self._cond = threading.Condition()
        # Layouts whose buffer a background `prepare` is about to allocate (`expect`): a save that comes
        # first waits for that allocation instead of making a second one on the training thread.
        self._expected: dict[tuple[object, ...], int] = {}

    def expect(self, layout: ShardLayout) -> None:
        """Say, before starting the thread that will call `prepare` for ``layout``, that it is coming."""
        with self._cond:
            self._expected[layout.signature] = self._expected.get(layout.signature, 0) + 1

    def unexpect(self, layout: ShardLayout) -> None:
        """End one `expect` (its `prepare` ran, or will not): the saves waiting for it look again."""
        with self._cond:
            left = self._expected.get(layout.signature, 0) - 1
            if left > 0:
                self._expected[layout.signature] = left
            else:
                self._expected.pop(layout.signature, None)
            self._cond.notify_all()

    def prepare(self, layout: ShardLayout, *, pin: bool, expected: bool = False) -> StagingBuffer:
        """Make sure one buffer for ``layout`` exists (allocating it now, not in an emergency).

        ``expected``: this call was announced by `expect` (it ends the announcement, whatever happens).
        """
        try:
            with self._cond:
                self._drop_other_layouts(layout)
                for buffer in self._buffers:
                    if buffer.layout.signature == layout.signature:
                        return buffer
                buffer = StagingBuffer(layout, pin=pin)
                self._buffers.append(buffer)
        finally:
            if expected:
                self.unexpect(layout)
        log.info(
            "staging buffer of %.1f MiB allocated in %.3f s (pinned=%s)", layout.data_bytes / 2**20, buffer.alloc_s, pin
        )
        return buffer

    def acquire(
        self, layout: ShardLayout, *, pin: bool, timeout_s: float | None = None, training: bool = True
    ) -> StagingBuffer:
        """A free buffer for ``layout``; waits for one to be released when all are busy.

        ``training``: whether a training loop waits on this save (False for the survivors of a lost peer,
        whose training has stopped: a buffer allocated here stalls nothing, and is not warned about).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._drop_other_layouts(layout)
                for buffer in self._buffers:
                    if not buffer.in_use and buffer.layout.signature == layout.signature:
                        buffer.users = 1
                        return buffer
                left = None if deadline is None else deadline - time.monotonic()
                coming = layout.signature in self._expected and (left is None or left > 0)
                if coming and not any(b.layout.signature == layout.signature for b in self._buffers):
                    # The buffer prepared in the background is on its way: the rest of that allocation is
                    # never longer than a whole one made here.
                    self._cond.wait(left)
                    continue
                if len(self._buffers) < self.max_buffers:
                    log.log(
                        logging.WARNING if training else logging.DEBUG,
                        "no staging buffer was prepared for this state: allocating one now, which stalls training",
                    )
                    buffer = StagingBuffer(layout, pin=pin)
                    buffer.users = 1
                    self._buffers.append(buffer)
                    return buffer
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("every staging buffer is still being written")
                self._cond.wait(left)

    def lend(self, nbytes: int) -> StagingBuffer | None:
        """A free host buffer of at least ``nbytes``, whatever its layout, or None; `release` it after.

        A load reads into it: its pages were touched when it was prepared, so the read runs at the
        speed of memory already mapped, not of fresh pages faulted in one by one.
        """
        with self._cond:
            for buffer in sorted(self._buffers, key=lambda b: b.layout.data_bytes):
                if not buffer.in_use and buffer.layout.data_bytes >= nbytes:
                    buffer.users = 1
                    return buffer
        return None

    def discard(self, buffer: StagingBuffer) -> None:
        """Forget a buffer that must not be reused (a read that timed out may still write into it)."""
        with self._cond:
            self._buffers = [b for b in self._buffers if b is not buffer]
            self._cond.notify_all()

    def hold(self, buffer: StagingBuffer) -> None:
        """One more user of a buffer in use: it is free again only after one more `release`."""
        with self._cond:
            if not buffer.in_use:
                raise CheckpointError("a staging buffer not in use cannot be held: its snapshot may be overwritten")
            buffer.users += 1

    def release(self, buffer: StagingBuffer) -> None:
        with self._cond:
            buffer.users = max(0, buffer.users - 1)
            self._cond.notify_all()

    def _drop_other_layouts(self, layout: ShardLayout) -> None:
        # The state changed shape (a new parameter group, say): buffers for the old layout are dead weight.
        self._buffers = [b for b in self._buffers if b.in_use or b.layout.signature == layout.signature]


class LentSnapshot:
    """A save's finished snapshot, lent to a save into another store, which copies it from there instead of
    reading the live state a second time (the local tier's snapshot feeding object storage's, `Saver.save_flat`).

    Holds the lender's buffer (`StagingPool.hold`) until `release`, so that the lender's next snapshot cannot
    overwrite it while the borrower copies it out. Released once, by whichever calls first.
    """

    def __init__(self, pool: StagingPool, buffer: StagingBuffer, readiness: Readiness) -> None:
        pool.hold(buffer)
        self._pool = pool
        self._buffer = buffer
        self._readiness = readiness
        self._lock = threading.Lock()
        self._released = False

    def views_for(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """This snapshot's copy of each of ``tensors`` (by name, empty ones left out), or None when one of
        them is not in it with the same dtype and shape."""
        views = self._buffer.views
        out = {}
        for name, tensor in tensors.items():
            view = views.get(name)
            if view is None:
                return None
            if not tensor.numel():  # nothing to copy (an empty slot's view is a bare byte region)
                continue
            if view.dtype != tensor.dtype or view.shape != tensor.shape:
                return None
            out[name] = view
        return out

    def wait(self) -> None:
        """Until the snapshot is complete, its overlapped copies included; raises its failure (a torn overlap)."""
        self._readiness.wait(self._readiness.total)

    def copy_into(self, buffer: StagingBuffer, views: Mapping[str, torch.Tensor], readiness: Readiness) -> None:
        """On a thread, once this snapshot is complete: copy ``views`` (from `views_for`) into ``buffer``'s
        slots of the same names, tell ``readiness`` (done, or why not), then `release`. Reads no live tensor."""

        def run() -> None:
            try:
                self.wait()
                with torch.no_grad():
                    host_copy([(buffer.views[name], view) for name, view in views.items()])
                readiness.advance(readiness.total)
            except BaseException as exc:
                readiness.fail(exc)
            finally:
                self.release()

        threading.Thread(target=run, name="gpuguard-ckpt-tier-copy", daemon=True).start()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._pool.release(self._buffer)
