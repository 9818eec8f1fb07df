"""The one place where ``pynvml.NVMLError`` becomes a gpuguard error."""

from __future__ import annotations

from typing import Final

import pynvml

from gpuguard.errors import HealthError, NvmlError, NvmlUnavailableError

# NVML return codes that mean "NVML cannot be used here", as opposed to "this call failed".
UNAVAILABLE_CODES: Final[frozenset[int]] = frozenset(
    {
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        pynvml.NVML_ERROR_UNINITIALIZED,
    }
)

_HINTS: Final[dict[int, str]] = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
        "libnvidia-ml.so.1 was not found: no NVIDIA driver on this machine, or the container was started "
        "without the NVIDIA runtime"
    ),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded",
    pynvml.NVML_ERROR_NO_PERMISSION: "no permission to use NVML (device files not mounted into the container?)",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: "NVML and the kernel driver versions differ (reboot after an upgrade)",
}


# nvmlReturn_t value -> its name in nvml.h, for messages and evidence ("NVML_ERROR_UNKNOWN", not 999).
_NAMES: Final[dict[int, str]] = {
    int(getattr(pynvml, name)): name
    for name in dir(pynvml)
    if name.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, name), int)
}


def error_name(code: int) -> str:
    """``NVML_ERROR_UNKNOWN`` for 999: the name nvml.h gives a return code."""
    return _NAMES.get(int(code), f"NVML error {code}")


def is_code(exc: BaseException, code: int) -> bool:
    return isinstance(exc, pynvml.NVMLError) and getattr(exc, "value", None) == code


def translate(exc: pynvml.NVMLError, call: str) -> HealthError:
    """Map an NVML error to gpuguard's tree; ``raise translate(exc, "nvmlInit") from exc``."""
    code = int(getattr(exc, "value", pynvml.NVML_ERROR_UNKNOWN))
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ calls into the library, which may be the thing that is missing
        text = f"NVML error {code}"
    if code in UNAVAILABLE_CODES:
        hint = _HINTS.get(code, text)
        return NvmlUnavailableError(f"NVML is not available: {hint} ({call}: {text})")
    return NvmlError(f"{call} failed: {text} (NVML error {code})", code=code, call=call)
