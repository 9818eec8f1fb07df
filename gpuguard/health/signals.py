"""The signals gpuguard reads from NVML, by readable name.

The same names appear in ``DeviceHealth.readings``, in fault scenarios for the fake NVML, and in
the ``gpuguard status`` table, so a scenario says ``ecc_sbe_volatile`` where NVML says field 3.

Field signals are read together in one ``nvmlDeviceGetFieldValues`` call per GPU per cycle; call
signals each need a call of their own (all cheap: 1.5–2.8 µs each on an H200).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import pynvml


def nvml_constant(name: str, value: int) -> int:
    """A pynvml constant by name, or its value from ``nvml.h`` when this nvidia-ml-py predates it.

    nvidia-ml-py 12.535.161 and 12.570.86 (admitted by ``nvidia-ml-py>=12.535``) lack the recovery
    action field and its values; the driver, not the bindings, decides whether a field answers, so
    the numbers from ``nvml.h`` are sent either way and an old driver answers NOT_SUPPORTED for them.
    """
    found: Any = getattr(pynvml, name, None)
    return int(found) if isinstance(found, int) else value


@dataclass(frozen=True)
class FieldSignal:
    """One entry of the batched ``nvmlDeviceGetFieldValues`` read (``scope``: the NVLink for per-link fields)."""

    name: str
    field_id: int
    description: str
    scope: int = 0


@dataclass(frozen=True)
class CallSignal:
    name: str
    description: str


FIELD_SIGNALS: Final[tuple[FieldSignal, ...]] = (
    FieldSignal("ecc_sbe_volatile", pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, "single-bit ECC errors since driver load"),
    FieldSignal("ecc_dbe_volatile", pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, "double-bit ECC errors since driver load"),
    FieldSignal("ecc_sbe_aggregate", pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL, "single-bit ECC errors, lifetime"),
    FieldSignal("ecc_dbe_aggregate", pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL, "double-bit ECC errors, lifetime"),
    FieldSignal("remapped_correctable", pynvml.NVML_FI_DEV_REMAPPED_COR, "rows remapped for correctable errors"),
    FieldSignal("remapped_uncorrectable", pynvml.NVML_FI_DEV_REMAPPED_UNC, "rows remapped for uncorrectable errors"),
    FieldSignal("remap_pending", pynvml.NVML_FI_DEV_REMAPPED_PENDING, "1 when a row remap waits for a GPU reset"),
    FieldSignal("remap_failure", pynvml.NVML_FI_DEV_REMAPPED_FAILURE, "1 when a row remap failed"),
    FieldSignal("pcie_replay", pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, "PCIe replay counter"),
    FieldSignal(
        "recovery_action",
        nvml_constant("NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", 230),  # nvml.h r570+
        "driver's recovery action: NONE, GPU_RESET, NODE_REBOOT, DRAIN_P2P, DRAIN_AND_RESET, ...",
    ),
    FieldSignal("memory_temperature", pynvml.NVML_FI_DEV_MEMORY_TEMP, "HBM temperature, °C"),
    FieldSignal("power_w", pynvml.NVML_FI_DEV_POWER_INSTANT, "instant power (NVML reports mW)"),
    FieldSignal(
        "nvlink_crc_flit_errors",
        pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
        "NVLink flit CRC errors",
    ),
    FieldSignal(
        "nvlink_crc_data_errors",
        pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL,
        "NVLink data CRC errors",
    ),
    FieldSignal("nvlink_replay_errors", pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL, "NVLink replays"),
    FieldSignal("nvlink_recovery_errors", pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL, "NVLink recoveries"),
    # Violation time counters (ns), what DCGM's thermal and power watches read (DCGM_FI_DEV_THERMAL_VIOLATION,
    # DCGM_FI_DEV_POWER_VIOLATION, from nvmlDeviceGetViolationStatus; the same counters as these fields).
    FieldSignal(
        "thermal_violation_ns", pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL, "time clocks were held by thermal limits"
    ),
    FieldSignal("power_violation_ns", pynvml.NVML_FI_DEV_PERF_POLICY_POWER, "time clocks were held by the power limit"),
)

# NVML_FI_DEV_NVLINK_GET_STATE with scopeId = link: one entry per link in the batched read (nvml.h),
# instead of one nvmlDeviceGetNvLinkState call per link (18 per GPU on an HGX H100/H200).
NVLINK_STATE_FIELD: Final[int] = int(pynvml.NVML_FI_DEV_NVLINK_GET_STATE)

# The single calls that take turns as a cycle's third call (all of them in a monitor's first cycle).
ROTATING_CALLS: Final[tuple[str, ...]] = ("temperature", "pcie_link_width", "utilization", "fabric")

# nvmlGpuFabricState_t (nvml.h): the GPU's registration with the NVSwitch fabric (fabric manager).
FABRIC_STATES: Final[dict[int, str]] = {0: "NOT_SUPPORTED", 1: "NOT_STARTED", 2: "IN_PROGRESS", 3: "COMPLETED"}

CALL_SIGNALS: Final[tuple[CallSignal, ...]] = (
    CallSignal("temperature", "GPU temperature, °C (nvmlDeviceGetTemperature)"),
    CallSignal("clock_events", "active clock event reasons (nvmlDeviceGetCurrentClocksEventReasons)"),
    CallSignal("pcie_link_width", "current PCIe link width (nvmlDeviceGetCurrPcieLinkWidth)"),
    CallSignal("utilization", "GPU utilization, % (nvmlDeviceGetUtilizationRates)"),
    CallSignal("nvlink_down", "NVLink links down (NVML_FI_DEV_NVLINK_GET_STATE, one field per link)"),
    CallSignal("fabric_state", "NVSwitch fabric registration: 1 NOT_STARTED, 2 IN_PROGRESS, 3 COMPLETED"),
    CallSignal("fabric_status", "NVSwitch fabric registration result, an nvmlReturn_t (0: success)"),
)

NVLINK_ERROR_SIGNALS: Final[tuple[str, ...]] = (
    "nvlink_crc_flit_errors",
    "nvlink_crc_data_errors",
    "nvlink_replay_errors",
    "nvlink_recovery_errors",
)

# Signals whose loss would hide a fault that fails a GPU: when one cannot be read (an error other than
# NOT_SUPPORTED / FUNCTION_NOT_FOUND), the GPU is UNKNOWN until it reads again, so that fail_mode=closed
# fails it. "events" stands for the NVML event path that carries XIDs.
CRITICAL_SIGNALS: Final[frozenset[str]] = frozenset(
    {
        "ecc_sbe_volatile",
        "ecc_dbe_volatile",
        "remap_pending",
        "remap_failure",
        "recovery_action",
        "nvlink_down",
        *NVLINK_ERROR_SIGNALS,
        "events",
    }
)

FIELD_BY_NAME: Final[dict[str, FieldSignal]] = {s.name: s for s in FIELD_SIGNALS}
SIGNAL_NAMES: Final[tuple[str, ...]] = tuple(s.name for s in FIELD_SIGNALS) + tuple(s.name for s in CALL_SIGNALS)

# nvmlDeviceGpuRecoveryAction_t in nvml.h; resolved by name so older nvidia-ml-py releases import.
RECOVERY_ACTIONS: Final[dict[int, str]] = {
    nvml_constant(f"NVML_GPU_RECOVERY_ACTION_{name}", value): name
    for name, value in (
        ("NONE", 0),
        ("GPU_RESET", 1),
        ("NODE_REBOOT", 2),
        ("DRAIN_P2P", 3),
        ("DRAIN_AND_RESET", 4),
        ("RECOVER_IMEX_DOMAIN", 5),
        ("BUS_RESET", 6),
        ("SYSTEM_REBOOT", 7),
    )
}

CLOCK_EVENTS: Final[dict[str, int]] = {
    "gpu_idle": pynvml.nvmlClocksEventReasonGpuIdle,
    "applications_clocks": pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
    "sw_power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
    "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown,
    "sync_boost": pynvml.nvmlClocksEventReasonSyncBoost,
    "sw_thermal": pynvml.nvmlClocksEventReasonSwThermalSlowdown,
    "hw_thermal": pynvml.nvmlClocksEventReasonHwThermalSlowdown,
    "hw_power_brake": pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
    "display_clocks": pynvml.nvmlClocksEventReasonDisplayClockSetting,
}

# The clock events that mean the hardware is protecting itself, as opposed to idling or power policy.
HARDWARE_CLOCK_EVENTS: Final[tuple[str, ...]] = ("hw_slowdown", "hw_thermal", "hw_power_brake")
# Clock events that cost performance when held: the hardware ones, and the driver's thermal slowdown
# (DCGM's thermal watch fails on thermal violations, whichever of the two slowed the clocks).
SLOWDOWN_CLOCK_EVENTS: Final[tuple[str, ...]] = (*HARDWARE_CLOCK_EVENTS, "sw_thermal")


# The NVML events gpuguard waits for, by the name rules and scenarios use. The driver's supported
# mask (nvmlDeviceGetSupportedEventTypes) decides which of them a GPU registers.
EVENT_TYPES: Final[dict[str, int]] = {
    kind: nvml_constant(name, bit)
    for kind, name, bit in (
        # (readable kind, pynvml name, nvml.h value: resolved by name, so older bindings still register them)
        ("xid", "nvmlEventTypeXidCriticalError", 0x0008),
        ("double_bit_ecc", "nvmlEventTypeDoubleBitEccError", 0x0002),
        ("dram_retirement_failure", "nvmlEventTypeDramRetirementFailure", 0x0800),
        ("gpu_unavailable", "nvmlEventTypeGpuUnavailableError", 0x4000),
        ("recovery_action", "nvmlEventTypeGpuRecoveryAction", 0x8000),
        ("sbe_storm", "nvmlEventTypeSingleBitEccErrorStorm", 0x0200),
    )
}


def clock_event_names(mask: int) -> list[str]:
    """The readable names of the bits set in a clock event reasons mask."""
    return [name for name, bit in CLOCK_EVENTS.items() if mask & bit]
