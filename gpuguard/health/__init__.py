"""GPU health: the model, the rules, the NVML source, and the background monitor."""

from gpuguard.health.config import HealthConfig
from gpuguard.health.model import DeviceHealth, HealthChange, HealthSnapshot, HealthState, Reason, Remedy
from gpuguard.health.monitor import HealthMonitor
from gpuguard.health.xid import XidClass, XidTable

__all__ = [
    "DeviceHealth",
    "HealthChange",
    "HealthConfig",
    "HealthMonitor",
    "HealthSnapshot",
    "HealthState",
    "Reason",
    "Remedy",
    "XidClass",
    "XidTable",
]
