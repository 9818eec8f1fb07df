"""Every error gpuguard raises, under one root.

Errors from the libraries gpuguard drives (``pynvml.NVMLError``, fsspec and OS errors,
``kubernetes.client.ApiException``) are translated where they enter gpuguard, in one place per
library, and chained with ``raise ... from exc`` so the original stays visible.

    GpuGuardError
    ├── ConfigError                 bad configuration or input: names the field, the value, what is allowed
    │   └── ScenarioError           a malformed fake-NVML scenario or recording
    ├── HealthError                 the health source itself failed (not the GPU)
    │   ├── NvmlUnavailableError    no NVML library or driver on this machine
    │   └── NvmlError               any other NVML failure; ``.code`` is the nvmlReturn_t value
    ├── CheckpointError             a checkpoint could not be saved, found or loaded
    │   ├── UnsupportedStateError   the training state holds something gpuguard cannot store
    │   ├── CheckpointNotFoundError no committed checkpoint (or not the one asked for)
    │   ├── CheckpointCorruptError  a shard or manifest fails its checksum or format; names which
    │   ├── CheckpointMismatchError the checkpoint does not fit the live state; nothing was changed
    │   ├── CheckpointExistsError   a committed checkpoint already has this id: it is never overwritten
    │   ├── CommitError             a multi-rank save was not committed (the committing rank failed or is gone)
    │   └── StorageError            the storage failed: after retries (transient) or at once (permanent)
    └── KubernetesError             an API call failed; ``.status`` is the HTTP status (0: unreachable)
        ├── KubernetesForbiddenError  403: the message names the RBAC rule to add
        └── KubernetesUnreachableError  no answer from the API server
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


class CheckpointError(GpuGuardError):
    """A checkpoint could not be saved, found or loaded."""


class UnsupportedStateError(CheckpointError, TypeError):
    """The training state holds an object gpuguard cannot store without pickling it."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No committed checkpoint exists, or not the one asked for."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint fails its checksums or format.

    Attributes:
        shard: the file that failed, relative to the checkpoint folder.
        tensor: the tensor whose checksum failed, when one did.
    """

    def __init__(self, message: str, *, shard: str | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard
        self.tensor = tensor


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the live state: names, shapes, dtypes, types or world size differ.

    Raised before anything is written into the live state, which is left as it was.

    Attributes:
        entries: one line per entry that does not fit.
    """

    def __init__(self, message: str, *, entries: list[str] | None = None) -> None:
        super().__init__(message)
        self.entries = list(entries or [])


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A save named a checkpoint that is already committed: a committed checkpoint is never overwritten.

    Attributes:
        checkpoint_id: the id that is taken.
    """

    def __init__(self, message: str, *, checkpoint_id: str = "") -> None:
        super().__init__(message)
        self.checkpoint_id = checkpoint_id


class CommitError(CheckpointError):
    """A multi-rank save was not committed: the committing rank failed, timed out, or never answered.

    Raised by ``PendingSave.wait()`` on a rank that does not commit: such a rank reports success only
    once it has read the manifest of its own save.

    Attributes:
        checkpoint_id: the save's checkpoint id.
        timed_out: True when no manifest and no failure appeared within the deadline.
    """

    def __init__(self, message: str, *, checkpoint_id: str = "", timed_out: bool = False) -> None:
        super().__init__(message)
        self.checkpoint_id = checkpoint_id
        self.timed_out = timed_out


class StorageError(CheckpointError, OSError):
    """The storage failed.

    Attributes:
        transient: True when the error looked temporary and retries ran out.
        path: the object or file involved.
        operation: what was being done, e.g. ``listing`` or ``writing``.
        elapsed_s: how long gpuguard tried, retries included.
        timed_out: True when the operation's deadline passed.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str = "",
        transient: bool = False,
        operation: str = "",
        elapsed_s: float = 0.0,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.transient = transient
        self.operation = operation
        self.elapsed_s = elapsed_s
        self.timed_out = timed_out


class KubernetesError(GpuGuardError):
    """A Kubernetes API call failed.

    Attributes:
        status: the HTTP status; 0 when the server did not answer.
        verb: e.g. ``patch``.
        resource: e.g. ``pods/status``.
    """

    def __init__(self, message: str, *, status: int, verb: str, resource: str) -> None:
        super().__init__(message)
        self.status = status
        self.verb = verb
        self.resource = resource


class KubernetesForbiddenError(KubernetesError):
    """403: the service account lacks a permission; the message names the RBAC rule to add."""


class KubernetesUnreachableError(KubernetesError):
    """The API server did not answer; gpuguard skips the remaining actions and still leaves."""


__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "GpuGuardError",
    "HealthError",
    "KubernetesError",
    "KubernetesForbiddenError",
    "KubernetesUnreachableError",
    "NvmlError",
    "NvmlUnavailableError",
    "ScenarioError",
    "StorageError",
    "UnsupportedStateError",
]
