"""The health rules: from raw NVML readings and events to reasons with evidence.

`DeviceRules` holds one GPU's history (counter windows, how long each condition has held) and is
fed by the monitor's threads; it never calls NVML itself, so tests drive it with plain samples.
The rules follow DCGM's health watches; every threshold comes from `HealthConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from gpuguard.health._rulebook import RuleBook, evidence
from gpuguard.health._samples import DeviceEvent, DeviceLimits, Persistence, Rate, Readability, Reading, Sample
from gpuguard.health._verdicts import (
    ANSWERS,
    EVENT_VERDICTS,
    FAILING,
    LOST,
    LOST_TEXT,
    OPEN_CODES,
    OPEN_FAULTS,
    PCIE_GT_S,
    RECOVERY_VERDICTS,
    held_text,
)
from gpuguard.health.config import HealthConfig
from gpuguard.health.model import HealthState, Reason, Remedy
from gpuguard.health.signals import (
    CRITICAL_SIGNALS,
    RECOVERY_ACTIONS,
    SLOWDOWN_CLOCK_EVENTS,
    clock_event_names,
)
from gpuguard.health.xid import XidTable


class DeviceRules(RuleBook):
    """Evaluates one GPU.

    Call `observe` with each poll and `record_event` with each NVML event, then `reasons` for the
    active reasons. Not thread-safe by itself: the monitor serialises calls.

    Every verdict clears without a restart, the way the hardware clears it (`Reason.clears`): a level
    reason when a successful read shows the fault gone (a counter back to 0 after a GPU reset), an XID
    or event after its hold time with no new one, or as soon as a GPU reset is seen after it.

    Example:
        >>> rules = DeviceRules(HealthConfig(), XidTable(), DeviceLimits())
        >>> rules.observe(Sample(at=0.0, readings={"ecc_dbe_volatile": 1}))
        >>> [r.code for r in rules.reasons(0.0)]
        ['ECC_DBE_VOLATILE']
        >>> rules.observe(Sample(at=9.0, readings={"ecc_dbe_volatile": 0}))  # after a GPU reset
        >>> rules.reasons(9.0)
        ()
    """

    def __init__(self, config: HealthConfig, xids: XidTable, limits: DeviceLimits) -> None:
        self.config = config
        self.xids = xids
        self.limits = limits
        self.readings: dict[str, Reading] = {}
        self.reads = Readability()
        self._active: dict[str, Reason] = {}
        self._held_until: dict[str, float] = {}
        self._last_seen: dict[str, float] = {}
        c = config
        self._rates = {
            "ecc_sbe_volatile": Rate(c.rate_window_s),
            "pcie_replay": Rate(c.rate_window_s),
            "thermal_violation_ns": Rate(c.rate_window_s),
            "power_violation_ns": Rate(c.rate_window_s),
            # DCGM's NVLink rules look at the last minute.
            "nvlink_crc": Rate(60.0),
            "nvlink_replay_recovery": Rate(60.0),
        }
        self._persist = {
            "ECC_SBE_RATE": Persistence(c.onset_s, c.quiet_s),
            "PCIE_REPLAY_RATE": Persistence(c.onset_s, c.quiet_s),
            "PCIE_LINK_DEGRADED": Persistence(c.onset_s, c.quiet_s),
            "CLOCK_EVENT": Persistence(c.clock_event_onset_s, c.quiet_s),
            "TEMPERATURE_NEAR_SLOWDOWN": Persistence(c.onset_s, c.quiet_s),
            "MEMORY_TEMPERATURE_NEAR_MAX": Persistence(c.onset_s, c.quiet_s),
            "NVLINK_ERROR_RATE": Persistence(c.onset_s, c.quiet_s),
            "NVLINK_CRC_ERROR_RATE": Persistence(0.0, c.quiet_s),
            "NVLINK_REPLAY_RECOVERY": Persistence(0.0, c.quiet_s),
            "THERMAL_VIOLATION": Persistence(c.clock_event_onset_s, c.quiet_s),
            "POWER_VIOLATION": Persistence(c.clock_event_onset_s, c.quiet_s),
            "FABRIC_NOT_READY": Persistence(c.onset_s, c.quiet_s),
        }
        self._xid_seen: dict[int, tuple[float, int]] = {}  # xid -> (last seen, count)
        # The MIG GPU instances this job runs in (empty: the whole GPU is the job's).
        self.own_instances: frozenset[int] = frozenset()
        self._failed_polls = 0
        self._ever_read = False
        self._last_error: str | None = None

    # -- inputs ---------------------------------------------------------------------------------

    def observe(self, sample: Sample) -> None:
        now = sample.at
        if sample.lost:
            evidence = {"nvml_error": "NVML_ERROR_GPU_IS_LOST", "code": 15, "call": sample.call, **sample.evidence}
            self._level("GPU_LOST", True, Reason("GPU_LOST", LOST, LOST_TEXT, Remedy.REBOOT, evidence, now, ANSWERS))
            return
        if sample.open_code in OPEN_FAULTS:
            code, name, message, remedy = OPEN_FAULTS[sample.open_code]
            evidence = {"nvml_error": name, "code": sample.open_code, "call": sample.call, **sample.evidence}
            self._level(code, True, Reason(code, FAILING, message, remedy, evidence, now, ANSWERS))
            return
        if sample.reset_required:
            # nvml.h: NVML_ERROR_RESET_REQUIRED, "the GPU requires a reset before it can be used again".
            self._level(
                "GPU_RESET_REQUIRED",
                True,
                Reason(
                    "GPU_RESET_REQUIRED",
                    FAILING,
                    "NVML answers RESET_REQUIRED: the GPU must be reset before it can be used again",
                    Remedy.RESET_GPU,
                    {"nvml_error": "NVML_ERROR_RESET_REQUIRED", "code": 16, "call": sample.call},
                    now,
                    "when the GPU answers NVML normally again (after the reset)",
                ),
            )
        self.reads.forget(*sample.off)
        for signal, error in sample.unreadable.items():
            self.reads.failed(signal, error)
            self.readings.pop(signal, None)  # no stale value on show next to a failed read
        if not sample.readings:
            if sample.error is not None:
                self._failed_polls += 1
                self._last_error = sample.error
            return
        self._answered(sample, now)
        r = sample.readings
        self._check_hard_fields(r, now)
        self._check_rates(r, now)
        self._check_sustained(r, now)

    def _answered(self, sample: Sample, now: float) -> None:
        """The GPU answered: what that clears, and whether the readings show a GPU reset."""
        self._ever_read = True
        self._failed_polls = 0
        self._last_error = None
        # a signal read in part (one NVLink down while another cannot be read) stays unreadable too
        self.reads.answered(*(name for name in sample.readings if name not in sample.unreadable))
        r, before = sample.readings, self.readings
        reset = any(key in self._active for key in ("GPU_LOST", *OPEN_CODES)) or (
            "GPU_RESET_REQUIRED" in self._active and not sample.reset_required
        )
        for key in ("GPU_LOST", *OPEN_CODES):
            self._active.pop(key, None)
        if not sample.reset_required:
            self._active.pop("GPU_RESET_REQUIRED", None)
        # Volatile ECC counters count since the last driver load or GPU reset: going down means one
        # happened; so does a pending remap or a recovery action going back to none.
        for name in ("ecc_sbe_volatile", "ecc_dbe_volatile", "remap_pending", "recovery_action"):
            if name in r and name in before and float(r[name]) < float(before[name]):
                reset = True
        if reset:
            self._reset_seen(now)
        before.update(r)

    def record_event(self, event: DeviceEvent) -> None:
        """An NVML event: held ``xid_hold_s`` after its last occurrence (see `HealthConfig`)."""
        now = event.at
        if event.kind == "xid" and event.xid is not None:
            self._record_xid(event, now)
            return
        known = EVENT_VERDICTS.get(event.kind)
        if known is None:
            # recovery_action and sbe_storm events carry no verdict of their own: the monitor polls at
            # once on them, and the field rules judge the fresh values.
            return
        code, state, remedy, message, nvml_name = known
        hold = self.config.xid_hold_s
        reason = Reason(code, state, message, remedy, {"event": nvml_name}, now, held_text(hold))
        self._hold(f"{code}:event", reason, hold)

    def lost_in_event_wait(self, now: float) -> None:
        """nvmlEventSetWait_v2 answered GPU_IS_LOST, and this GPU alone answers it ("if a GPU has fallen off
        the bus", nvml.h): held like an event, and cleared early when the GPU is seen reset."""
        hold = self.config.xid_hold_s
        evidence = {"nvml_error": "NVML_ERROR_GPU_IS_LOST", "code": 15, "call": "nvmlEventSetWait_v2"}
        reason = Reason("GPU_LOST", LOST, LOST_TEXT + " (waiting for its events)", Remedy.REBOOT, evidence, now)
        self._hold("GPU_LOST:event-wait", replace(reason, clears=held_text(hold)), hold)

    def event_path(self, error: str | None) -> None:
        """The event path's own health: None when it works (registered, waits answering), else why not."""
        if error is None:
            self.reads.answered("events")
        else:
            self.reads.failed("events", error)

    # -- output ---------------------------------------------------------------------------------

    def reasons(self, now: float) -> tuple[Reason, ...]:
        """Active reasons, worst first; includes UNKNOWN when NVML has stopped answering.

        A critical signal (`CRITICAL_SIGNALS`) that cannot be read is a reason of its own
        (``SIGNAL_UNREADABLE``, UNKNOWN): a double-bit ECC error would not be seen.
        """
        self._expire_holds(now)
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
                    "when a read of the GPU succeeds (retried every poll)",
                )
            )
        blind = self.reads.blind(CRITICAL_SIGNALS, self.config.unresponsive_polls)
        if blind:
            named = "; ".join(f"{signal} ({error})" for signal, (error, _) in blind.items())
            reasons.append(
                Reason(
                    "SIGNAL_UNREADABLE",
                    HealthState.UNKNOWN,
                    f"cannot read {named}: a fault there would not be seen",
                    Remedy.OBSERVE,
                    {
                        "signals": {signal: error for signal, (error, _) in blind.items()},
                        "failed_reads": {signal: count for signal, (_, count) in blind.items()},
                    },
                    now,
                    "when the signal reads again (retried every poll)",
                )
            )
        reasons.sort(key=lambda r: (-r.state.severity, r.since, r.code))
        return tuple(reasons)

    # -- rules ----------------------------------------------------------------------------------

    def _check_hard_fields(self, r: Mapping[str, Reading], now: float) -> None:
        """Level rules: each holds while its reading says so and clears on the first read that does not."""
        dbe = r.get("ecc_dbe_volatile")
        self._level(
            "ECC_DBE_VOLATILE",
            None if dbe is None else dbe > 0,
            Reason(
                "ECC_DBE_VOLATILE",
                FAILING,
                f"{int(dbe or 0)} volatile double-bit ECC error(s)",
                Remedy.RESET_GPU,
                {"ecc_dbe_volatile": dbe, "threshold": 0},
                now,
                "when ecc_dbe_volatile reads 0 (a GPU reset or driver reload zeroes it)",
            ),
        )
        pending = r.get("remap_pending")
        # NVIDIA's A100/H100 memory error management guide: a pending remap takes effect at the next
        # GPU reset, and work may continue until a convenient time. The recovery action field, a
        # reason of its own, says when the driver wants more.
        self._level(
            "ROW_REMAP_PENDING",
            None if pending is None else bool(pending),
            Reason(
                "ROW_REMAP_PENDING",
                HealthState.DEGRADED,
                "a row remap is pending; reset the GPU at a convenient time",
                Remedy.RESET_GPU,
                {"remap_pending": pending},
                now,
                "when remap_pending reads 0 (the GPU reset that applies the remap)",
            ),
        )
        failure = r.get("remap_failure")
        # DCGM_FR_ROW_REMAP_FAILURE; next step (dcgm_errors.h): run the field diagnostic.
        self._level(
            "ROW_REMAP_FAILURE",
            None if failure is None else bool(failure),
            Reason(
                "ROW_REMAP_FAILURE",
                FAILING,
                "a row remap failed: the GPU has no spare rows left for the failing memory",
                Remedy.CONTACT_SUPPORT,
                {"remap_failure": failure},
                now,
                "when remap_failure reads 0",
            ),
        )
        action = r.get("recovery_action")
        name = RECOVERY_ACTIONS.get(int(action or 0), f"UNKNOWN_{int(action or 0)}")
        state, remedy = RECOVERY_VERDICTS.get(name, (HealthState.DEGRADED, Remedy.CONTACT_SUPPORT))
        self._level(
            "RECOVERY_ACTION",
            None if action is None else bool(action),
            Reason(
                "RECOVERY_ACTION",
                state,
                f"the driver asks for recovery action {name}",
                remedy,
                {"recovery_action": name},
                now,
                "when the recovery action reads NONE (the driver clears it once the action is done)",
            ),
        )
        down = r.get("nvlink_down")
        # DCGM's NVLink watch fails any link whose state is down, whenever it went down.
        mask = int(r.get("nvlink_down_links", 0))
        links = [i for i in range(64) if mask >> i & 1]
        named = ", ".join(str(i) for i in links) if links else "?"
        self._level(
            "NVLINK_DOWN",
            None if down is None else bool(down),
            Reason(
                "NVLINK_DOWN",
                FAILING,
                f"NVLink link(s) {named} down ({int(down or 0)} of {self.limits.nvlink_links})",
                Remedy.RESET_GPU,
                {"links_down": links, "nvlink_down": int(down or 0), "nvlink_links": self.limits.nvlink_links},
                now,
                "when every NVLink reads up",
            ),
        )

    def _check_rates(self, r: Mapping[str, Reading], now: float) -> None:
        c = self.config
        if "ecc_sbe_volatile" in r:
            rate = self._rates["ecc_sbe_volatile"]
            rate.add(now, float(r["ecc_sbe_volatile"]))
            per_min = rate.per_minute()
            self._soft(
                "ECC_SBE_RATE",
                per_min > c.ecc_sbe_per_min and rate.rises() > 1,  # one burst is not a trend
                now,
                Reason(
                    "ECC_SBE_RATE",
                    HealthState.DEGRADED,
                    f"single-bit ECC errors at {per_min:.0f}/min (threshold {c.ecc_sbe_per_min:g}/min)",
                    # DCGM_FR_VOLATILE_SBE_DETECTED_NEXT: "Monitor - this GPU can still perform workload."
                    Remedy.OBSERVE,
                    evidence(
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
            scale = PCIE_GT_S.get(gen, 32.0) / 32.0 if gen else 1.0
            threshold = lanes * c.pcie_replay_per_lane_per_min * scale
            self._soft(
                "PCIE_REPLAY_RATE",
                per_min > threshold and rate.rises() > 1,  # one burst is not a trend
                now,
                Reason(
                    "PCIE_REPLAY_RATE",
                    HealthState.DEGRADED,
                    f"PCIe replays at {per_min:.1f}/min over {lanes} lanes (threshold {threshold:.2f}/min)",
                    # DCGM_FR_PCI_REPLAY_RATE_NEXT: reseat the card, run the PCIe and field diagnostics.
                    Remedy.CONTACT_SUPPORT,
                    evidence(
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
                    evidence(clock_events=active, onset_s=c.clock_event_onset_s),
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
                    evidence(
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
                    evidence(
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
                    evidence(link_width=width, max_link_width=lim.pcie_max_link_width, utilization_pct=util),
                ),
            )

    def _record_xid(self, event: DeviceEvent, now: float) -> None:
        xid = int(event.xid or 0)
        cls = self.xids.classify(xid)
        theirs = self.own_instances and event.gpu_instance is not None and event.gpu_instance not in self.own_instances
        if theirs and cls.state.severity < FAILING.severity:
            # nvml.h, nvmlEventSetWait_v2: in MIG mode a GPU handle reports the events of every instance.
            # An XID that a restart of the application clears concerns the other instance's application;
            # one that needs a GPU reset takes every instance down, this job's included.
            return
        _, count = self._xid_seen.get(xid, (now, 0))
        self._xid_seen[xid] = (now, count + 1)
        kind = "application error" if cls.application else cls.catalog_action or "uncatalogued"
        # XIDs that fault the GPU are held xid_hold_s; the others (observations, restart-the-app) quiet_s.
        hold = self.config.xid_hold_s if cls.state.severity >= FAILING.severity else self.config.quiet_s
        evidence: dict[str, object] = {
            "xid": xid,
            "count": count + 1,
            "catalog_action": cls.catalog_action,
            "application": cls.application,
        }
        if event.gpu_instance is not None:
            evidence["gpu_instance"] = event.gpu_instance
        message = f"XID {xid}: {cls.meaning} ({kind})"
        self._hold(f"XID_{xid}", Reason("XID", cls.state, message, cls.remedy, evidence, now, held_text(hold)), hold)

    def _drop_hold(self, key: str) -> None:
        super()._drop_hold(key)
        if key.startswith("XID_"):
            self._xid_seen.pop(int(key.removeprefix("XID_")), None)


__all__ = ["DeviceEvent", "DeviceLimits", "DeviceRules", "Sample"]
