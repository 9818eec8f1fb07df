"""Storage that does not answer: every operation ends with `StorageError` within its deadline.

The endpoints are real sockets on 127.0.0.1: a listener that accepts connections (the kernel completes
the handshake) and never answers, and a port where nothing listens (connection refused).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from gpuguard import CheckpointStore, ConfigError, Guard, RetryPolicy, StorageError
from gpuguard.fakenvml import FakeNvml

from conftest import s3_options

SHORT = RetryPolicy(deadline_s=2.0, attempt_timeout_s=1.0, base_delay_s=0.05)
SLACK_S = 1.0  # thread hand-off and the last backoff's rounding; a hang would overrun it by far
ANSWERING = RetryPolicy(deadline_s=60.0, attempt_timeout_s=30.0, base_delay_s=0.05)


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts TCP connections and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.fixture
def refused() -> str:
    """An endpoint where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _operations(store: CheckpointStore) -> dict[str, Callable[[], Any]]:
    return {
        "latest": store.latest,
        "save": lambda: store.save({"w": torch.ones(4)}, step=1).wait(),
        "load": lambda: store.load({"w": torch.zeros(4)}),
    }


def _fails_in_time(operation: Callable[[], Any], deadline_s: float) -> StorageError:
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        operation()
    took = time.monotonic() - started
    assert took <= deadline_s + SLACK_S, f"took {took:.1f}s, the deadline is {deadline_s}s"
    assert caught.value.elapsed_s <= deadline_s + SLACK_S
    return caught.value


@pytest.mark.parametrize("endpoint", ["black_hole", "refused"])
@pytest.mark.parametrize("operation", ["latest", "save", "load"])
def test_an_unanswering_s3_endpoint_fails_within_a_short_deadline(
    request: pytest.FixtureRequest, endpoint: str, operation: str
) -> None:
    url = request.getfixturevalue(endpoint)
    with CheckpointStore("s3://bucket/run", s3_options(url), retry=SHORT) as store:
        error = _fails_in_time(_operations(store)[operation], SHORT.deadline_s)
    assert error.transient
    assert "s3://bucket/run" in str(error) and error.operation in str(error)
    if endpoint == "black_hole":
        assert error.timed_out and "within the 2.0s deadline" in str(error)


@pytest.mark.parametrize(
    # an unanswering endpoint takes the whole default deadline (20 s): the slow step; the short-deadline
    # black-hole tests above run in the main suite
    "endpoint",
    [pytest.param("black_hole", marks=pytest.mark.slow), "refused"],
)
def test_the_default_deadline_bounds_every_operation(request: pytest.FixtureRequest, endpoint: str) -> None:
    """With the defaults, the three operations run at once (so the test takes one deadline, not three)."""
    url = request.getfixturevalue(endpoint)
    default = RetryPolicy()
    errors: dict[str, BaseException] = {}
    took: dict[str, float] = {}
    with CheckpointStore("s3://bucket/run", s3_options(url)) as store:

        def run(name: str, operation: Callable[[], Any]) -> None:
            started = time.monotonic()
            try:
                operation()
            except BaseException as exc:
                errors[name] = exc
            took[name] = time.monotonic() - started

        threads = [threading.Thread(target=run, args=item) for item in _operations(store).items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(default.deadline_s * 3)  # a guard against a hang, not a timing
    assert sorted(errors) == ["latest", "load", "save"]
    for name, error in errors.items():
        assert isinstance(error, StorageError), (name, error)
        assert took[name] <= default.deadline_s + SLACK_S, (name, took[name])


def test_a_missing_bucket_is_an_error_not_an_empty_run(s3_endpoint: str, s3_bucket: tuple[str, Any]) -> None:
    options = s3_options(s3_endpoint)
    # a server that answers: a 404 is not retried, so a roomy deadline costs nothing, and a loaded machine's
    # slow answers cannot turn "does not exist" into "no answer within the deadline"
    with CheckpointStore("s3://no-such-bucket-7f3a/run", options, retry=ANSWERING) as store:
        with pytest.raises(StorageError, match="the bucket 'no-such-bucket-7f3a' does not exist"):
            store.latest()
        with pytest.raises(StorageError, match="no-such-bucket-7f3a"):
            store.load({"w": torch.zeros(1)})
        with pytest.raises(StorageError, match="no-such-bucket-7f3a"):
            store.save({"w": torch.zeros(1)}, step=1).wait()
    # an existing bucket with nothing under the prefix is a new run: no checkpoint, no error
    url, _ = s3_bucket
    with CheckpointStore(url, options) as store:
        assert store.latest() is None


def test_a_resume_from_a_missing_bucket_raises_rather_than_starting_at_step_0(s3_endpoint: str) -> None:
    guard = Guard(
        checkpoint_dir="s3://no-such-bucket-7f3a/run",
        storage_options=s3_options(s3_endpoint),
        state={"w": torch.ones(1)},
        nvml=FakeNvml.replay(),
        devices="all",
    )
    try:
        with pytest.raises(StorageError, match="does not exist"):
            guard.resume()
    finally:
        guard.close()


def test_retry_policy_is_validated() -> None:
    with pytest.raises(ValueError, match=r"RetryPolicy.deadline_s: 0 is not valid"):
        RetryPolicy(deadline_s=0)
    with pytest.raises(ValueError, match=r"RetryPolicy.attempts: 0 is not valid"):
        RetryPolicy(attempts=0)


@pytest.mark.parametrize(
    ("setting", "value"), [("staging_buffers", 0), ("lease_s", 0), ("lease_s", float("inf"))], ids=str
)
def test_store_settings_are_validated(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{setting}: {value!r} is not valid"):
        CheckpointStore("memory://settings", **{setting: value})  # type: ignore[arg-type]


@pytest.fixture
def blocking_protocol() -> Iterator[threading.Event]:
    """A registered fsspec backend ("blackhole://") whose constructor blocks until the test lets it go."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    release = threading.Event()

    class BlackHoleFileSystem(MemoryFileSystem):
        protocol = "blackhole"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            release.wait(60)  # a connect that never completes (bounded, so no thread outlives the session long)
            super().__init__(*args, **kwargs)

    fsspec.register_implementation("blackhole", BlackHoleFileSystem, clobber=True)
    yield release
    release.set()


def test_opening_a_store_on_an_unanswering_backend_ends_within_the_deadline(
    black_hole: str, blocking_protocol: threading.Event
) -> None:
    # fsspec's FTP backend connects in its constructor (ftplib waits for the server's greeting, 30 s by
    # default); a backend of any kind that blocks there is bounded the same way.
    ftp = black_hole.replace("http://", "ftp://") + "/run"
    for url in (ftp, "blackhole://run"):
        error = _fails_in_time(lambda url=url: CheckpointStore(url, retry=SHORT), SHORT.deadline_s)  # type: ignore[misc]
        assert error.timed_out and error.operation == "opening" and url in str(error), url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("foo://run", "Protocol not known: foo"),
        ("s3:/bucket/run", "needs '://' after its protocol"),
        ("s3://", "must name a bucket or folder"),
        ("", "a non-empty fsspec URL"),
    ],
    ids=["unknown-protocol", "one-slash", "no-bucket", "empty"],
)
def test_a_bad_url_is_a_usage_error_not_a_storage_failure(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(why)):
        CheckpointStore(url)


def test_the_cli_exits_2_on_an_unknown_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    from gpuguard.cli import main

    assert main(["checkpoints", "list", "foo://run", "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "ConfigError" and "Protocol not known: foo" in report["error"]
