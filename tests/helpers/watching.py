"""A threaded HealthMonitor over a fake NVML whose scenario clock the test moves by hand.

The monitor's own threads poll and wait for events (on wall time, every few milliseconds); scenario
time stands still until the test sets it, so each step is awaited as a condition, never as a sleep.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from gpuguard import HealthConfig, HealthMonitor, HealthSnapshot
from gpuguard.fakenvml import FakeNvml

HANG_GUARD_S = 30.0


@contextlib.contextmanager
def watching(
    scenario: dict[str, Any], devices: Any = "all", realtime: bool = False, **config: Any
) -> Iterator[tuple[FakeNvml, HealthMonitor]]:
    fake = FakeNvml.from_scenario(scenario, realtime=realtime)
    settings = {"poll_interval_s": 0.02, "event_wait_s": 0.05, **config}
    with HealthMonitor(fake, HealthConfig(**settings), devices=devices) as monitor:
        yield fake, monitor


def wait_for(monitor: HealthMonitor, predicate: Callable[[HealthSnapshot], bool]) -> HealthSnapshot:
    """The first snapshot the predicate accepts; fails with the last one after the hang guard."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate(monitor.snapshot()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {monitor.snapshot().to_dict()}")
        time.sleep(0.01)
    return monitor.snapshot()


def settle(monitor: HealthMonitor, polls: int = 2) -> HealthSnapshot:
    """The snapshot after ``polls`` more polls by the monitor's thread (after the test moved the clock)."""
    start = monitor.polls
    deadline = time.monotonic() + HANG_GUARD_S
    while monitor.polls < start + polls:
        if time.monotonic() > deadline:
            raise AssertionError("the poll thread did not poll")
        time.sleep(0.005)
    return monitor.snapshot()
