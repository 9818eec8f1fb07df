"""Failures on the guard's background threads: said once, with the traceback, and counted after that.

A failure that comes back at every wake (a plugin that raises, a storage that refuses to prune) must
neither flood the log nor go unnoticed: the first of each kind is logged with its traceback (an error
gpuguard expects, such as a `GpuGuardError` from storage, with its message alone), repeats are counted,
a recovery is said with the count, and `Guard.close` sums up what kept failing.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("gpuguard")


class BackgroundFailures:
    """Counts failures by kind (``deciding``, ``pruning old checkpoints``, ...); thread-safe."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # over the guard's life
        self._streaks: dict[str, int] = {}  # since the last success
        self._lock = threading.Lock()

    def failed(self, kind: str, exc: BaseException, *, expected: bool = False) -> None:
        """Record a failure of ``kind``; log it if it is the first of its kind."""
        with self._lock:
            count = self.counts[kind] = self.counts.get(kind, 0) + 1
            self._streaks[kind] = self._streaks.get(kind, 0) + 1
        if count == 1:
            log.error(
                "gpuguard: %s failed: %s%s (said once; repeats are counted)",
                kind,
                exc if expected else f"{type(exc).__name__}: {exc}",
                "" if expected else "; this is a bug, the traceback follows",
                exc_info=None if expected else exc,
            )
        else:
            log.debug("gpuguard: %s failed again (%d times): %s", kind, count, exc)

    def succeeded(self, kind: str) -> None:
        """``kind`` worked: say so if it had failed more than once in a row."""
        with self._lock:
            streak = self._streaks.pop(kind, 0)
        if streak > 1:
            log.warning("gpuguard: %s works again after %d failures in a row", kind, streak)

    def summary(self) -> None:
        """At close: what failed more than once, with the totals."""
        with self._lock:
            repeated = {kind: n for kind, n in self.counts.items() if n > 1}
        for kind, n in repeated.items():
            log.warning("gpuguard: %s failed %d times while the guard ran (the first is logged above)", kind, n)
