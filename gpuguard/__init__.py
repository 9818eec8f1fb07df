"""gpuguard: notice a degrading GPU, checkpoint before it takes the job down, resume elsewhere.

Everything users need is importable from here; other modules are internal.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from gpuguard._version import __version__
from gpuguard.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CommitError,
    ConfigError,
    GpuGuardError,
    HealthError,
    KubernetesError,
    KubernetesForbiddenError,
    KubernetesUnreachableError,
    NvmlError,
    NvmlUnavailableError,
    ScenarioError,
    StorageError,
    UnsupportedStateError,
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
from gpuguard.plugins import hookimpl

if _TYPE_CHECKING:
    from gpuguard.checkpoint import (
        CheckpointInfo,
        CheckpointStore,
        PendingSave,
        RetryPolicy,
        SaveTimings,
        VerifyReport,
    )
    from gpuguard.guard import Action, Decision, Evacuation, EvacuationReport, Guard, GuardConfig
    from gpuguard.k8s import KubernetesConfig

# Names whose modules import torch, loaded on first use so `gpuguard status` starts fast.
_LAZY = {
    "KubernetesConfig": "gpuguard.k8s",
    "Action": "gpuguard.guard",
    "Decision": "gpuguard.guard",
    "Evacuation": "gpuguard.guard",
    "EvacuationReport": "gpuguard.guard",
    "Guard": "gpuguard.guard",
    "GuardConfig": "gpuguard.guard",
    "CheckpointInfo": "gpuguard.checkpoint",
    "CheckpointStore": "gpuguard.checkpoint",
    "PendingSave": "gpuguard.checkpoint",
    "RetryPolicy": "gpuguard.checkpoint",
    "SaveTimings": "gpuguard.checkpoint",
    "VerifyReport": "gpuguard.checkpoint",
}


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpuguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Action",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "CommitError",
    "ConfigError",
    "Decision",
    "DeviceHealth",
    "Evacuation",
    "EvacuationReport",
    "GpuGuardError",
    "Guard",
    "GuardConfig",
    "HealthChange",
    "HealthConfig",
    "HealthError",
    "HealthMonitor",
    "HealthSnapshot",
    "HealthState",
    "KubernetesConfig",
    "KubernetesError",
    "KubernetesForbiddenError",
    "KubernetesUnreachableError",
    "NvmlError",
    "NvmlUnavailableError",
    "PendingSave",
    "Reason",
    "Remedy",
    "RetryPolicy",
    "SaveTimings",
    "ScenarioError",
    "StorageError",
    "UnsupportedStateError",
    "VerifyReport",
    "XidClass",
    "XidTable",
    "__version__",
    "hookimpl",
]
