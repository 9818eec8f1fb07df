"""The health rules: from raw NVML readings and events to reasons with evidence.

`DeviceRules` holds one GPU's history (counter windows, how long each condition has held) and is
fed by the monitor's threads; it never calls NVML itself, so tests drive it with plain samples.
The rules follow DCGM's health watches; every threshold comes from `HealthConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpuguard.health._rulebook import RuleBook, evidence
from gpuguard.health._samples import DeviceEvent, DeviceLimits, Persistence, Rate, Reading, Sample
from gpuguard.health.config import HealthConfig
from gpuguard.health.model import HealthState, Reason, Remedy
from gpuguard.health.signals import (
    RECOVERY_ACTIONS,
    SLOWDOWN_CLOCK_EVENTS,
    clock_event_names,
)
from gpuguard.health.xid import XidTable


class DeviceRules(RuleBook):
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


__all__ = ["DeviceEvent", "DeviceLimits", "DeviceRules", "Sample"]
