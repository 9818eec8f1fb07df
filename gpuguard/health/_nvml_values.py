"""What the NVML source shares with its helpers: return code classes, the watched device, value decoding."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Final

import pynvml

from gpuguard.health._samples import DeviceLimits
from gpuguard.health.signals import FIELD_SIGNALS, FieldSignal, nvml_constant

# The only return codes that switch a signal off for a GPU, for good: the GPU or driver does not offer
# it. nvml.h: NOT_SUPPORTED, "if the device does not support this feature"; FUNCTION_NOT_FOUND when the
# driver's library predates the call (pynvml raises it from _nvmlGetFunctionPointer, e.g.
# nvmlDeviceGetCurrentClocksEventReasons before R535). Every other error (UNKNOWN, INVALID_ARGUMENT,
# which nvmlDeviceGetFieldValues answers when "device is invalid", NO_PERMISSION, ...) leaves the signal
# unreadable for this cycle, shown on the GPU and retried on the next one.
OFF_CODES: Final = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})
LOST: Final = pynvml.NVML_ERROR_GPU_IS_LOST
RESET_REQUIRED: Final = pynvml.NVML_ERROR_RESET_REQUIRED

# nvmlValueType_t in nvml.h; absent from the nvidia-ml-py 12.535 releases.
VALUE_TYPE_UNSIGNED_SHORT: Final[int] = nvml_constant("NVML_VALUE_TYPE_UNSIGNED_SHORT", 6)
# NVML_FEATURE_ENABLED: what NVML_FI_DEV_NVLINK_GET_STATE answers for an active link (nvml.h).
LINK_ACTIVE: Final[int] = int(pynvml.NVML_FEATURE_ENABLED)


@dataclass
class DeviceInfo:
    """A watched GPU: identity, limits, and which signals it answers.

    ``handle`` is None when NVML could not open the GPU; ``open_code`` and ``open_error`` then say why,
    every poll reports that instead of reading, and the open is tried again (``target``) on each poll.
    """

    key: int
    index: int
    uuid: str
    pci_bus_id: str
    name: str
    handle: Any
    limits: DeviceLimits
    target: int | str = -1
    fields: list[FieldSignal] = field(default_factory=lambda: list(FIELD_SIGNALS))
    signals_off: set[str] = field(default_factory=set)
    nvlink_links: list[int] = field(default_factory=list)
    nvlink_known: bool = False
    events: bool = False
    events_error: str | None = None
    events_retry_at: float = float("-inf")  # the monitor's clock before which registration is not retried
    open_code: int | None = None
    open_error: str | None = None
    open_call: str | None = None
    open_evidence: dict[str, Any] = field(default_factory=dict)
    mig_mode: str | None = None
    mig_devices: list[str] = field(default_factory=list)
    mig_instances: set[int] = field(default_factory=set)
    cycles: int = 0


class GpuLost(Exception):
    def __init__(self, call: str) -> None:
        super().__init__(call)
        self.call = call


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def code_of(exc: BaseException) -> int:
    return int(getattr(exc, "value", pynvml.NVML_ERROR_UNKNOWN))


def describe_error(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # pynvml's __str__ calls into the library, which may be the thing that is missing
        return f"NVML error {code_of(exc)}"


def handle_key(handle: Any) -> int:
    """A stable key for a device handle: real handles are ctypes pointers, fakes are objects."""
    try:
        return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


def decode(value: Any) -> float | int:
    """The number in a ``c_nvmlFieldValue_t``, by its value type."""
    kind = value.valueType
    v = value.value
    if kind == pynvml.NVML_VALUE_TYPE_DOUBLE:
        return float(v.dVal)
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
        return int(v.uiVal)
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG:
        return int(v.ulVal)
    if kind == pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return int(v.sllVal)
    if kind == pynvml.NVML_VALUE_TYPE_SIGNED_INT:
        return int(v.siVal)
    if kind == VALUE_TYPE_UNSIGNED_SHORT:
        return int(v.usVal)
    return int(v.ullVal)


class ResetMarker:
    def __repr__(self) -> str:
        return "<RESET_REQUIRED>"


RESET: Final = ResetMarker()
