"""Storage faults: transient errors are retried, permanent ones fail clearly and lose nothing."""

from __future__ import annotations

import errno
import traceback
from typing import Any

import aiohttp
import pytest
import torch
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from helpers.flaky_fs import FlakyFileSystem

from gpuguard import CheckpointStore, RetryPolicy, StorageError
from gpuguard.checkpoint._retry import is_transient


def s3_error(status: int, code: str) -> OSError:
    """What s3fs raises for an S3 error response: an OSError caused by botocore's ClientError."""
    cause = ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )
    error = OSError(errno.EIO, code)
    error.__cause__ = cause
    return error


@pytest.fixture
def flaky() -> Any:
    FlakyFileSystem.store.clear()
    FlakyFileSystem.pseudo_dirs[:] = [""]
    FlakyFileSystem.failures.clear()
    FlakyFileSystem.writes = 0
    with CheckpointStore("flaky://run", retry=RetryPolicy(attempts=4, base_delay_s=0.001)) as store:
        yield store


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TimeoutError("read timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (s3_error(503, "SlowDown"), True),
        (s3_error(500, "InternalError"), True),
        (s3_error(429, "TooManyRequests"), True),
        (EndpointConnectionError(endpoint_url="http://s3"), True),
        (s3_error(403, "AccessDenied"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (s3_error(404, "NoSuchBucket"), False),
    ],
    ids=["timeout", "reset", "503", "500", "429", "unreachable", "403", "eacces", "enospc", "404"],
)
def test_transient_errors_are_told_apart(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


@pytest.mark.parametrize(
    "failure", [TimeoutError("simulated timeout"), s3_error(503, "SlowDown")], ids=["timeout", "503"]
)
def test_transient_errors_are_retried(flaky: CheckpointStore, failure: BaseException) -> None:
    FlakyFileSystem.failures[:] = [failure, failure]
    info = flaky.save({"w": torch.arange(10.0)}, step=1).wait()
    assert info is not None and info.step == 1
    assert FlakyFileSystem.failures == []
    target = {"w": torch.zeros(10)}
    assert flaky.load(target) == 1 and torch.equal(target["w"], torch.arange(10.0))


def test_retries_run_out(flaky: CheckpointStore) -> None:
    FlakyFileSystem.failures[:] = [TimeoutError("simulated timeout")] * 10
    with pytest.raises(StorageError, match="transient error, retries exhausted: simulated timeout") as caught:
        flaky.save({"w": torch.ones(1)}, step=1).wait()
    assert caught.value.transient


def test_a_permanent_failure_is_clear_and_loses_nothing(flaky: CheckpointStore) -> None:
    flaky.save({"w": torch.full((4,), 1.0)}, step=1).wait()
    FlakyFileSystem.failures[:] = [PermissionError(errno.EACCES, "Access Denied")]
    pending = flaky.save({"w": torch.full((4,), 2.0)}, step=2)  # the training thread is not hit
    with pytest.raises(StorageError, match=r"writing .*step-000000000002-.*: error: .*Access Denied") as caught:
        pending.wait()
    assert not caught.value.transient
    assert pending.done() and isinstance(pending.exception(), StorageError)
    # the previous checkpoint is intact and still the latest
    latest = flaky.latest()
    assert latest is not None and latest.step == 1
    target = {"w": torch.zeros(4)}
    flaky.load(target)
    assert torch.equal(target["w"], torch.full((4,), 1.0))
    # and the store still works once the storage does
    assert flaky.save({"w": torch.full((4,), 3.0)}, step=3).wait() is not None


def test_a_failed_manifest_write_commits_nothing(flaky: CheckpointStore) -> None:
    flaky.save({"w": torch.ones(2)}, step=1).wait()
    writes_per_save = FlakyFileSystem.writes
    # shard and state file go through; the manifest (the last write) fails for good
    FlakyFileSystem.failures[:] = [*[None] * (writes_per_save - 1), PermissionError(errno.EACCES, "denied")]
    with pytest.raises(StorageError, match=r"MANIFEST\.json.*denied") as failed:
        flaky.save({"w": torch.ones(2)}, step=2).wait()
    assert not failed.value.transient  # a permission error is not retried
    assert [i.step for i in flaky.list()] == [1]


@pytest.mark.parametrize(
    "failure",
    [
        PermissionError(errno.EACCES, "denied"),
        FileNotFoundError(errno.ENOENT, "NoSuchBucket"),
        IsADirectoryError(errno.EISDIR, "is a directory"),
        NotADirectoryError(errno.ENOTDIR, "not a directory"),
        OSError(errno.EROFS, "Read-only file system"),
        OSError(errno.EIO, "I/O error"),
        s3_error(404, "NoSuchBucket"),
        ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject"),
        NoCredentialsError(),
        aiohttp.InvalidURL("http://s3 .example"),
    ],
    ids=[
        "eacces",
        "enoent",
        "eisdir",
        "enotdir",
        "erofs",
        "eio",
        "s3-404",
        "botocore-403",
        "no-credentials",
        "aiohttp",
    ],
)
def test_every_storage_error_leaves_as_a_storage_error(flaky: CheckpointStore, failure: BaseException) -> None:
    FlakyFileSystem.failures[:] = [failure]
    with pytest.raises(StorageError, match=r"under flaky://run; tried for") as caught:
        flaky.save({"w": torch.ones(1)}, step=1).wait()
    assert caught.value.__cause__ is failure
    assert caught.value.operation == "writing" and not caught.value.timed_out
    assert flaky.list() == [] and flaky.prune() == []


@pytest.mark.parametrize(
    "bug",
    [
        TypeError("write() argument must be bytes"),
        AttributeError("'NoneType' has no attribute 'write'"),
        ValueError("x"),
    ],
    ids=["type", "attribute", "value"],
)
def test_a_programming_error_is_not_a_storage_error(flaky: CheckpointStore, bug: BaseException) -> None:
    # A bug (in a backend or in gpuguard) is neither retried nor dressed up as a storage failure: it
    # surfaces as itself, with the traceback down to where it was raised, and the failed save leaves nothing.
    FlakyFileSystem.failures[:] = [bug]
    with pytest.raises(type(bug)) as caught:
        flaky.save({"w": torch.ones(1)}, step=1).wait()
    assert caught.value is bug and FlakyFileSystem.writes == 1  # one try: not retried
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "_fail" in frames  # raised in the backend, and the traceback still says so
    assert flaky.list() == [] and flaky.prune() == []


def _raised_while_handling_a_timeout() -> IndexError:
    """What s3fs 2026.9's _fetch_range raises on S3's 400 RequestTimeout: an IndexError, in the handler."""
    try:
        try:
            raise TimeoutError("Your socket connection to the server was not read from or written to")
        except TimeoutError:
            raise IndexError("tuple index out of range")  # noqa: B904 - as s3fs does: the timeout is its context
    except IndexError as error:
        return error


def test_an_error_raised_while_handling_a_storage_error_is_the_storage_s(flaky: CheckpointStore) -> None:
    FlakyFileSystem.failures[:] = [_raised_while_handling_a_timeout()]
    assert flaky.save({"w": torch.ones(1)}, step=1).wait() is not None  # transient, by its chain: retried
    assert FlakyFileSystem.writes >= 2
