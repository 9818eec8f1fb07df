"""Step time: the gradual slowdown that probes never see, against the run's own baseline.

A slower step is not evidence about a GPU: a slow input pipeline, shared storage, a slow peer, a
garbage-collection pause or a busy CPU look the same, and moving the job fixes none of them while
costing a restart and a reschedule. So step time alone only warns (once per episode, with a count of
repeats), logs and feeds the ``gpuguard_step_*`` metrics. It becomes a DEGRADED reason — which the
ladder escalates like any other — only when corroborated:

- NVML evidence on this rank's GPU: a clock event that costs speed (hardware slowdown, thermal,
  power brake, the driver's thermal slowdown), thermal or power violation time, PCIe replays or NVLink
  errors that rose since the baseline was taken, or an active NVML reason of that kind; and
- this rank much slower than its peers: its median step at least ``step_slowdown`` over the fastest
  rank's at the last agreement (with a single rank there are no peers to compare, and the NVML
  evidence decides alone).

In synchronous data parallelism every rank's step lasts as long as the slowest rank's, so no rank is
slower than its peers and step time never moves such a job by itself: the NVML rules (clock events,
violations, link errors, with their own hysteresis) do. ``evacuate_on_slowdown_alone=True`` restores
acting on step time alone, for jobs that know their slowdowns are the GPU's.
"""

from __future__ import annotations

import logging
import statistics
import time
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gpuguard.guard.config import GuardConfig
from gpuguard.health.model import DeviceHealth, HealthState, Reason, Remedy
from gpuguard.health.signals import NVLINK_ERROR_SIGNALS, SLOWDOWN_CLOCK_EVENTS

log = logging.getLogger("gpuguard")

# Counters whose rise since the baseline says the GPU itself lost speed or time (nvml.h field names).
EVIDENCE_COUNTERS: Final[tuple[str, ...]] = (
    "thermal_violation_ns",
    "power_violation_ns",
    "pcie_replay",
    *NVLINK_ERROR_SIGNALS,
)
# Active NVML reasons that speak of speed (clocks, heat, power, links), as opposed to, say, ECC.
EVIDENCE_REASONS: Final[tuple[str, ...]] = (
    "CLOCK_EVENT",
    "THERMAL_VIOLATION",
    "POWER_VIOLATION",
    "TEMPERATURE_NEAR_SLOWDOWN",
    "MEMORY_TEMPERATURE_NEAR_MAX",
    "PCIE_REPLAY_RATE",
    "PCIE_LINK_DEGRADED",
    "NVLINK_",
)


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


@dataclass(frozen=True)
class Peers:
    """The ranks' median step times at the last agreement: the fastest and the slowest, with their ranks."""

    world_size: int
    fastest_rank: int
    fastest_s: float
    slowest_rank: int
    slowest_s: float


@dataclass(frozen=True)
class StepTime:
    """The latest comparison with the baseline (for metrics and logs), slow or not."""

    step_s: float
    baseline_s: float

    @property
    def slowdown(self) -> float:
        return self.step_s / self.baseline_s - 1 if self.baseline_s > 0 else 0.0


def gpu_evidence(device: DeviceHealth, counters_at_baseline: Mapping[str, float]) -> list[str]:
    """What NVML says about this GPU's speed, in words; empty when it says nothing."""
    found = []
    events = [e for e in device.readings.get("clock_events", []) if e in SLOWDOWN_CLOCK_EVENTS]
    if events:
        found.append(f"clock events {', '.join(events)}")
    for name in EVIDENCE_COUNTERS:
        now, then = device.readings.get(name), counters_at_baseline.get(name)
        if isinstance(now, (int, float)) and isinstance(then, (int, float)) and now > then:
            found.append(f"{name} rose by {now - then:g} since the baseline")
    found += [
        f"{r.code} ({r.state.value})"
        for r in device.reasons
        if r.state.severity >= HealthState.DEGRADED.severity and r.code.startswith(EVIDENCE_REASONS)
    ]
    return found


class SlowdownDetector:
    """Compares the median of recent steps with a baseline taken after warm-up, and decides whether a
    slowdown is corroborated enough to count as a DEGRADED reason (see the module's docstring).

    Runs on the guard's thread; `peers` is written by the training thread at each agreement (one
    reference assignment).
    """

    def __init__(self, config: GuardConfig, clock: StepClock) -> None:
        self.config = config
        self.clock = clock
        self.baseline_s: float | None = None
        self.latest: StepTime | None = None
        self.peers: Peers | None = None
        self.ignored = 0  # checks that found a slowdown and did not act on it, over the run
        self._since: float | None = None
        self._warned = False
        self._counters: dict[str, dict[str, float]] = {}  # uuid -> counters when the baseline was taken

    def measure(self) -> StepTime | None:
        """The recent median against the baseline, once both exist."""
        c = self.config
        if self.baseline_s is None:
            first = self.clock.first(c.step_warmup_steps, c.step_baseline_steps)
            if first is None:
                return None
            self.baseline_s = statistics.median(first)
        recent = self.clock.recent(c.step_window_steps)
        if len(recent) < c.step_window_steps or self.clock.count < c.step_warmup_steps + c.step_baseline_steps:
            return None
        self.latest = StepTime(statistics.median(recent), self.baseline_s)
        return self.latest

    def check(self, device: DeviceHealth, world_size: int = 1) -> Reason | None:
        """A DEGRADED (performance) reason for ``device`` while its steps run slower than the baseline
        allows and the slowdown is corroborated (or ``evacuate_on_slowdown_alone``); None otherwise."""
        c = self.config
        measured = self.measure()
        if measured is None:
            return None
        baseline_counters = self._counters.setdefault(
            device.uuid, {k: float(device.readings[k]) for k in EVIDENCE_COUNTERS if _number(device.readings.get(k))}
        )
        if measured.slowdown <= c.step_slowdown:
            self._end_episode()
            return None
        now = time.monotonic()
        self._since = self._since or now
        evidence = gpu_evidence(device, baseline_counters)
        peers = self._compare_with_peers(measured, world_size)
        corroborated = bool(evidence) and peers["slower_than_peers"]
        if not (corroborated or c.evacuate_on_slowdown_alone):
            self._ignore(device, measured, evidence, peers)
            return None
        cause = f"; the GPU reports {'; '.join(evidence)}" if evidence else ""
        return Reason(
            "STEP_TIME_SLOWDOWN",
            HealthState.DEGRADED,
            f"steps take {measured.step_s * 1000:.1f} ms, {measured.slowdown:.0%} over the run's baseline of "
            f"{measured.baseline_s * 1000:.1f} ms{cause}",
            Remedy.CONTACT_SUPPORT,
            {
                "step_ms": round(measured.step_s * 1000, 3),
                "baseline_ms": round(measured.baseline_s * 1000, 3),
                "slowdown": round(measured.slowdown, 4),
                "threshold": c.step_slowdown,
                "gpu_evidence": evidence,
                "peers": peers,
                "acted_on": "gpu evidence and peers" if corroborated else "evacuate_on_slowdown_alone",
            },
            self._since,
        )

    def _compare_with_peers(self, measured: StepTime, world_size: int) -> dict[str, Any]:
        if world_size <= 1:
            return {"world_size": 1, "slower_than_peers": True}  # no peers: the GPU's evidence decides
        peers = self.peers
        if peers is None:
            return {"world_size": world_size, "slower_than_peers": False}
        slower = measured.step_s >= (1 + self.config.step_slowdown) * peers.fastest_s
        return {
            "world_size": peers.world_size,
            "slower_than_peers": slower,
            "fastest_rank": peers.fastest_rank,
            "fastest_ms": round(peers.fastest_s * 1000, 3),
            "slowest_rank": peers.slowest_rank,
            "slowest_ms": round(peers.slowest_s * 1000, 3),
        }

    def _ignore(self, device: DeviceHealth, measured: StepTime, evidence: list[str], peers: dict[str, Any]) -> None:
        self.ignored += 1
        if self._warned:
            return
        self._warned = True
        missing = []
        if not evidence:
            missing.append(f"NVML reports nothing on GPU {device.index} that would slow it")
        if not peers["slower_than_peers"]:
            fastest = peers.get("fastest_ms")
            missing.append(
                "this rank is not slower than its peers"
                + (f" (the fastest, rank {peers['fastest_rank']}, takes {fastest:.1f} ms)" if fastest else "")
            )
        log.warning(
            "gpuguard: steps take %.1f ms, %.0f%% over the run's baseline of %.1f ms; not moving the job: %s. "
            "Step time alone only warns (set evacuate_on_slowdown_alone=True to act on it); said once per "
            "episode, gpuguard_step_slowdown tracks it",
            measured.step_s * 1000,
            measured.slowdown * 100,
            measured.baseline_s * 1000,
            "; ".join(missing),
        )

    def _end_episode(self) -> None:
        if self._since is not None and self._warned:
            log.info(
                "gpuguard: steps back within %.0f%% of the baseline after %.0fs (%d slow check(s) not acted on so far)",
                self.config.step_slowdown * 100,
                time.monotonic() - self._since,
                self.ignored,
            )
        self._since = None
        self._warned = False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
