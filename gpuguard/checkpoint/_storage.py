"""Storage over fsspec: retries, durable writes, and the one place storage errors are translated.

Shards are written by the fastest way each backend offers, chosen by protocol like fsspec's own
registry: ``file`` writes byte ranges with ``os.pwrite`` from several threads and fsyncs; ``s3``
uploads multipart parts concurrently; anything else streams through ``fs.open``. Small files that
must appear whole (manifests) go through `Storage.put_atomic`: a temporary file and ``rename`` on
local disks, a single PUT on object stores.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec

from gpuguard.checkpoint._retry import DeadlineExceeded, RetryPolicy, from_backend, is_transient, run_bounded
from gpuguard.errors import StorageError

log = logging.getLogger("gpuguard.checkpoint")
T = TypeVar("T")

Ready = Callable[[int], None]


def _always(upto: int) -> None:
    """For data that is complete before writing starts."""


class Storage:
    """A checkpoint root on any fsspec filesystem.

    Args:
        url: e.g. ``file:///ckpt``, ``s3://bucket/run1``, ``memory://run1``, or a plain path.
        storage_options: passed to the fsspec filesystem (credentials, endpoint, ...).
        retry: what to do about transient errors.
        io_threads: writer threads per shard.
    """

    part_bytes: int = 64 * 2**20

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        io_threads: int = 8,
    ) -> None:
        self.retry = retry or RetryPolicy()
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        options = self.retry.backend_options(protocol, storage_options or {})
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError, TypeError) as exc:
            raise StorageError(f"cannot open {url!r}: {exc}", path=url, operation="opening") from exc
        self.url = url
        self.root = root.rstrip("/")
        protocol = self.fs.protocol
        self.protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        if self.is_s3:
            self.fs.retries = 1  # s3fs's own retry loop (S3FileSystem.retries, 5 by default): ours owns the policy
        self.io_threads = io_threads
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="gpuguard-ckpt-io")

    @property
    def is_local(self) -> bool:
        return self.protocol in ("file", "local")

    @property
    def is_s3(self) -> bool:
        return self.protocol in ("s3", "s3a")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- the boundary ---------------------------------------------------------------------------

    def call(
        self,
        what: str,
        path: str,
        fn: Callable[[], T],
        *,
        nbytes: int = 0,
        missing_ok: bool = False,
        deadline_s: float | None = None,
    ) -> T:
        """Run one storage operation under its deadline, retrying transient errors, translating the last.

        Args:
            nbytes: the bytes it moves (they extend the deadline at ``min_bytes_per_s``).
            missing_ok: let ``FileNotFoundError`` through (the caller treats "absent" as an answer);
                otherwise it becomes a `StorageError` too.
            deadline_s: instead of the policy's.

        Raises:
            StorageError: naming the URL, the operation, the path and how long it tried, for what storage
                backends raise (`from_backend`); anything else (a bug) goes through untouched.
        """
        budget = deadline_s if deadline_s is not None else self.retry.deadline_for(nbytes)
        started = time.monotonic()
        delays = self.retry.delays()
        attempts = 0
        while True:
            attempts += 1
            remaining = budget - (time.monotonic() - started)
            try:
                if remaining <= 0:
                    raise DeadlineExceeded(budget)
                return run_bounded(fn, remaining, f"gpuguard-storage-{what.split(maxsplit=1)[0]}")
            except StorageError:
                raise
            except FileNotFoundError as exc:
                if missing_ok:
                    raise
                raise self._error(what, path, "does not exist", exc, started, attempts) from exc
            except DeadlineExceeded as exc:
                raise self._error(
                    what, path, f"no answer within the {budget:.1f}s deadline", exc, started, attempts, timed_out=True
                ) from None
            except Exception as exc:
                if not from_backend(exc):
                    raise  # a bug, not a storage failure: it keeps its type and its traceback
                transient = is_transient(exc)
                delay = next(delays, None) if transient else None
                remaining = budget - (time.monotonic() - started)
                if delay is not None and delay >= remaining:  # the next try would start past the deadline
                    why = f"no success within the {budget:.1f}s deadline: {exc}"
                    raise self._error(what, path, why, exc, started, attempts, timed_out=True) from exc
                if delay is None:
                    kind = "transient error, retries exhausted" if transient else "error"
                    raise self._error(
                        what, path, f"{kind}: {exc}", exc, started, attempts, transient=transient
                    ) from exc
                log.info("%s %s: transient error (%s); retrying in %.2fs", what, path, exc, delay)
                time.sleep(delay)

    def _error(
        self,
        what: str,
        path: str,
        why: str,
        exc: BaseException,
        started: float,
        attempts: int,
        *,
        transient: bool = False,
        timed_out: bool = False,
    ) -> StorageError:
        elapsed = time.monotonic() - started
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        return StorageError(
            f"{what} {path}: {why} (under {self.url}; tried for {elapsed:.1f}s, {tries})",
            path=path,
            transient=transient or timed_out,
            operation=what,
            elapsed_s=elapsed,
            timed_out=timed_out,
        )

    # -- reads ----------------------------------------------------------------------------------

    def read(self, path: str, nbytes: int = 0) -> bytearray:
        """A whole file into a writable buffer (tensors are viewed over it without another copy).

        ``nbytes``, the size expected, extends the deadline; ``FileNotFoundError`` when it is absent.
        """

        def read() -> bytearray:
            size = int(self.fs.size(path))
            buf = bytearray(size)
            with self.fs.open(path, "rb") as f:
                view, got = memoryview(buf), 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        raise OSError(errno.EIO, f"short read: {got} of {size} bytes")
                    got += n
            return buf

        return self.call("reading", path, read, nbytes=nbytes, missing_ok=True)

    def cat(self, path: str) -> bytes:
        """A small file's bytes; ``FileNotFoundError`` when it is absent."""
        return self.call("reading", path, lambda: bytes(self.fs.cat_file(path)), missing_ok=True)

    def exists(self, path: str) -> bool:
        return self.call("checking", path, lambda: bool(self.fs.exists(path)))

    def size(self, path: str) -> int:
        """``FileNotFoundError`` when it is absent."""
        return self.call("sizing", path, lambda: int(self.fs.size(path)), missing_ok=True)

    def list_files(self, folder: str) -> list[str]:
        """Names of the files directly in ``folder`` (a name under the root); none when it is absent."""
        where = self.path(folder)

        def ls() -> list[str]:
            try:
                entries = self.fs.ls(where, detail=True, refresh=True) if self.is_s3 else self.fs.ls(where, detail=True)
            except FileNotFoundError:
                return []
            return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")

        return self.call("listing", where, ls)

    def list_dirs(self) -> list[str]:
        """Names of the folders directly under the root; none when the root does not exist yet.

        Raises:
            StorageError: the bucket (or container) itself is missing, or listing is not allowed: a
                resume must never take that for "no checkpoint" and start from step 0.
        """

        def ls() -> list[str]:
            try:
                entries = (
                    self.fs.ls(self.root, detail=True, refresh=True)
                    if self.is_s3
                    else self.fs.ls(self.root, detail=True)
                )
            except FileNotFoundError:
                self._check_container()
                return []
            return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

        return self.call("listing", self.root, ls)

    def _check_container(self) -> None:
        """On object stores, an absent prefix is an empty run, but an absent bucket is a mistake."""
        if not self.is_s3 and self.protocol not in ("gs", "gcs", "abfs", "abfss", "az"):
            return  # no buckets: an absent root is simply empty
        container = self.root.split("/", 1)[0]
        if self.is_s3:
            # s3fs maps NoSuchBucket (404) to FileNotFoundError and AccessDenied to PermissionError.
            try:
                self.fs.call_s3("head_bucket", Bucket=container)
            except FileNotFoundError:
                raise StorageError(
                    f"listing {self.url}: the bucket {container!r} does not exist", path=container, operation="listing"
                ) from None
        elif not self.fs.exists(container):
            raise StorageError(
                f"listing {self.url}: the container {container!r} does not exist", path=container, operation="listing"
            )

    # -- writes ---------------------------------------------------------------------------------

    def makedirs(self, path: str) -> None:
        if self.is_local:
            self.call("creating", path, lambda: os.makedirs(path, exist_ok=True))

    def write_shard(self, path: str, header: bytes, data: memoryview, ready: Ready = _always) -> None:
        """Write header+data durably; returns when the bytes are on stable storage.

        ``ready(n)`` blocks until ``data[:n]`` may be read: writing starts while a snapshot is still
        being copied in.
        """
        if self.is_local:
            self.call("writing", path, lambda: self._write_local(path, header, data, ready), nbytes=len(data))
        elif self.is_s3 and len(header) + len(data) > 2 * self.part_bytes:
            self._write_s3_multipart(path, header, data, ready)
        else:
            self.call("writing", path, lambda: self._write_stream(path, header, data, ready), nbytes=len(data))

    def put_atomic(self, path: str, data: bytes, *, create_folder: bool = True) -> None:
        """A small file that readers see whole or not at all.

        With ``create_folder`` False, a missing folder (on a local disk: removed by someone) fails
        with `StorageError` rather than being created again: a commit must not resurrect a folder
        whose shards are gone.
        """
        if self.is_local:
            self.call("writing", path, lambda: self._put_local_atomic(path, data, create_folder))
        else:
            self.call("writing", path, lambda: self.fs.pipe_file(path, data))

    def delete(self, path: str, *, recursive: bool = False, deadline_s: float | None = None) -> None:
        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=recursive)

        self.call("deleting", path, rm, deadline_s=deadline_s)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run work beside the writes on the I/O threads (checksums release the GIL too)."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- backends -------------------------------------------------------------------------------

    def _write_local(self, path: str, header: bytes, data: memoryview, ready: Ready) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, header, 0)
            base = len(header)
            chunk = self.part_bytes // 2
            ranges = [(start, min(len(data), start + chunk)) for start in range(0, len(data), chunk)]

            def write(a: int, b: int) -> None:
                ready(b)
                _pwrite_all(fd, data[a:b], base + a)

            # os.pwrite releases the GIL: ranges go to disk in parallel, in order, as they are snapshotted.
            futures = [self._pool.submit(write, a, b) for a, b in ranges]
            for future in futures:
                future.result()
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(os.path.dirname(path))

    def _put_local_atomic(self, path: str, data: bytes, create_folder: bool) -> None:
        folder = os.path.dirname(path)
        if create_folder:
            os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _pwrite_all(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk must not keep the partial file
                os.unlink(tmp)
            raise
        _fsync_dir(folder)

    def _write_stream(self, path: str, header: bytes, data: memoryview, ready: Ready) -> None:
        with self.fs.open(path, "wb") as f:
            f.write(header)
            for start in range(0, len(data), self.part_bytes):
                end = min(len(data), start + self.part_bytes)
                ready(end)
                f.write(data[start:end])

    def _write_s3_multipart(self, path: str, header: bytes, data: memoryview, ready: Ready) -> None:
        bucket, key, _ = self.fs.split_path(path)
        upload = self.call(
            "starting upload", path, lambda: self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        )
        upload_id = upload["UploadId"]
        total = len(header) + len(data)
        bounds = [(start, min(total, start + self.part_bytes)) for start in range(0, total, self.part_bytes)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 5 * 2**20:
            bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]  # S3 parts other than the last must be >= 5 MiB

        def part(number: int, start: int, end: int) -> dict[str, Any]:
            ready(max(0, end - len(header)))
            body = _slice(header, data, start, end)
            response = self.call(
                f"uploading part {number} of",
                path,
                lambda: self.fs.call_s3(
                    "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                ),
                nbytes=len(body),
            )
            return {"PartNumber": number, "ETag": response["ETag"]}

        try:
            futures = [self._pool.submit(part, i + 1, a, b) for i, (a, b) in enumerate(bounds)]
            parts = [f.result() for f in futures]
            self.call(
                "completing upload",
                path,
                lambda: self.fs.call_s3(
                    "complete_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            try:
                run_bounded(
                    lambda: self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id),
                    self.retry.attempt_timeout_s,
                    "gpuguard-storage-abort",
                )
            except Exception as exc:  # the upload stays invisible; lifecycle rules reclaim it
                log.warning("could not abort the multipart upload of %s: %s", path, exc)
            raise
        self.fs.invalidate_cache(path)


def _slice(header: bytes, data: memoryview, start: int, end: int) -> bytes:
    """Bytes [start, end) of header+data, copying only that part."""
    h = len(header)
    if end <= h:
        return header[start:end]
    if start >= h:
        return bytes(data[start - h : end - h])
    return header[start:] + bytes(data[: end - h])


# The most one pwrite call hands the kernel. Filling the page cache in 4 MiB or larger calls was 2-5x
# slower than in 256 KiB-1 MiB calls on this project's ext4 machine (Linux 6.18): 1 GiB durable in
# 0.75-0.85 s with 1 MiB calls, 1.25-4.1 s with 4 MiB and 32 MiB ones (benchmarks/checkpoint.py's raw write
# uses the same size, so its floor is measured the same way). A 1 GiB shard is still only 1,024 calls.
PWRITE_BYTES = 1 << 20


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:PWRITE_BYTES], offset)
        view, offset = view[n:], offset + n


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
