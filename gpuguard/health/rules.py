"""The health rules: from raw NVML readings and events to reasons with evidence.

`DeviceRules` holds one GPU's history (counter windows, how long each condition has held) and is
fed by the monitor's threads; it never calls NVML itself, so tests drive it with plain samples.
The rules follow DCGM's health watches; every threshold comes from `HealthConfig`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuguard.health.config import HealthConfig
from gpuguard.health.model import HealthState, Reason, Remedy
from gpuguard.health.signals import (
    FABRIC_STATES,
    RECOVERY_ACTIONS,
    SLOWDOWN_CLOCK_EVENTS,
    clock_event_names,
)
from gpuguard.health.xid import XidTable

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
    """

    at: float
    readings: Mapping[str, Reading] = field(default_factory=dict)
    lost: bool = False
    error: str | None = None
    reset_required: bool = False
    errors: tuple[str, ...] = ()
    call: str | None = None


@dataclass(frozen=True)
class DeviceEvent:
    """An NVML event for one GPU.

    ``kind`` is a key of `gpuguard.health.signals.EVENT_TYPES`; ``xid`` is set when it is ``"xid"``.
    """

    at: float
    kind: str
    xid: int | None = None


@dataclass(frozen=True)
class DeviceLimits:
    """What a GPU is built for, read once at start-up; None where NVML does not say."""

    pcie_max_link_width: int | None = None
    pcie_generation: int | None = None
    temperature_slowdown_c: float | None = None
    memory_temperature_max_c: float | None = None
    nvlink_links: int = 0


class _Persistence:
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


class _Rate:
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

    def increase(self) -> tuple[float, float]:
        """How much the counter grew over the points kept, and over how many seconds."""
        if len(self._points) < 2:
            return 0.0, 0.0
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        return v1 - v0, t1 - t0

    def per_minute(self) -> float:
        """Increase per minute, averaged over the whole window even before a window has passed.

        Dividing by the window rather than by the time seen so far keeps one burst at start-up from
        reading as a storm: one event is not a trend.
        """
        if len(self._points) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        return (v1 - v0) / max(t1 - t0, self.window_s) * 60.0


class DeviceRules:
    """Evaluates one GPU.

    Call `observe` with each poll and `record_event` with each NVML event, then `reasons` for the
    active reasons. Not thread-safe by itself: the monitor serialises calls.

    Example:
        >>> rules = DeviceRules(HealthConfig(), XidTable(), DeviceLimits())
        >>> rules.observe(Sample(at=0.0, readings={"ecc_dbe_volatile": 1}))
        >>> [r.code for r in rules.reasons(0.0)]
        ['ECC_DBE_VOLATILE']
    """

    def __init__(self, config: HealthConfig, xids: XidTable, limits: DeviceLimits) -> None:
        self.config = config
        self.xids = xids
        self.limits = limits
        self.readings: dict[str, Reading] = {}
        self._active: dict[str, Reason] = {}
        c = config
        self._rates = {
            "ecc_sbe_volatile": _Rate(c.rate_window_s),
            "pcie_replay": _Rate(c.rate_window_s),
            "thermal_violation_ns": _Rate(c.rate_window_s),
            "power_violation_ns": _Rate(c.rate_window_s),
            # DCGM's NVLink rules look at the last minute.
            "nvlink_crc": _Rate(60.0),
            "nvlink_replay_recovery": _Rate(60.0),
        }
        self._persist = {
            "ECC_SBE_RATE": _Persistence(c.onset_s, c.quiet_s),
            "PCIE_REPLAY_RATE": _Persistence(c.onset_s, c.quiet_s),
            "PCIE_LINK_DEGRADED": _Persistence(c.onset_s, c.quiet_s),
            "CLOCK_EVENT": _Persistence(c.clock_event_onset_s, c.quiet_s),
            "TEMPERATURE_NEAR_SLOWDOWN": _Persistence(c.onset_s, c.quiet_s),
            "MEMORY_TEMPERATURE_NEAR_MAX": _Persistence(c.onset_s, c.quiet_s),
            "NVLINK_ERROR_RATE": _Persistence(c.onset_s, c.quiet_s),
            "NVLINK_CRC_ERROR_RATE": _Persistence(0.0, c.quiet_s),
            "NVLINK_REPLAY_RECOVERY": _Persistence(0.0, c.quiet_s),
            "THERMAL_VIOLATION": _Persistence(c.clock_event_onset_s, c.quiet_s),
            "POWER_VIOLATION": _Persistence(c.clock_event_onset_s, c.quiet_s),
            "FABRIC_NOT_READY": _Persistence(c.onset_s, c.quiet_s),
        }
        self._xid_seen: dict[int, tuple[float, int]] = {}  # xid -> (last seen, count)
        self._failed_polls = 0
        self._ever_read = False
        self._last_error: str | None = None

    # -- inputs ---------------------------------------------------------------------------------

    def observe(self, sample: Sample) -> None:
        now = sample.at
        if sample.lost:
            evidence = {"nvml_error": "NVML_ERROR_GPU_IS_LOST", "code": 15, "call": sample.call}
            self._hard("GPU_LOST", HealthState.LOST, Remedy.REBOOT, "NVML reports the GPU is lost", evidence, now)
            return
        if sample.reset_required:
            # nvml.h: NVML_ERROR_RESET_REQUIRED, "the GPU requires a reset before it can be used again".
            self._hard(
                "GPU_RESET_REQUIRED",
                HealthState.FAILING,
                Remedy.RESET_GPU,
                "NVML answers RESET_REQUIRED: the GPU must be reset before it can be used again",
                {"nvml_error": "NVML_ERROR_RESET_REQUIRED", "code": 16, "call": sample.call},
                now,
            )
        if not sample.readings:
            if sample.error is not None:
                self._failed_polls += 1
                self._last_error = sample.error
            return
        self._ever_read = True
        self._failed_polls = 0
        self._last_error = None
        self.readings.update(sample.readings)
        r = sample.readings
        self._check_hard_fields(r, now)
        self._check_rates(r, now)
        self._check_sustained(r, now)

    def record_event(self, event: DeviceEvent) -> None:
        now = event.at
        if event.kind == "xid" and event.xid is not None:
            self._record_xid(event.xid, now)
        elif event.kind == "double_bit_ecc":
            self._hard(
                "ECC_DBE_VOLATILE",
                HealthState.FAILING,
                Remedy.RESET_GPU,
                "double-bit ECC error event",
                {"event": "nvmlEventTypeDoubleBitEccError"},
                now,
            )
        elif event.kind == "dram_retirement_failure":
            self._hard(
                "ROW_REMAP_FAILURE",
                HealthState.FAILING,
                Remedy.RESET_GPU,
                "DRAM retirement (row remap) failed",
                {"event": "nvmlEventTypeDramRetirementFailure"},
                now,
            )
        elif event.kind == "gpu_unavailable":
            self._hard(
                "GPU_LOST",
                HealthState.LOST,
                Remedy.REBOOT,
                "NVML reports the GPU unavailable",
                {"event": "nvmlEventTypeGpuUnavailableError"},
                now,
            )
        # recovery_action and sbe_storm events carry no verdict of their own: the monitor polls at
        # once on them, and the field rules judge the fresh values.

    # -- output ---------------------------------------------------------------------------------

    def reasons(self, now: float) -> tuple[Reason, ...]:
        """Active reasons, worst first; includes UNKNOWN when NVML has stopped answering."""
        self._expire_observations(now)
        reasons = list(self._active.values())
        # A GPU that has never answered is UNKNOWN at once (a one-shot status must not call it HEALTHY);
        # one that has answered before gets `unresponsive_polls` chances, as a driver hiccup is common.
        if self._failed_polls and (not self._ever_read or self._failed_polls >= self.config.unresponsive_polls):
            what = "no NVML reading of this GPU succeeded" if not self._ever_read else "NVML failed"
            reasons.append(
                Reason(
                    "NVML_UNRESPONSIVE",
                    HealthState.UNKNOWN,
                    f"{what} ({self._failed_polls} poll(s) in a row): {self._last_error}",
                    Remedy.OBSERVE,
                    {"failed_polls": self._failed_polls, "error": self._last_error},
                    now,
                )
            )
        reasons.sort(key=lambda r: (-r.state.severity, r.since, r.code))
        return tuple(reasons)

    # -- rules ----------------------------------------------------------------------------------

    def _hard(
        self,
        code: str,
        state: HealthState,
        remedy: Remedy,
        message: str,
        evidence: dict[str, Any],
        now: float,
    ) -> None:
        """A fault that acts at once and stays until the GPU is reset (the process restarts)."""
        if code not in self._active or self._active[code].state.severity < state.severity:
            self._active[code] = Reason(code, state, message, remedy, evidence, now)

    def _soft(self, code: str, condition: bool, now: float, reason: Reason) -> None:
        if self._persist[code].update(condition, now):
            if condition or code not in self._active:
                # While the condition is absent but not yet quiet long enough, the reason keeps the
                # values that triggered it, not the current (clearing) ones.
                since = self._persist[code].active_since
                self._active[code] = Reason(
                    reason.code, reason.state, reason.message, reason.remedy, reason.evidence, since
                )
        else:
            self._active.pop(code, None)

    def _check_hard_fields(self, r: Mapping[str, Reading], now: float) -> None:
        dbe = r.get("ecc_dbe_volatile")
        if dbe:
            self._hard(
                "ECC_DBE_VOLATILE",
                HealthState.FAILING,
                Remedy.RESET_GPU,
                f"{int(dbe)} volatile double-bit ECC error(s)",
                {"ecc_dbe_volatile": dbe, "threshold": 0},
                now,
            )
        if r.get("remap_pending"):
            # NVIDIA's A100/H100 memory error management guide: a pending remap takes effect at the next
            # GPU reset, and work may continue until a convenient time. The recovery action field, a
            # reason of its own, says when the driver wants more.
            self._hard(
                "ROW_REMAP_PENDING",
                HealthState.DEGRADED,
                Remedy.RESET_GPU,
                "a row remap is pending; reset the GPU at a convenient time",
                {"remap_pending": r["remap_pending"]},
                now,
            )
        if r.get("remap_failure"):
            # DCGM_FR_ROW_REMAP_FAILURE; next step (dcgm_errors.h): run the field diagnostic.
            self._hard(
                "ROW_REMAP_FAILURE",
                HealthState.FAILING,
                Remedy.CONTACT_SUPPORT,
                "a row remap failed: the GPU has no spare rows left for the failing memory",
                {"remap_failure": r["remap_failure"]},
                now,
            )
        action = r.get("recovery_action")
        if action:
            name = RECOVERY_ACTIONS.get(int(action), f"UNKNOWN_{int(action)}")
            state, remedy = _RECOVERY_VERDICTS.get(name, (HealthState.DEGRADED, Remedy.CONTACT_SUPPORT))
            self._hard(
                "RECOVERY_ACTION",
                state,
                remedy,
                f"the driver asks for recovery action {name}",
                {"recovery_action": name},
                now,
            )
        down = r.get("nvlink_down")
        if down:
            # DCGM's NVLink watch fails any link whose state is down, whenever it went down.
            mask = int(r.get("nvlink_down_links", 0))
            links = [i for i in range(64) if mask >> i & 1]
            named = ", ".join(str(i) for i in links) if links else "?"
            self._hard(
                "NVLINK_DOWN",
                HealthState.FAILING,
                Remedy.RESET_GPU,
                f"NVLink link(s) {named} down ({int(down)} of {self.limits.nvlink_links})",
                {"links_down": links, "nvlink_down": int(down), "nvlink_links": self.limits.nvlink_links},
                now,
            )

    def _check_rates(self, r: Mapping[str, Reading], now: float) -> None:
        c = self.config
        if "ecc_sbe_volatile" in r:
            rate = self._rates["ecc_sbe_volatile"]
            rate.add(now, float(r["ecc_sbe_volatile"]))
            per_min = rate.per_minute()
            self._soft(
                "ECC_SBE_RATE",
                per_min > c.ecc_sbe_per_min,
                now,
                Reason(
                    "ECC_SBE_RATE",
                    HealthState.DEGRADED,
                    f"single-bit ECC errors at {per_min:.0f}/min (threshold {c.ecc_sbe_per_min:g}/min)",
                    # DCGM_FR_VOLATILE_SBE_DETECTED_NEXT: "Monitor - this GPU can still perform workload."
                    Remedy.OBSERVE,
                    _evidence(
                        rate_per_min=per_min,
                        threshold_per_min=c.ecc_sbe_per_min,
                        window_s=c.rate_window_s,
                        ecc_sbe_volatile=r["ecc_sbe_volatile"],
                    ),
                ),
            )
        if "pcie_replay" in r:
            rate = self._rates["pcie_replay"]
            rate.add(now, float(r["pcie_replay"]))
            per_min = rate.per_minute()
            lanes = int(self.readings.get("pcie_link_width") or self.limits.pcie_max_link_width or 16)
            # The per-lane rate is the Gen5 one (32 GT/s at a bit error rate of 1e-12: 1.92/min); a
            # slower link carries proportionally fewer bits, so it may replay proportionally less.
            gen = self.limits.pcie_generation
            scale = _PCIE_GT_S.get(gen, 32.0) / 32.0 if gen else 1.0
            threshold = lanes * c.pcie_replay_per_lane_per_min * scale
            self._soft(
                "PCIE_REPLAY_RATE",
                per_min > threshold,
                now,
                Reason(
                    "PCIE_REPLAY_RATE",
                    HealthState.DEGRADED,
                    f"PCIe replays at {per_min:.1f}/min over {lanes} lanes (threshold {threshold:.2f}/min)",
                    # DCGM_FR_PCI_REPLAY_RATE_NEXT: reseat the card, run the PCIe and field diagnostics.
                    Remedy.CONTACT_SUPPORT,
                    _evidence(
                        rate_per_min=per_min,
                        threshold_per_min=threshold,
                        lanes=lanes,
                        pcie_generation=gen,
                        window_s=c.rate_window_s,
                    ),
                ),
            )
        self._check_nvlink_errors(r, now)
        self._check_violations(r, now)
        self._check_fabric(r, now)

    def _check_fabric(self, r: Mapping[str, Reading], now: float) -> None:
        """NVSwitch systems: a GPU whose fabric registration failed cannot use NVLink (CUDA reports the
        system not ready); one still registering is not ready yet. NVIDIA Fabric Manager user guide;
        DCGM_FR_CUDA_FM_NOT_INITIALIZED_NEXT: "Ensure that the FabricManager is running without errors."
        """
        if "fabric_state" not in r:
            return
        state, status = int(r["fabric_state"]), int(r.get("fabric_status", 0))
        name = FABRIC_STATES.get(state, str(state))
        if state == 3 and status != 0:
            self._hard(
                "FABRIC_REGISTRATION_FAILED",
                HealthState.FAILING,
                Remedy.CONTACT_SUPPORT,
                f"NVSwitch fabric registration failed (NVML error {status}); check the fabric manager",
                {"fabric_state": name, "fabric_status": status},
                now,
            )
        self._soft(
            "FABRIC_NOT_READY",
            state in (1, 2),
            now,
            Reason(
                "FABRIC_NOT_READY",
                HealthState.DEGRADED,
                f"NVSwitch fabric registration {name}; NVLink is not usable until it completes",
                Remedy.OBSERVE,
                {"fabric_state": name},
            ),
        )

    def _check_nvlink_errors(self, r: Mapping[str, Reading], now: float) -> None:
        """DCGM's NVLink rules (DcgmHealthWatch::MonitorNVLink, dcgm GpuHardwareLimits.h), over the last minute.

        Replay or recovery errors: any (``nvlink_replay_recovery_per_min``, DCGM_LIMIT_MAX_NVLINK_ERROR = 1)
        fails the GPU. CRC errors: at ``nvlink_crc_per_s`` (DCGM_LIMIT_MAX_NVLINK_CRC_ERROR = 100/s) they
        fail it; at ``nvlink_errors_per_min`` (DCGM warns at 1) they degrade it.
        """
        c = self.config
        crc = [n for n in ("nvlink_crc_flit_errors", "nvlink_crc_data_errors") if n in r]
        if crc:
            rate = self._rates["nvlink_crc"]
            rate.add(now, float(sum(r[n] for n in crc)))
            count, span = rate.increase()
            per_s = count / span if span > 0 else 0.0
            self._soft(
                "NVLINK_CRC_ERROR_RATE",
                count > 0 and per_s >= c.nvlink_crc_per_s,
                now,
                Reason(
                    "NVLINK_CRC_ERROR_RATE",
                    HealthState.FAILING,
                    f"NVLink CRC errors at {per_s:.0f}/s (threshold {c.nvlink_crc_per_s:g}/s)",
                    Remedy.CONTACT_SUPPORT,  # DCGM_FR_NVLINK_CRC_ERROR_THRESHOLD_NEXT: field diagnostic
                    _evidence(rate_per_s=per_s, threshold_per_s=c.nvlink_crc_per_s, errors=count, window_s=60.0),
                ),
            )
            per_min = count / max(span, 60.0) * 60.0
            self._soft(
                "NVLINK_ERROR_RATE",
                count > 0 and per_min >= c.nvlink_errors_per_min,
                now,
                Reason(
                    "NVLINK_ERROR_RATE",
                    HealthState.DEGRADED,
                    f"NVLink CRC errors: {count:.0f} in the last minute (threshold {c.nvlink_errors_per_min:g}/min)",
                    Remedy.OBSERVE,  # DCGM_FR_NVLINK_ERROR_THRESHOLD_NEXT: "It can still perform workload."
                    _evidence(errors=count, threshold_per_min=c.nvlink_errors_per_min, counters=crc, window_s=60.0),
                ),
            )
        rr = [n for n in ("nvlink_replay_errors", "nvlink_recovery_errors") if n in r]
        if rr:
            rate = self._rates["nvlink_replay_recovery"]
            rate.add(now, float(sum(r[n] for n in rr)))
            count, span = rate.increase()
            per_min = count / max(span, 60.0) * 60.0
            self._soft(
                "NVLINK_REPLAY_RECOVERY",
                count > 0 and per_min >= c.nvlink_replay_recovery_per_min,
                now,
                Reason(
                    "NVLINK_REPLAY_RECOVERY",
                    HealthState.FAILING,
                    f"NVLink replay/recovery errors: {count:.0f} in the last minute "
                    f"(threshold {c.nvlink_replay_recovery_per_min:g}/min)",
                    Remedy.CONTACT_SUPPORT,  # DCGM_FR_NVLINK_ERROR_CRITICAL_NEXT: field diagnostic
                    _evidence(
                        errors=count,
                        threshold_per_min=c.nvlink_replay_recovery_per_min,
                        counters={n: r[n] for n in rr},
                        window_s=60.0,
                    ),
                ),
            )

    def _check_violations(self, r: Mapping[str, Reading], now: float) -> None:
        """DCGM's thermal and power watches: time spent with clocks held by a limit is a performance fault.

        DCGM reads DCGM_FI_DEV_THERMAL_VIOLATION / DCGM_FI_DEV_POWER_VIOLATION (nvmlDeviceGetViolationStatus,
        the counters these fields hold) and warns when they grow; here a share of time above
        ``violation_fraction`` held for ``clock_event_onset_s`` makes the GPU DEGRADED.
        """
        c = self.config
        for name, code, what, remedy in (
            ("thermal_violation_ns", "THERMAL_VIOLATION", "thermal", Remedy.CONTACT_SUPPORT),  # check cooling
            # DCGM_FR_CLOCK_THROTTLE_POWER_NEXT: "Monitor the power conditions. This GPU can still perform workload."
            ("power_violation_ns", "POWER_VIOLATION", "power", Remedy.OBSERVE),
        ):
            if name not in r:
                continue
            rate = self._rates[name]
            rate.add(now, float(r[name]))
            held_ns, span = rate.increase()
            fraction = held_ns / 1e9 / span if span > 0 else 0.0
            self._soft(
                code,
                held_ns > 0 and fraction > c.violation_fraction,
                now,
                Reason(
                    code,
                    HealthState.DEGRADED,
                    f"clocks held by the {what} limit {fraction:.0%} of the time "
                    f"for {c.clock_event_onset_s:g}s or more",
                    remedy,
                    _evidence(held_s=held_ns / 1e9, window_s=span, fraction=fraction, threshold=c.violation_fraction),
                ),
            )

    def _check_sustained(self, r: Mapping[str, Reading], now: float) -> None:
        c, lim = self.config, self.limits
        if "clock_events" in r:
            active = [n for n in clock_event_names(int(r["clock_events"])) if n in SLOWDOWN_CLOCK_EVENTS]
            self._soft(
                "CLOCK_EVENT",
                bool(active),
                now,
                Reason(
                    "CLOCK_EVENT",
                    HealthState.DEGRADED,
                    f"clocks held down by {', '.join(active) or 'hardware'} for {c.clock_event_onset_s:g}s or more",
                    Remedy.CONTACT_SUPPORT,
                    _evidence(clock_events=active, onset_s=c.clock_event_onset_s),
                ),
            )
        temp = r.get("temperature")
        if temp is not None and lim.temperature_slowdown_c:
            limit = lim.temperature_slowdown_c - c.temperature_margin_c
            self._soft(
                "TEMPERATURE_NEAR_SLOWDOWN",
                temp >= limit,
                now,
                Reason(
                    "TEMPERATURE_NEAR_SLOWDOWN",
                    HealthState.DEGRADED,
                    f"GPU at {temp:g}°C, within {c.temperature_margin_c:g}°C of its slowdown "
                    f"threshold {lim.temperature_slowdown_c:g}°C",
                    Remedy.CONTACT_SUPPORT,
                    _evidence(
                        temperature_c=temp,
                        slowdown_c=lim.temperature_slowdown_c,
                        margin_c=c.temperature_margin_c,
                    ),
                ),
            )
        mem_temp = r.get("memory_temperature")
        if mem_temp is not None and lim.memory_temperature_max_c:
            limit = lim.memory_temperature_max_c - c.temperature_margin_c
            self._soft(
                "MEMORY_TEMPERATURE_NEAR_MAX",
                mem_temp >= limit,
                now,
                Reason(
                    "MEMORY_TEMPERATURE_NEAR_MAX",
                    HealthState.DEGRADED,
                    f"HBM at {mem_temp:g}°C, within {c.temperature_margin_c:g}°C of its maximum "
                    f"{lim.memory_temperature_max_c:g}°C",
                    Remedy.CONTACT_SUPPORT,
                    _evidence(
                        memory_temperature_c=mem_temp,
                        max_c=lim.memory_temperature_max_c,
                        margin_c=c.temperature_margin_c,
                    ),
                ),
            )
        # Width and utilization are read in turns: judge the latest of each when either is new.
        width, util = self.readings.get("pcie_link_width"), self.readings.get("utilization")
        fresh = "pcie_link_width" in r or "utilization" in r
        if fresh and width is not None and util is not None and lim.pcie_max_link_width:
            # Links down-train at idle to save power; only a narrow link under load is a fault.
            narrow = width < lim.pcie_max_link_width and util >= c.load_utilization_pct
            self._soft(
                "PCIE_LINK_DEGRADED",
                narrow,
                now,
                Reason(
                    "PCIE_LINK_DEGRADED",
                    HealthState.DEGRADED,
                    f"PCIe link at x{int(width)} of x{lim.pcie_max_link_width} under {util:g}% load",
                    Remedy.RESET_GPU,
                    _evidence(link_width=width, max_link_width=lim.pcie_max_link_width, utilization_pct=util),
                ),
            )

    def _record_xid(self, xid: int, now: float) -> None:
        cls = self.xids.classify(xid)
        _, count = self._xid_seen.get(xid, (now, 0))
        self._xid_seen[xid] = (now, count + 1)
        kind = "application error" if cls.application else cls.catalog_action or "uncatalogued"
        reason = Reason(
            "XID",
            cls.state,
            f"XID {xid}: {cls.meaning} ({kind})",
            cls.remedy,
            {
                "xid": xid,
                "count": count + 1,
                "catalog_action": cls.catalog_action,
                "application": cls.application,
            },
            now,
        )
        key = f"XID_{xid}"
        previous = self._active.get(key)
        self._active[key] = (
            reason
            if previous is None
            else Reason(reason.code, reason.state, reason.message, reason.remedy, reason.evidence, previous.since)
        )

    def _expire_observations(self, now: float) -> None:
        """XIDs that do not fault the GPU on their own are shown for ``quiet_s`` after the last one."""
        for xid, (last, _) in list(self._xid_seen.items()):
            key = f"XID_{xid}"
            reason = self._active.get(key)
            if reason and reason.state.severity < HealthState.FAILING.severity and now - last >= self.config.quiet_s:
                del self._active[key]
                del self._xid_seen[xid]


# PCIe transfer rate per lane by generation, GT/s (PCI-SIG base specifications 1.0 to 6.0).
_PCIE_GT_S: dict[int, float] = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}

_RECOVERY_VERDICTS: dict[str, tuple[HealthState, Remedy]] = {
    "GPU_RESET": (HealthState.FAILING, Remedy.RESET_GPU),
    "NODE_REBOOT": (HealthState.FAILING, Remedy.REBOOT),
    "DRAIN_AND_RESET": (HealthState.FAILING, Remedy.RESET_GPU),
    "DRAIN_P2P": (HealthState.DEGRADED, Remedy.DRAIN_P2P),
    "BUS_RESET": (HealthState.FAILING, Remedy.REBOOT),
    "SYSTEM_REBOOT": (HealthState.FAILING, Remedy.REBOOT),
    "RECOVER_IMEX_DOMAIN": (HealthState.DEGRADED, Remedy.CONTACT_SUPPORT),
}


def _evidence(**values: Any) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v) for k, v in values.items()}


__all__ = ["DeviceEvent", "DeviceLimits", "DeviceRules", "Sample"]
