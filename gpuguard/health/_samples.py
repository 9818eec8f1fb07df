"""The inputs of the health rules (samples, events, limits) and their two time tools: hysteresis and rates."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

Reading = float | int


@dataclass(frozen=True)
class Sample:
    """One poll of one GPU.

    Attributes:
        at: monitor clock, seconds.
        readings: signal name → value, for the signals that answered this cycle.
        lost: NVML answered ``GPU_IS_LOST``.
        error: no reading came back this cycle, and why (the GPU may be fine).
        reset_required: NVML answered ``RESET_REQUIRED``: the GPU must be reset before it is used again.
        errors: calls that failed this cycle while others answered.
        call: the NVML call that answered ``lost`` or ``error``.
        unreadable: signal name -> why it could not be read this cycle (the call and the NVML error).
        open_code: the NVML return code that kept the GPU from being opened, if it was not.
        evidence: more to say about a ``lost`` or ``open_code`` (which GPU NVML found lost, say).
        off: the signals switched off for this GPU so far (not supported: no longer unreadable).
    """

    at: float
    readings: Mapping[str, Reading] = field(default_factory=dict)
    lost: bool = False
    error: str | None = None
    reset_required: bool = False
    errors: tuple[str, ...] = ()
    call: str | None = None
    unreadable: Mapping[str, str] = field(default_factory=dict)
    open_code: int | None = None
    evidence: Mapping[str, object] = field(default_factory=dict)
    off: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DeviceEvent:
    """An NVML event for one GPU.

    ``kind`` is a key of `gpuguard.health.signals.EVENT_TYPES`; ``xid`` is set when it is ``"xid"``;
    ``gpu_instance`` is the MIG GPU instance the event names (None: the whole GPU).
    """

    at: float
    kind: str
    xid: int | None = None
    gpu_instance: int | None = None


@dataclass(frozen=True)
class DeviceLimits:
    """What a GPU is built for, read once at start-up; None where NVML does not say."""

    pcie_max_link_width: int | None = None
    pcie_generation: int | None = None
    temperature_slowdown_c: float | None = None
    memory_temperature_max_c: float | None = None
    nvlink_links: int = 0


class Persistence:
    """A condition with hysteresis: on after holding ``onset_s``, off after ``quiet_s`` absent."""

    def __init__(self, onset_s: float, quiet_s: float) -> None:
        self.onset_s = onset_s
        self.quiet_s = quiet_s
        self.active = False
        self.active_since = 0.0
        self._true_since: float | None = None
        self._false_since: float | None = None

    def update(self, condition: bool, now: float) -> bool:
        if condition:
            self._false_since = None
            if self._true_since is None:
                self._true_since = now
            if not self.active and now - self._true_since >= self.onset_s:
                self.active, self.active_since = True, now
        else:
            self._true_since = None
            if self._false_since is None:
                self._false_since = now
            if self.active and now - self._false_since >= self.quiet_s:
                self.active = False
        return self.active


class Rate:
    """Rate of a monotonic counter over a sliding window, robust to counter resets."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._points: deque[tuple[float, float]] = deque()

    def add(self, at: float, value: float) -> None:
        if self._points and value < self._points[-1][1]:
            self._points.clear()  # driver reload or counter wrap: start over rather than report a negative rate
        self._points.append((at, value))
        # Keep one point at or beyond the window's edge so the rate spans the whole window.
        while len(self._points) > 2 and self._points[1][0] <= at - self.window_s:
            self._points.popleft()

    def rises(self) -> int:
        """In how many of the polls kept the counter went up: one burst is one rise, a storm many."""
        points = list(self._points)
        return sum(1 for (_, a), (_, b) in itertools.pairwise(points) if b > a)

    def increase(self) -> tuple[float, float]:
        """How much the counter grew over the points kept, and over how many seconds."""
        if len(self._points) < 2:
            return 0.0, 0.0
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        return v1 - v0, t1 - t0

    def per_minute(self) -> float:
        """Increase per minute over the time the points kept span (the window, once it has passed).

        Before a whole window has passed the rate is over the time seen so far: 120 replays a minute
        read 120/min after 12 s, not 48/min. One burst is kept from reading as a trend by the rules'
        onset time (a condition must hold ``onset_s`` before it counts), not by understating the rate.
        """
        if len(self._points) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        span = t1 - t0
        return (v1 - v0) / span * 60.0 if span > 0 else 0.0


class Readability:
    """Which signals could not be read, since when, and which have ever been read.

    A signal that fails is retried on every poll (only NOT_SUPPORTED / FUNCTION_NOT_FOUND switch one
    off, elsewhere); `blind` names the critical ones that count: at once for a signal never read, after
    ``polls`` failures in a row for one that has answered before (a driver hiccup is common).
    """

    def __init__(self) -> None:
        self._failures: dict[str, tuple[str, int]] = {}
        self._ever: set[str] = set()

    def failed(self, signal: str, error: str) -> None:
        _, count = self._failures.get(signal, ("", 0))
        self._failures[signal] = (error, count + 1)

    def answered(self, *signals: str) -> None:
        for signal in signals:
            self._ever.add(signal)
            self._failures.pop(signal, None)

    def forget(self, *signals: str) -> None:
        """Signals switched off (not supported): neither unreadable nor awaited any more."""
        for signal in signals:
            self._failures.pop(signal, None)

    def unreadable(self) -> dict[str, str]:
        return {signal: error for signal, (error, _) in sorted(self._failures.items())}

    def blind(self, critical: frozenset[str], polls: int) -> dict[str, tuple[str, int]]:
        return {
            signal: (error, count)
            for signal, (error, count) in sorted(self._failures.items())
            if signal in critical and (signal not in self._ever or count >= polls)
        }
