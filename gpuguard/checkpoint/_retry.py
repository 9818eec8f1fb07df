"""The one retry layer: which storage errors are transient, how long to back off, and a hard deadline.

Every storage operation runs under `RetryPolicy.deadline_s` (plus time for its bytes at
``min_bytes_per_s`` when it moves data), retries included. The backends' own retries are turned off
(`backend_options`) so that retries do not nest three deep (botocore, s3fs, gpuguard), and the
operation itself runs on a daemon thread that is abandoned at the deadline: a server that accepts a
connection and never answers cannot hold a save, a load or an evacuation past it.
"""

from __future__ import annotations

import asyncio
import errno
import math
import random
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from gpuguard.errors import ConfigError

T = TypeVar("T")

_TRANSIENT_ERRNOS: Final = frozenset(
    {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE}
)
_TRANSIENT_CODES: Final = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeTooSkewed",
        "503",
        "500",
        "502",
        "504",
    }
)
_TRANSIENT_NAMES: Final = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientOSError",
        "IncompleteReadError",
    }
)


# The roots of what storage backends raise, by module: resolved only when the module is already
# imported (a backend that is not loaded raised nothing), so no backend is imported here. OSError covers
# fsspec's local and memory filesystems and s3fs, which turns botocore's ClientError into OSError
# subclasses (s3fs.errors.translate_boto_error); the rest reach us untranslated from some calls.
_BACKEND_ERROR_ROOTS: Final = (
    ("botocore.exceptions", "BotoCoreError"),  # connection, timeout, credentials, parameter validation
    ("botocore.exceptions", "ClientError"),  # an S3 error response s3fs did not translate
    ("aiohttp", "ClientError"),  # s3fs's and gcsfs's HTTP transport
    ("gcsfs.retry", "HttpError"),
    ("google.auth.exceptions", "GoogleAuthError"),
    ("azure.core.exceptions", "AzureError"),  # adlfs
)


def backend_errors() -> tuple[type[BaseException], ...]:
    """What a storage operation may raise for a storage reason; anything else is a bug, and keeps its
    traceback (a TypeError in a backend or in gpuguard is not a storage failure to retry or report)."""
    found: list[type[BaseException]] = [OSError, asyncio.TimeoutError]
    for module, name in _BACKEND_ERROR_ROOTS:
        root = getattr(sys.modules.get(module), name, None)
        if isinstance(root, type) and issubclass(root, BaseException):
            found.append(root)
    return tuple(found)


def from_backend(exc: BaseException) -> bool:
    """Whether ``exc`` is a storage failure: a backend error, or one raised while handling one (s3fs
    2026.9's ``_fetch_range`` raises IndexError reading the args of a one-argument TimeoutError that it
    made of S3's 400 RequestTimeout: the storage failed, and the chain says so)."""
    roots = backend_errors()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, roots):
            return True
        current = current.__cause__ or current.__context__
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: timeouts, dropped connections, 5xx and throttling."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (TimeoutError, ConnectionError)):
            return True
        if type(current).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = response.get("Error", {}).get("Code", "")
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return True
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff with jitter for transient storage errors, under one deadline per operation.

    The defaults fit an evacuation inside Kubernetes' default 30 s grace period: a storage that does
    not answer fails a save within ``deadline_s`` rather than holding the job until it is killed.

    Args:
        attempts: tries per operation, the first included.
        base_delay_s: the first backoff; doubles at each retry, up to ``max_delay_s``, with jitter.
        max_delay_s: the longest backoff between two tries.
        deadline_s: every operation (connect, list, read, write), its retries included, ends by then.
        attempt_timeout_s: the connect and read timeout given to the backend for one try.
        min_bytes_per_s: an operation that moves data gets ``bytes / min_bytes_per_s`` more seconds.

    Example:
        >>> RetryPolicy(deadline_s=5.0).deadline_for(0)
        5.0
    """

    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    deadline_s: float = 20.0
    attempt_timeout_s: float = 10.0
    min_bytes_per_s: float = 16 * 2**20

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) or self.attempts < 1:
            raise ConfigError("RetryPolicy.attempts", self.attempts, "must be a whole number, 1 or greater")
        for name in ("base_delay_s", "max_delay_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"RetryPolicy.{name}", value, "must be a finite number of seconds, 0 or more")
        for name in ("deadline_s", "attempt_timeout_s", "min_bytes_per_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"RetryPolicy.{name}", value, "must be a finite number greater than 0")

    def delays(self) -> Iterator[float]:
        for attempt in range(self.attempts - 1):
            yield min(self.max_delay_s, self.base_delay_s * 2**attempt) * (0.5 + random.random() / 2)

    def deadline_for(self, nbytes: int) -> float:
        """Seconds allowed for one operation that moves ``nbytes``."""
        return self.deadline_s + nbytes / self.min_bytes_per_s

    def backend_options(self, protocol: str, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with the backend's own timeouts set and its own retries off, unless the user set them."""
        if protocol not in ("s3", "s3a"):
            return options
        merged = dict(options)
        config = dict(merged.get("config_kwargs") or {})
        # botocore.config.Config: connect_timeout, read_timeout, retries.total_max_attempts (the first
        # try included; 1 turns botocore's retries off). Source: botocore/config.py docstring.
        config.setdefault("connect_timeout", min(self.attempt_timeout_s, 5.0))
        config.setdefault("read_timeout", self.attempt_timeout_s)
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        merged["config_kwargs"] = config
        # s3fs keeps a cached instance per option set; ours sets `retries` on it (below), so it gets its own.
        merged.setdefault("skip_instance_cache", True)
        return merged


def run_bounded(fn: Callable[[], T], timeout_s: float, name: str) -> T:
    """``fn()`` on a daemon thread; `DeadlineExceeded` when it has not returned within ``timeout_s``.

    The thread is abandoned, not stopped (Python cannot stop it): it ends when the backend's own
    timeout fires, and as a daemon it never holds the process's exit.
    """
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    if not done.wait(max(0.0, timeout_s)):
        raise DeadlineExceeded(timeout_s)
    return future.result()


class DeadlineExceeded(Exception):
    """An operation's deadline passed while it was still running (internal; becomes `StorageError`)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"no answer within {timeout_s:.1f}s")
        self.timeout_s = timeout_s
