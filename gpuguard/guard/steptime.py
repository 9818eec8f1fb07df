"""Step time: the gradual slowdown that probes never see, against the run's own baseline."""

from __future__ import annotations

import statistics
import time
from array import array

from gpuguard.guard.config import GuardConfig
from gpuguard.health.model import HealthState, Reason, Remedy
from gpuguard.health.signals import HARDWARE_CLOCK_EVENTS


class StepClock:
    """Records step durations from the training thread: one subtraction and one store per step.

    Readers on other threads copy the ring without a lock; a torn read costs one sample, never a crash.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.durations = array("d", bytes(8 * capacity))
        self.capacity = capacity
        self.count = 0
        self.last = 0.0

    def tick(self, now: float) -> None:
        if self.last:
            self.durations[self.count % self.capacity] = now - self.last
            self.count += 1
        self.last = now

    def recent(self, n: int) -> list[float]:
        count = self.count
        n = min(n, count, self.capacity)
        return [self.durations[i % self.capacity] for i in range(count - n, count)]

    def first(self, start: int, n: int) -> list[float] | None:
        """Durations of steps ``start`` to ``start + n`` (counting from the first), while still in the ring."""
        if self.count < start + n or self.count - start > self.capacity:
            return None
        return [self.durations[i % self.capacity] for i in range(start, start + n)]


class SlowdownDetector:
    """Compares the median of recent steps with a baseline taken after warm-up."""

    def __init__(self, config: GuardConfig, clock: StepClock) -> None:
        self.config = config
        self.clock = clock
        self.baseline_s: float | None = None
        self._since: float | None = None

    def check(self, clock_events: list[str] | None = None) -> Reason | None:
        """A DEGRADED (performance) reason while steps run slower than the baseline allows."""
        c = self.config
        if self.baseline_s is None:
            first = self.clock.first(c.step_warmup_steps, c.step_baseline_steps)
            if first is None:
                return None
            self.baseline_s = statistics.median(first)
        recent = self.clock.recent(c.step_window_steps)
        if len(recent) < c.step_window_steps or self.clock.count < c.step_warmup_steps + c.step_baseline_steps:
            return None
        current = statistics.median(recent)
        slowdown = current / self.baseline_s - 1 if self.baseline_s > 0 else 0.0
        if slowdown <= c.step_slowdown:
            self._since = None
            return None
        now = time.monotonic()
        self._since = self._since or now
        hardware = [e for e in (clock_events or []) if e in HARDWARE_CLOCK_EVENTS]
        cause = f"; the GPU reports {', '.join(hardware)}" if hardware else ""
        return Reason(
            "STEP_TIME_SLOWDOWN",
            HealthState.DEGRADED,
            f"steps take {current * 1000:.1f} ms, {slowdown:.0%} over the run's baseline of "
            f"{self.baseline_s * 1000:.1f} ms{cause}",
            Remedy.CONTACT_SUPPORT,
            {
                "step_ms": round(current * 1000, 3),
                "baseline_ms": round(self.baseline_s * 1000, 3),
                "slowdown": round(slowdown, 4),
                "threshold": c.step_slowdown,
                "clock_events": hardware,
            },
            self._since,
        )
