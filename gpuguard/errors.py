"""Every error gpuguard raises, under one root.

Errors from the libraries gpuguard drives (``pynvml.NVMLError``, fsspec and OS errors,
``kubernetes.client.ApiException``) are translated where they enter gpuguard, in one place per
library, and chained with ``raise ... from exc`` so the original stays visible.

    GpuGuardError
    ├── ConfigError                 bad configuration or input: names the field, the value, what is allowed
    │   └── ScenarioError           a malformed fake-NVML scenario or recording
    └── HealthError                 the health source itself failed (not the GPU)
        ├── NvmlUnavailableError    no NVML library or driver on this machine
        └── NvmlError               any other NVML failure; ``.code`` is the nvmlReturn_t value
"""

from __future__ import annotations

from typing import Any


class GpuGuardError(Exception):
    """Root of every error gpuguard raises."""


class ConfigError(GpuGuardError, ValueError):
    """Invalid configuration or input.

    The message names the field, the offending value, and what is allowed, so a user can fix it
    without reading gpuguard's source.
    """

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: {value!r} is not valid; {allowed}")


class ScenarioError(ConfigError):
    """A fake-NVML scenario or recording that cannot be used."""


class HealthError(GpuGuardError):
    """The health source failed; this says nothing about the GPU itself."""


class NvmlUnavailableError(HealthError):
    """NVML cannot be used on this machine (library missing, driver not loaded, no permission)."""


class NvmlError(HealthError):
    """An NVML call failed.

    Attributes:
        code: the ``nvmlReturn_t`` value, for example 15 for ``NVML_ERROR_GPU_IS_LOST``.
        call: the NVML function that failed.
    """

    def __init__(self, message: str, *, code: int, call: str) -> None:
        super().__init__(message)
        self.code = code
        self.call = call


__all__ = [
    "ConfigError",
    "GpuGuardError",
    "HealthError",
    "NvmlError",
    "NvmlUnavailableError",
    "ScenarioError",
]
