"""Thresholds and timings of the health rules; every one is configuration."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gpuguard.errors import ConfigError
from gpuguard.health.xid import DEFAULT_APPLICATION_XIDS

FailMode = Literal["open", "closed"]


@dataclass(frozen=True)
class HealthConfig:
    """How the monitor polls and when its rules fire.

    Hysteresis: a rate or sustained condition must hold for ``onset_s`` before it marks a GPU, and a
    reason clears only after its condition has been absent for ``quiet_s`` — one event is not a trend.
    Hard faults act at once and clear when the hardware says so, without a restart: a counter or flag
    that reads clear again (volatile double-bit ECC back to 0 after a GPU reset, a row remap no longer
    pending, the recovery action back to NONE, every NVLink up, the GPU answering again after LOST or
    RESET_REQUIRED); an XID or an event after ``xid_hold_s`` (``quiet_s`` for XIDs that do not fault the
    GPU) with no new one, or as soon as a GPU reset is seen after it. Each reason says how it clears
    (`Reason.clears`).

    Attributes:
        poll_interval_s: seconds between field polls; detection latency, not cost, sets it (a cycle
            costs about 1 ms per GPU on an H200).
        event_wait_s: how long the event thread blocks in one ``nvmlEventSetWait`` (it checks for
            shutdown in between).
        rate_window_s: window over which counter rates are computed.
        onset_s: how long a soft condition must hold before it counts.
        quiet_s: how long a soft condition must be absent before its reason clears.
        ecc_sbe_per_min: single-bit ECC errors per minute above which a GPU is DEGRADED.
        pcie_replay_per_lane_per_min: PCIe replays per minute per active lane (Gen5: 1.92) above
            which a GPU is DEGRADED.
        nvlink_errors_per_min: NVLink CRC errors in the last minute at or above which a GPU is DEGRADED
            (DCGM warns at 1).
        nvlink_crc_per_s: NVLink CRC errors per second at or above which a GPU is FAILING (DCGM: 100).
        nvlink_replay_recovery_per_min: NVLink replay plus recovery errors in the last minute at or above
            which a GPU is FAILING (DCGM: 1).
        violation_fraction: share of time the clocks may be held by thermal or power limits before
            (sustained ``clock_event_onset_s``) a GPU is DEGRADED; DCGM's watches warn on any (0).
        temperature_margin_c: DEGRADED within this many degrees of the slowdown threshold.
        clock_event_onset_s: how long a hardware slowdown, thermal or power-brake clock event must
            persist before it counts.
        load_utilization_pct: GPU utilization at or above which the PCIe link should run at full width.
        xid_hold_s: how long an XID (or NVML event) that faults a GPU stays a reason after its last
            occurrence, when nothing else shows a reset; the counters that come with it (a double-bit
            ECC count with XID 48) hold their own verdict for as long as they read so.
        application_xids: XIDs that come from the program and never mark a GPU on their own.
        driver_retries: retries of an NVML call that timed out, within one poll.
        unresponsive_polls: consecutive failed polls after which a device is UNKNOWN.
        fail_mode: what UNKNOWN means to callers: ``open`` treats it as usable, ``closed`` as not.
    """

    poll_interval_s: float = 1.0
    event_wait_s: float = 1.0
    rate_window_s: float = 30.0
    onset_s: float = 3.0
    quiet_s: float = 30.0
    ecc_sbe_per_min: float = 100.0
    pcie_replay_per_lane_per_min: float = 1.92
    nvlink_errors_per_min: float = 1.0
    nvlink_crc_per_s: float = 100.0
    nvlink_replay_recovery_per_min: float = 1.0
    violation_fraction: float = 0.0
    temperature_margin_c: float = 5.0
    clock_event_onset_s: float = 10.0
    load_utilization_pct: float = 20.0
    xid_hold_s: float = 300.0
    application_xids: frozenset[int] = field(default=DEFAULT_APPLICATION_XIDS)
    driver_retries: int = 2
    unresponsive_polls: int = 3
    fail_mode: FailMode = "open"

    def __post_init__(self) -> None:
        positive = ("poll_interval_s", "event_wait_s", "rate_window_s")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, value, "must be a number of seconds greater than 0")
        non_negative = (
            "onset_s",
            "quiet_s",
            "ecc_sbe_per_min",
            "pcie_replay_per_lane_per_min",
            "nvlink_errors_per_min",
            "nvlink_crc_per_s",
            "nvlink_replay_recovery_per_min",
            "violation_fraction",
            "temperature_margin_c",
            "clock_event_onset_s",
            "load_utilization_pct",
            "xid_hold_s",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(name, value, "must be a number, 0 or greater")
        for name, lowest in (("driver_retries", 0), ("unresponsive_polls", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ConfigError(name, value, f"must be a whole number, {lowest} or greater")
        if self.fail_mode not in ("open", "closed"):
            raise ConfigError("fail_mode", self.fail_mode, "allowed: 'open', 'closed'")
        xids: Any = self.application_xids
        if not isinstance(xids, frozenset):  # a list or set from YAML or keyword arguments
            try:
                xids = frozenset(int(x) for x in xids)
            except (TypeError, ValueError):
                raise ConfigError("application_xids", self.application_xids, "must be a list of XID numbers") from None
            object.__setattr__(self, "application_xids", xids)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "health") -> HealthConfig:
        """Build from a mapping (a YAML or JSON section), rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                allowed = "unknown setting; allowed: " + ", ".join(sorted(known))
                raise ConfigError(f"{source}.{key}", values[key], allowed)
        return cls(**dict(values))
