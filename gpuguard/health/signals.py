"""The signals gpuguard reads from NVML, by readable name.

The same names appear in ``DeviceHealth.readings``, in fault scenarios for the fake NVML, and in
the ``gpuguard status`` table, so a scenario says ``ecc_sbe_volatile`` where NVML says field 3.

Field signals are read together in one ``nvmlDeviceGetFieldValues`` call per GPU per cycle; call
signals each need a call of their own (all cheap: 1.5–2.8 µs each on an H200).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import pynvml


@dataclass(frozen=True)
class FieldSignal:
    name: str
    field_id: int
    description: str


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
        pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION,
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
)

CALL_SIGNALS: Final[tuple[CallSignal, ...]] = (
    CallSignal("temperature", "GPU temperature, °C (nvmlDeviceGetTemperature)"),
    CallSignal("clock_events", "active clock event reasons (nvmlDeviceGetCurrentClocksEventReasons)"),
    CallSignal("pcie_link_width", "current PCIe link width (nvmlDeviceGetCurrPcieLinkWidth)"),
    CallSignal("utilization", "GPU utilization, % (nvmlDeviceGetUtilizationRates)"),
    CallSignal("nvlink_down", "NVLink links down that were up at start (nvmlDeviceGetNvLinkState)"),
)

NVLINK_ERROR_SIGNALS: Final[tuple[str, ...]] = (
    "nvlink_crc_flit_errors",
    "nvlink_crc_data_errors",
    "nvlink_replay_errors",
    "nvlink_recovery_errors",
)

FIELD_BY_NAME: Final[dict[str, FieldSignal]] = {s.name: s for s in FIELD_SIGNALS}
SIGNAL_NAMES: Final[tuple[str, ...]] = tuple(s.name for s in FIELD_SIGNALS) + tuple(s.name for s in CALL_SIGNALS)

RECOVERY_ACTIONS: Final[dict[int, str]] = {
    pynvml.NVML_GPU_RECOVERY_ACTION_NONE: "NONE",
    pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET: "GPU_RESET",
    pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT: "NODE_REBOOT",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P: "DRAIN_P2P",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET: "DRAIN_AND_RESET",
    pynvml.NVML_GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN: "RECOVER_IMEX_DOMAIN",
    pynvml.NVML_GPU_RECOVERY_ACTION_BUS_RESET: "BUS_RESET",
    pynvml.NVML_GPU_RECOVERY_ACTION_SYSTEM_REBOOT: "SYSTEM_REBOOT",
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


# The NVML events gpuguard waits for, by the name rules and scenarios use. Bits missing from an older
# pynvml are 0 and never match.
EVENT_TYPES: Final[dict[str, int]] = {
    kind: int(getattr(pynvml, name, 0))
    for kind, name in (
        ("xid", "nvmlEventTypeXidCriticalError"),
        ("double_bit_ecc", "nvmlEventTypeDoubleBitEccError"),
        ("dram_retirement_failure", "nvmlEventTypeDramRetirementFailure"),
        ("gpu_unavailable", "nvmlEventTypeGpuUnavailableError"),
        ("recovery_action", "nvmlEventTypeGpuRecoveryAction"),
        ("sbe_storm", "nvmlEventTypeSingleBitEccErrorStorm"),
    )
}


def clock_event_names(mask: int) -> list[str]:
    """The readable names of the bits set in a clock event reasons mask."""
    return [name for name, bit in CLOCK_EVENTS.items() if mask & bit]
