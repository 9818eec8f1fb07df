"""The fake's MIG API: MIG mode, MIG devices and their parent, with nvml.h's return codes.

A scenario's ``"mig": {"0": 2}`` turns MIG mode on for GPU 0 with two MIG devices (GPU instances 1 and
2, compute instance 0 each). Each MIG device has a ``MIG-...`` UUID that ``nvmlDeviceGetHandleByUUID``
opens, as CUDA_VISIBLE_DEVICES and the device plugin name it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml

from gpuguard.fakenvml._recording import Recording
from gpuguard.fakenvml._scenario import MAX_MIG_DEVICES, Scenario


@dataclass(frozen=True)
class FakeMigHandle:
    """A MIG device handle: ``index`` is its parent GPU's, ``slot`` its place among the parent's MIG devices."""

    index: int
    slot: int

    def __repr__(self) -> str:
        return f"<FakeMigHandle gpu {self.index} mig {self.slot}>"


class MigApi:
    """Mixed into `FakeNvml`."""

    scenario: Scenario
    recording: Recording
    _handles: list[Any]
    _check: Callable[[Any, str], int]
    _uuid: Callable[[int], str]

    def mig_uuid(self, gpu: int, slot: int) -> str:
        """The UUID of MIG device ``slot`` on GPU ``gpu``: ``MIG-`` and a UUID derived from the parent's."""
        bare = self._uuid(gpu).removeprefix("GPU-")
        tail = (int(bare[-4:], 16) + 0x1000 * (slot + 1)) % 0x10000
        return f"MIG-{bare[:-4]}{tail:04x}"

    def mig_handle_by_uuid(self, uuid: str) -> FakeMigHandle | None:
        for gpu, count in self.scenario.mig.items():
            for slot in range(count):
                if self.mig_uuid(gpu, slot) == uuid:
                    return FakeMigHandle(gpu, slot)
        return None

    def _mig_supported(self) -> bool:
        ok, _ = self.recording.answer("mig_mode")
        return bool(ok)

    def _parent_only(self, handle: Any, call: str) -> int:
        gpu = self._check(handle, call)
        if isinstance(handle, FakeMigHandle):
            raise pynvml.NVMLError_InvalidArgument()  # a query of the parent GPU, given a MIG device handle
        return gpu

    def _mig_only(self, handle: Any, call: str) -> FakeMigHandle:
        self._check(handle, call)
        if not isinstance(handle, FakeMigHandle):
            raise pynvml.NVMLError_InvalidArgument()  # nvml.h: "if migDevice ... is invalid"
        return handle

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        """[current, pending]; NOT_SUPPORTED "if device doesn't support MIG mode" (what the recording says)."""
        gpu = self._parent_only(handle, "nvmlDeviceGetMigMode")
        if gpu in self.scenario.mig:
            return [int(pynvml.NVML_DEVICE_MIG_ENABLE), int(pynvml.NVML_DEVICE_MIG_ENABLE)]
        ok, value = self.recording.answer("mig_mode")
        if not ok:
            raise value()
        return [int(v) for v in value]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        """nvml.h: "Returns zero if MIG is not supported or enabled"."""
        gpu = self._parent_only(handle, "nvmlDeviceGetMaxMigDeviceCount")
        return MAX_MIG_DEVICES if gpu in self.scenario.mig else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> FakeMigHandle:
        """NOT_SUPPORTED without MIG; INVALID_ARGUMENT for an index past the maximum; NOT_FOUND "if no valid
        MIG device was found at index"."""
        gpu = self._parent_only(handle, "nvmlDeviceGetMigDeviceHandleByIndex")
        if not self._mig_supported():
            raise pynvml.NVMLError_NotSupported()
        most = MAX_MIG_DEVICES if gpu in self.scenario.mig else 0
        if not 0 <= index < most:
            raise pynvml.NVMLError_InvalidArgument()
        if index >= self.scenario.mig[gpu]:
            raise pynvml.NVMLError_NotFound()
        return FakeMigHandle(gpu, index)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any) -> Any:
        mig = self._mig_only(handle, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
        return self._handles[mig.index]

    def nvmlDeviceIsMigDeviceHandle(self, handle: Any) -> bool:
        self._check(handle, "nvmlDeviceIsMigDeviceHandle")
        return isinstance(handle, FakeMigHandle)

    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        return self._mig_only(handle, "nvmlDeviceGetGpuInstanceId").slot + 1

    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int:
        self._mig_only(handle, "nvmlDeviceGetComputeInstanceId")
        return 0
