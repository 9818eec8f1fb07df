"""A save in flight, as the caller holds it: wait for it, ask how long it took."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from gpuguard.checkpoint._catalog import CheckpointInfo
from gpuguard.checkpoint._staging import LentSnapshot


@dataclass(frozen=True)
class SaveTimings:
    """Where a save's time went, in seconds: ``stall_s`` is what the training thread waited."""

    stall_s: float = 0.0
    durable_s: float = 0.0


class CommitGate:
    """Whether a save may still commit: the writer enters it right before the manifest write, and a
    caller that gives up on the save closes it. Whichever comes first wins, so a closed save never
    commits later, and a save whose commit has begun is known to be committing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "open"  # -> "committing" (the writer) or "closed" (the caller)

    def enter(self) -> bool:
        """The writer, before the manifest: False when the save was abandoned (do not commit)."""
        with self._lock:
            if self._state == "closed":
                return False
            self._state = "committing"
            return True

    def close(self) -> bool:
        """The caller: True when the save can no longer commit; False when its commit has begun."""
        with self._lock:
            if self._state == "committing":
                return False
            self._state = "closed"
            return True

    @property
    def closed(self) -> bool:
        return self._state == "closed"


class PendingSave:
    """A save in flight. `wait` returns once it is durable and committed, on every rank.

    The snapshot is already taken when you hold this: training may change its tensors freely.
    """

    def __init__(
        self,
        checkpoint_id: str,
        step: int,
        future: Future[CheckpointInfo],
        stall_s: float,
        started: float,
        gate: CommitGate | None = None,
    ) -> None:
        self.id = checkpoint_id
        self._gate = gate or CommitGate()
        self.step = step
        self._future = future
        self._stall_s = stall_s
        self._started = started
        self._durable_at: float | None = None
        self._lent: LentSnapshot | None = None  # its snapshot, lent to a save into another store (`Saver.save_flat`)
        future.add_done_callback(lambda _: self._mark())

    def _mark(self) -> None:
        self._durable_at = time.perf_counter()

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        """Block until the checkpoint is committed; re-raises the save's error.

        On the committing rank (rank 0 of a multi-rank save), committed means it wrote the manifest;
        on every other rank, that it read back the manifest of this very save (same attempt). A rank
        whose committing rank failed, died or stalled never reports success: it raises `CommitError`.

        Returns:
            The committed checkpoint.
        Raises:
            StorageError: the storage failed; the previous checkpoint is intact.
            CommitError: a multi-rank save that the committing rank did not commit (failed, or no
                manifest within ``commit_timeout_s``).
            CheckpointExistsError: the id was already committed; nothing was written.
            TimeoutError: not done within ``timeout`` seconds.
        """
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def abandon(self) -> bool:
        """Give up on this save: from now on it never commits, and its writer stops at its next part.

        In a multi-rank save, the same on every rank: a rank other than the committing one takes part
        in the commit by posting its record, which the committing rank needs before it commits. So a
        save any rank abandoned in time never commits on any rank; once it is committing anywhere, no
        rank's ``abandon()`` returns True.

        Returns:
            True when the save will not commit (it had not begun to); False when its commit had
            already begun or ended: `wait` then returns the committed checkpoint (or its error).
        """
        return self._gate.close()

    def add_done_callback(self, callback: Callable[[PendingSave], None]) -> None:
        """Call ``callback(self)`` when the save ends, on the writer's thread (at once if it has)."""
        self._future.add_done_callback(lambda _: callback(self))

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None

    @property
    def timings(self) -> SaveTimings:
        durable = (self._durable_at - self._started) if self._durable_at else 0.0
        return SaveTimings(stall_s=self._stall_s, durable_s=durable)
