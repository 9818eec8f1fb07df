from __future__ import annotations

from typing import TYPE_CHECKING

from gpuguard.fakenvml._fake import FakeNvml

if TYPE_CHECKING:
    from gpuguard.health.model import HealthSnapshot
    from gpuguard.health.monitor import HealthMonitor


def play(monitor: HealthMonitor, until: float, *, step_s: float | None = None) -> HealthSnapshot:
    """Fast-forward a monitor over a fake NVML's scenario to scenario time ``until``.

    The clock moves in steps of the poll interval; at each step the monitor takes the events that
    are due and polls, exactly as its threads would live, so rates and hysteresis come out the same.
    Start the monitor with ``start(threads=False)`` first.

    Raises:
        TypeError: when the monitor is not reading a `FakeNvml` with a manual clock.
    """
    fake = monitor.source.nvml
    if not isinstance(fake, FakeNvml) or fake.clock.realtime:
        raise TypeError("play() drives a HealthMonitor over a FakeNvml with a manual clock")
    step = step_s or monitor.config.poll_interval_s
    snapshot = monitor.snapshot()
    while fake.clock() < until:
        fake.clock.set(min(until, fake.clock() + step))
        monitor.process_events(0.0)
        snapshot = monitor.poll()
    return snapshot
