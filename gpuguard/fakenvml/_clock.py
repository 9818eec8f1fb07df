from __future__ import annotations

import threading
import time


class ScenarioClock:
    """Scenario time in seconds, which tests move by hand and demos let run.

    In manual mode (the default) time stands still until `advance` or `set` moves it, so a test of a
    60-second fault runs in milliseconds. In real-time mode it follows the wall clock, ``speed``
    times as fast. Calling the clock returns the current scenario time.

    Example:
        >>> clock = ScenarioClock()
        >>> clock.advance(4.0)
        >>> clock()
        4.0
    """

    def __init__(self, *, realtime: bool = False, speed: float = 1.0, start: float = 0.0) -> None:
        if speed <= 0:
            raise ValueError(f"speed: {speed!r} is not valid; must be greater than 0")
        self.realtime = realtime
        self.speed = speed
        self._offset = start
        self._origin = time.monotonic()
        self.changed = threading.Condition()

    def __call__(self) -> float:
        if self.realtime:
            return self._offset + (time.monotonic() - self._origin) * self.speed
        return self._offset

    def set(self, at: float) -> None:
        """Jump to scenario time ``at`` (forwards only) and wake anyone waiting on it."""
        with self.changed:
            now = self()
            if at < now:
                raise ValueError(f"at: {at!r} is not valid; the scenario clock is at {now:.3f} and only moves forward")
            self._offset += at - now
            self.changed.notify_all()

    def advance(self, seconds: float) -> None:
        self.set(self() + seconds)

    def sleep_until(self, at: float, timeout_s: float) -> None:
        """Block until scenario time reaches ``at`` or ``timeout_s`` wall seconds pass."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while self() < at:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = left if not self.realtime else min(left, (at - self()) / self.speed)
                self.changed.wait(max(wait, 0.0))
