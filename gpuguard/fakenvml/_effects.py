"""What the hardware shows along with an XID or an NVML event, besides the event itself.

A real XID 48 comes with a double-bit ECC count; a GPU that falls off the bus (XID 79) answers
GPU_IS_LOST from then on. A monitor that starts after the fault never receives the event (NVML delivers
events from registration on), so these readings are all it can see: the fake moves them with the event,
so that a fault at ``"at": 0`` looks the way a GPU already faulted at start looks, and
``gpuguard-run``'s preflight fails it.

Sources: NVIDIA's XID catalog (``gpuguard/health/xid_catalog.csv``: 48 double-bit ECC, 63 row remap
recorded, 64 row remap failure, 79 fallen off the bus, 95 uncontained memory error) and nvml.h's event
types (nvmlEventTypeDoubleBitEccError, nvmlEventTypeDramRetirementFailure,
nvmlEventTypeGpuUnavailableError). Volatile readings last until the step's ``until`` (the GPU reset
that clears them); lifetime counters (aggregate ECC, remapped rows) keep what they gained.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from gpuguard.fakenvml._scenario import ScenarioEvent

# (signal, "add" or "set", value, lifetime): a lifetime change survives the reset that ends the step.
Effect = tuple[str, str, float, bool]

_DOUBLE_BIT: Final[tuple[Effect, ...]] = (
    ("ecc_dbe_volatile", "add", 1.0, False),
    ("ecc_dbe_aggregate", "add", 1.0, True),
)
_REMAP_FAILED: Final[tuple[Effect, ...]] = (("remap_failure", "set", 1.0, False),)
LOST: Final = "lost"

XID_EFFECTS: Final[dict[int, tuple[Effect, ...] | str]] = {
    48: _DOUBLE_BIT,
    63: (("remap_pending", "set", 1.0, False), ("remapped_uncorrectable", "add", 1.0, True)),
    64: _REMAP_FAILED,
    79: LOST,
    95: _DOUBLE_BIT,
}
EVENT_EFFECTS: Final[dict[str, tuple[Effect, ...] | str]] = {
    "double_bit_ecc": _DOUBLE_BIT,
    "dram_retirement_failure": _REMAP_FAILED,
    "gpu_unavailable": LOST,
}


def consequences(step: ScenarioEvent) -> list[ScenarioEvent]:
    """The readings an XID or event step moves, as steps of their own at the same time."""
    if step.xid is not None:
        effects = XID_EFFECTS.get(step.xid, ())
    elif step.event is not None:
        effects = EVENT_EFFECTS.get(step.event, ())
    else:
        return []
    base = ScenarioEvent(at=step.at, gpu=step.gpu, until=step.until)
    if isinstance(effects, str):  # LOST
        return [replace(base, lost=True)]
    out = []
    for signal, change, value, lifetime in effects:
        until = None if lifetime else step.until
        if change == "add":
            out.append(replace(base, field=signal, until=until, add=value))
        else:
            out.append(replace(base, field=signal, until=until, set=value))
    return out
