"""Storage over fsspec: retries, durable writes, and the one place storage errors are translated.

Shards are written by the fastest way each backend offers, chosen by protocol like fsspec's own
registry: ``file`` writes byte ranges with ``os.pwrite`` from several threads and fsyncs; ``s3``
uploads multipart parts concurrently; anything else streams through ``fs.open``. Small files that
must appear whole (manifests) go through `Storage.put_atomic`: a temporary file and ``rename`` on
local disks, a single PUT on object stores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec

from gpuguard.checkpoint._crc import crc32c
from gpuguard.checkpoint._retry import DeadlineExceeded, RetryPolicy, from_backend, is_transient, run_bounded
from gpuguard.errors import ConfigError, StorageError

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
        self.url = url
        protocol = _check_url(url)
        options = self.retry.backend_options(protocol, storage_options or {})

        def open_fs() -> tuple[Any, str]:
            try:
                return fsspec.core.url_to_fs(url, **options)  # type: ignore[no-any-return]
            except ImportError as exc:  # the backend's package is not installed
                raise ConfigError("url", url, f"its backend is not installed ({exc})") from exc
            except ValueError as exc:  # fsspec: "Protocol not known: foo"; a backend refusing its arguments
                raise ConfigError("url", url, f"{exc}; known protocols: {_known_protocols()}") from exc
            except TypeError as exc:  # an option the backend's constructor does not take
                raise ConfigError("storage_options", storage_options, f"{protocol}: {exc}") from exc

        # Some backends connect in their constructor (FTP, SFTP, SMB, HDFS): opening is a storage call
        # like any other, under the same deadline, retried when the error is transient.
        self.fs, root = self.call("opening", url, open_fs)
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
            except (StorageError, ConfigError):  # already ours: a usage error is neither retried nor wrapped
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

    def read_range(self, path: str, start: int, end: int, into: memoryview | None, crc: int = 0) -> tuple[int, int]:
        """Bytes [start, end) of a file into ``into`` (only checksummed when None).

        Returns (bytes read, their CRC-32C continued from ``crc``); fewer bytes than asked means the
        file is shorter. ``FileNotFoundError`` when it is absent. See `read_segments`.
        """
        return self.read_segments(path, [(start, end, into)], crc)[0]

    def read_segments(
        self, path: str, segments: Sequence[tuple[int, int, memoryview | None]], crc: int = 0
    ) -> list[tuple[int, int]]:
        """Consecutive byte ranges of a file, each into its own buffer (or only checksummed), in one call.

        ``segments`` are (start, end, into) with each start the previous end. Returns, per segment,
        (bytes read, CRC-32C; the first continued from ``crc``). A local file is read with ``os.preadv``
        straight into each buffer, in pieces of `READ_PIECE_BYTES` that are checksummed while they are
        still in the CPU's cache; other backends answer one ranged read (one GET on object stores) that
        is split between the buffers. ``FileNotFoundError`` when the file is absent.
        """
        first, last = segments[0][0], segments[-1][1]
        if self.is_local:

            def read() -> list[tuple[int, int]]:
                out, value = [], crc
                for start, end, into in segments:
                    got, value = _pread_checksummed(path, start, end, into, value)
                    out.append((got, value))
                    value = 0
                return out

        else:

            def read() -> list[tuple[int, int]]:
                data = memoryview(self.fs.cat_file(path, start=first, end=last))
                out, value = [], crc
                for start, end, into in segments:
                    piece = data[start - first : end - first]
                    if into is not None:
                        into[: len(piece)] = piece
                    out.append((len(piece), crc32c(piece, value)))
                    value = 0
                return out

        return self.call("reading", path, read, nbytes=last - first, missing_ok=True)

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

    def list_uploads(self) -> list[tuple[str, str]]:
        """Incomplete multipart uploads under the root, as (path under the root, upload id); S3 only.

        A writer killed mid-upload leaves its parts on S3, invisible to listings and billed until the
        upload is aborted. Other object stores expire theirs (GCS resumable sessions after a week).
        """
        if not self.is_s3:
            return []
        bucket, key, _ = self.fs.split_path(self.root)
        prefix = f"{key}/" if key else ""

        def ls() -> list[tuple[str, str]]:
            found: list[tuple[str, str]] = []
            markers: dict[str, str] = {}
            while True:
                page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
                found += [(u["Key"][len(prefix) :], u["UploadId"]) for u in page.get("Uploads", [])]
                if not page.get("IsTruncated"):
                    return found
                markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

        return self.call("listing uploads", self.root, ls)

    def abort_upload(self, path: str, upload_id: str) -> None:
        """Abort an incomplete multipart upload (its parts are deleted); gone already is fine."""
        bucket, key, _ = self.fs.split_path(self.path(path))

        def abort() -> None:
            with contextlib.suppress(FileNotFoundError):  # s3fs maps NoSuchUpload (404) to FileNotFoundError
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

        self.call("aborting upload", self.path(path), abort)

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

    def put_atomic(
        self, path: str, data: bytes, *, create_folder: bool = True, deadline_s: float | None = None
    ) -> None:
        """A small file that readers see whole or not at all.

        With ``create_folder`` False, a missing folder (on a local disk: removed by someone) fails
        with `StorageError` rather than being created again: a commit must not resurrect a folder
        whose shards are gone.
        """
        if self.is_local:
            self.call("writing", path, lambda: self._put_local_atomic(path, data, create_folder), deadline_s=deadline_s)
        else:
            self.call("writing", path, lambda: self.fs.pipe_file(path, data), deadline_s=deadline_s)

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


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:(?!//)")


def _check_url(url: str) -> str:
    """The URL's protocol; `ConfigError` for what is not a URL or path at all (a usage error, not storage)."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("url", url, "a non-empty fsspec URL or path, e.g. s3://bucket/run or /mnt/ckpt")
    if "://" not in url and "::" not in url and _SCHEME.match(url):
        raise ConfigError("url", url, "a URL needs '://' after its protocol, e.g. s3://bucket/run")
    last = url.rsplit("::", 1)[-1]
    if "://" not in last:
        return "file"
    protocol, rest = last.split("://", 1)
    if protocol not in ("file", "local") and not rest.strip("/"):
        raise ConfigError("url", url, f"must name a bucket or folder after '{protocol}://', e.g. s3://bucket/run")
    return protocol


def _known_protocols() -> str:
    return ", ".join(sorted(fsspec.available_protocols()))


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


# Reads from a local file go in pieces of this size: each is checksummed right after it lands, while it
# is still in cache, so verifying costs little beyond the read itself.
READ_PIECE_BYTES = 1 << 20


def _pread_checksummed(path: str, start: int, end: int, into: memoryview | None, crc: int) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        scratch = memoryview(bytearray(min(READ_PIECE_BYTES, end - start))) if into is None else None
        at = start
        while at < end:
            n = min(READ_PIECE_BYTES, end - at)
            view = scratch[:n] if scratch is not None else into[at - start : at - start + n]  # type: ignore[index]
            got = 0
            while got < n:
                k = os.preadv(fd, [view[got:]], at + got)
                if k <= 0:
                    return at + got - start, crc32c(view[:got], crc)
                got += k
            crc = crc32c(view, crc)
            at += n
        return end - start, crc
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
