"""A save in flight, as the caller holds it: wait for it, ask how long it took."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from gpuguard.checkpoint._catalog import CheckpointInfo


@dataclass(frozen=True)
class SaveTimings:
    """Where a save's time went, in seconds: ``stall_s`` is what the training thread waited."""

    stall_s: float = 0.0
    durable_s: float = 0.0


class PendingSave:
    """A save in flight. `wait` returns once it is durable and committed.

    The snapshot is already taken when you hold this: training may change its tensors freely.
    """

    def __init__(
        self, checkpoint_id: str, step: int, future: Future[CheckpointInfo | None], stall_s: float, started: float
    ) -> None:
        self.id = checkpoint_id
        self.step = step
        self._future = future
        self._stall_s = stall_s
        self._started = started
        self._durable_at: float | None = None
        future.add_done_callback(lambda _: self._mark())

    def _mark(self) -> None:
        self._durable_at = time.perf_counter()

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until durable (and committed, unless another rank commits); re-raises the save's error.

        Returns:
            The committed checkpoint, or None for a rank whose shard another rank commits.
        Raises:
            StorageError: the storage failed; the previous checkpoint is intact.
            TimeoutError: not done within ``timeout`` seconds.
        """
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, callback: Callable[[PendingSave], None]) -> None:
        """Call ``callback(self)`` when the save ends, on the writer's thread (at once if it has)."""
        self._future.add_done_callback(lambda _: callback(self))

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None

    @property
    def timings(self) -> SaveTimings:
        durable = (self._durable_at - self._started) if self._durable_at else 0.0
        return SaveTimings(stall_s=self._stall_s, durable_s=durable)
