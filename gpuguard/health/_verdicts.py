"""What NVML's answers mean for a GPU: the verdict tables the health rules apply, each with its source."""

from __future__ import annotations

from typing import Final

import pynvml

from gpuguard.health.model import HealthState, Remedy

FAILING: Final = HealthState.FAILING
LOST: Final = HealthState.LOST
LOST_TEXT: Final = "NVML reports the GPU is lost"
ANSWERS: Final = "when the GPU answers NVML again (after a reset, a reseat or a reboot)"

# nvml.h, nvmlDeviceGetHandleByIndex_v2 / nvmlDeviceGetHandleByUUID: hardware faults reported at open.
# Both concern "any attached devices" / "the attached GPUs": the node needs a person, so the job moves.
OPEN_FAULTS: Final[dict[int, tuple[str, str, str, Remedy]]] = {
    int(pynvml.NVML_ERROR_INSUFFICIENT_POWER): (
        "GPU_INSUFFICIENT_POWER",
        "NVML_ERROR_INSUFFICIENT_POWER",
        "NVML answers INSUFFICIENT_POWER at open: an attached GPU has improperly attached external power "
        "cables (nvml.h); reseat the power cables",
        Remedy.CONTACT_SUPPORT,
    ),
    int(pynvml.NVML_ERROR_IRQ_ISSUE): (
        "GPU_IRQ_ISSUE",
        "NVML_ERROR_IRQ_ISSUE",
        "NVML answers IRQ_ISSUE at open: the NVIDIA kernel driver detected an interrupt issue with the "
        "attached GPUs (nvml.h); reboot the node, and have it checked if it comes back",
        Remedy.REBOOT,
    ),
}
OPEN_CODES: Final[tuple[str, ...]] = tuple(v[0] for v in OPEN_FAULTS.values())

# NVML event kinds that carry a verdict: (code, state, remedy, message, nvml.h event name).
EVENT_VERDICTS: Final[dict[str, tuple[str, HealthState, Remedy, str, str]]] = {
    "double_bit_ecc": (
        "ECC_DBE_VOLATILE",
        FAILING,
        Remedy.RESET_GPU,
        "double-bit ECC error event",
        "nvmlEventTypeDoubleBitEccError",
    ),
    "dram_retirement_failure": (
        "ROW_REMAP_FAILURE",
        FAILING,
        Remedy.RESET_GPU,
        "DRAM retirement (row remap) failed",
        "nvmlEventTypeDramRetirementFailure",
    ),
    "gpu_unavailable": (
        "GPU_LOST",
        LOST,
        Remedy.REBOOT,
        "NVML reports the GPU unavailable",
        "nvmlEventTypeGpuUnavailableError",
    ),
}


def held_text(hold_s: float) -> str:
    return f"{hold_s:g}s after the last one with no new one, or at once when a GPU reset is seen after it"


# PCIe transfer rate per lane by generation, GT/s (PCI-SIG base specifications 1.0 to 6.0).
PCIE_GT_S: Final[dict[int, float]] = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}

RECOVERY_VERDICTS: Final[dict[str, tuple[HealthState, Remedy]]] = {
    "GPU_RESET": (HealthState.FAILING, Remedy.RESET_GPU),
    "NODE_REBOOT": (HealthState.FAILING, Remedy.REBOOT),
    "DRAIN_AND_RESET": (HealthState.FAILING, Remedy.RESET_GPU),
    "DRAIN_P2P": (HealthState.DEGRADED, Remedy.DRAIN_P2P),
    "BUS_RESET": (HealthState.FAILING, Remedy.REBOOT),
    "SYSTEM_REBOOT": (HealthState.FAILING, Remedy.REBOOT),
    "RECOVER_IMEX_DOMAIN": (HealthState.DEGRADED, Remedy.CONTACT_SUPPORT),
}
