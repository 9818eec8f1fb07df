"""The health rules' bookkeeping (hard and soft reasons) and the interconnect, power and fabric rules.

`DeviceRules` builds on `RuleBook`; the rules here follow DCGM's NVLink, thermal and power health
watches and NVIDIA's fabric manager guidance, each citing its source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gpuguard.health._samples import Persistence, Rate, Reading
from gpuguard.health.config import HealthConfig
from gpuguard.health.model import HealthState, Reason, Remedy
from gpuguard.health.signals import FABRIC_STATES


class RuleBook:
    """Active reasons, each with the way it clears; the subclass sets the attributes in its constructor.

    Three kinds of reason, by how they clear:

    - level (`_level`): held while a reading says so, cleared by the first successful read that says
      otherwise (a double-bit ECC count back to 0 after a GPU reset). A reading that fails clears nothing.
    - held (`_hold`): an XID or NVML event, held ``hold_s`` after its last occurrence, or until a GPU
      reset is seen after it (`_reset_seen`).
    - soft (`_soft`): a rate or sustained condition with hysteresis (onset, then quiet to clear).
    """

    config: HealthConfig
    _active: dict[str, Reason]
    _rates: dict[str, Rate]
    _persist: dict[str, Persistence]
    _held_until: dict[str, float]
    _last_seen: dict[str, float]

    def _level(self, key: str, condition: bool | None, reason: Reason) -> None:
        """A reason that follows a reading: on while ``condition``, off once a read says not; None: not read."""
        if condition is None:
            return
        if not condition:
            self._active.pop(key, None)
            return
        previous = self._active.get(key)
        since = previous.since if previous is not None else reason.since
        self._active[key] = replace(reason, since=since)

    def _hold(self, key: str, reason: Reason, hold_s: float) -> None:
        """An event-like reason, held ``hold_s`` after its last occurrence (``reason.since``)."""
        now = reason.since
        previous = self._active.get(key)
        if previous is not None and previous.state.severity >= reason.state.severity:
            reason = replace(reason, since=previous.since)
        self._active[key] = reason
        self._last_seen[key] = now
        self._held_until[key] = max(self._held_until.get(key, now), now + hold_s)

    def _expire_holds(self, now: float) -> None:
        for key, until in list(self._held_until.items()):
            if now >= until:
                self._drop_hold(key)

    def _reset_seen(self, now: float) -> None:
        """The hardware shows a GPU reset (volatile counters back down, a lost GPU answering again):
        every event-like reason that came before it is over."""
        for key, last in list(self._last_seen.items()):
            if last < now:
                self._drop_hold(key)

    def _drop_hold(self, key: str) -> None:
        self._active.pop(key, None)
        self._held_until.pop(key, None)
        self._last_seen.pop(key, None)

    def _soft(self, code: str, condition: bool, now: float, reason: Reason) -> None:
        if self._persist[code].update(condition, now):
            if condition or code not in self._active:
                # While the condition is absent but not yet quiet long enough, the reason keeps the
                # values that triggered it, not the current (clearing) ones.
                since = self._persist[code].active_since
                clears = reason.clears or f"after the condition has been absent {self.config.quiet_s:g}s"
                self._active[code] = replace(reason, since=since, clears=clears)
        else:
            self._active.pop(code, None)

    def _check_fabric(self, r: Mapping[str, Reading], now: float) -> None:
        """NVSwitch systems: a GPU whose fabric registration failed cannot use NVLink (CUDA reports the
        system not ready); one still registering is not ready yet. NVIDIA Fabric Manager user guide;
        DCGM_FR_CUDA_FM_NOT_INITIALIZED_NEXT: "Ensure that the FabricManager is running without errors."
        """
        if "fabric_state" not in r:
            return
        state, status = int(r["fabric_state"]), int(r.get("fabric_status", 0))
        name = FABRIC_STATES.get(state, str(state))
        self._level(
            "FABRIC_REGISTRATION_FAILED",
            state == 3 and status != 0,
            Reason(
                "FABRIC_REGISTRATION_FAILED",
                HealthState.FAILING,
                f"NVSwitch fabric registration failed (NVML error {status}); check the fabric manager",
                Remedy.CONTACT_SUPPORT,
                {"fabric_state": name, "fabric_status": status},
                now,
                clears="when the fabric registration reads COMPLETED with success",
            ),
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
                    evidence(rate_per_s=per_s, threshold_per_s=c.nvlink_crc_per_s, errors=count, window_s=60.0),
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
                    evidence(errors=count, threshold_per_min=c.nvlink_errors_per_min, counters=crc, window_s=60.0),
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
                    evidence(
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
                    evidence(held_s=held_ns / 1e9, window_s=span, fraction=fraction, threshold=c.violation_fraction),
                ),
            )


def evidence(**values: Any) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v) for k, v in values.items()}
