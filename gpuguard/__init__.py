"""gpuguard: notice a degrading GPU, checkpoint before it takes the job down, resume elsewhere.

Everything users need is importable from here; other modules are internal.
"""

from gpuguard._version import __version__
from gpuguard.errors import (
    ConfigError,
    GpuGuardError,
    HealthError,
    NvmlError,
    NvmlUnavailableError,
    ScenarioError,
)
from gpuguard.health import (
    DeviceHealth,
    HealthChange,
    HealthConfig,
    HealthMonitor,
    HealthSnapshot,
    HealthState,
    Reason,
    Remedy,
    XidClass,
    XidTable,
)

__all__ = [
    "ConfigError",
    "DeviceHealth",
    "GpuGuardError",
    "HealthChange",
    "HealthConfig",
    "HealthError",
    "HealthMonitor",
    "HealthSnapshot",
    "HealthState",
    "NvmlError",
    "NvmlUnavailableError",
    "Reason",
    "Remedy",
    "ScenarioError",
    "XidClass",
    "XidTable",
    "__version__",
]
