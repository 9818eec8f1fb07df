"""Opening GPUs through NVML: by index or UUID, a MIG device through its parent, and errors put where
NVML puts them (nvml.h's documented return codes of each call, quoted where they decide something)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import pynvml

from gpuguard.health._nvml_errors import error_name
from gpuguard.health._nvml_values import LOST, DeviceInfo, code_of, describe_error, text
from gpuguard.health._samples import DeviceLimits
from gpuguard.health.devices import GpuInfo

log = logging.getLogger("gpuguard.health")

NOT_FOUND: Final = pynvml.NVML_ERROR_NOT_FOUND
NO_PERMISSION: Final = pynvml.NVML_ERROR_NO_PERMISSION
# nvmlDeviceGetMigMode's values (nvml.h NVML_DEVICE_MIG_DISABLE / _ENABLE): current mode, and pending.
_MIG_MODES: Final[dict[int, str]] = {0: "disabled", 1: "enabled"}
_MIG_PENDING: Final[dict[int, str]] = {0: " (pending disable)", 1: " (pending enable)"}


class Opening:
    """Opens one target GPU at a time; mixed into `NvmlSource`, whose call helpers it uses."""

    nvml: Any
    skipped: list[str]
    notes: list[str]
    _reopening: bool = False
    _retry: Callable[..., Any]
    _optional: Callable[..., Any]
    _describe: Callable[[DeviceInfo], None]

    def inventory(self, count: int) -> list[GpuInfo]:
        """Every GPU this process may open, with its UUID, PCI bus id and name (for mapping CUDA's view).

        A GPU NVML denies (NO_PERMISSION: the container's cgroup) is not one CUDA can see either, so it
        is left out. One that cannot be read otherwise (lost, say) keeps its place, with an empty UUID:
        leaving it out would shift every index after it onto the wrong GPU.
        """
        gpus = []
        for index in range(count):
            handle = None
            try:
                handle = self._retry(self.nvml.nvmlDeviceGetHandleByIndex, index)
                uuid = text(self._retry(self.nvml.nvmlDeviceGetUUID, handle))
            except pynvml.NVMLError as exc:
                if code_of(exc) != NO_PERMISSION:
                    pci = self._pci_bus_id(handle) if handle is not None else ""
                    gpus.append(GpuInfo(index, "", pci, ""))
                continue
            gpus.append(GpuInfo(index, uuid, self._pci_bus_id(handle), self._name(handle)))
        return gpus

    def open_target(self, target: int | str, key: int) -> DeviceInfo | None:
        """One GPU: a `DeviceInfo` with a handle, or one that says why it could not be opened (None when
        NVML denies it: skipped, said once)."""
        nv = self.nvml
        call = "nvmlDeviceGetHandleByIndex" if isinstance(target, int) else "nvmlDeviceGetHandleByUUID"
        index, uuid = (target, "") if isinstance(target, int) else (-1, target)
        handle: Any = None
        try:
            if isinstance(target, int):
                handle = self._retry(nv.nvmlDeviceGetHandleByIndex, target)
            else:
                handle, uuid = self._by_uuid(target)
            if uuid.startswith("MIG-"):
                return self._open_mig(handle, uuid, target, key)
            if isinstance(target, str):
                index = self._index_of(handle)
            call = "nvmlDeviceGetUUID"
            uuid = text(self._retry(nv.nvmlDeviceGetUUID, handle))
        except pynvml.NVMLError as exc:
            if code_of(exc) == LOST and call == "nvmlDeviceGetHandleByUUID":
                return self._lost_by_uuid(str(target), key, exc)
            pci = self._pci_bus_id(handle) if call == "nvmlDeviceGetUUID" else ""
            return self.open_failed(key, target, index, uuid, pci, call, exc)
        return self._opened(key, target, index, uuid, handle)

    def _opened(self, key: int, target: int | str, index: int, uuid: str, handle: Any) -> DeviceInfo:
        device = DeviceInfo(
            key=key, index=index, uuid=uuid, pci_bus_id="", name="", handle=handle, limits=DeviceLimits(), target=target
        )
        self._describe(device)
        return device

    def _by_uuid(self, target: str) -> tuple[Any, str]:
        """Open by UUID. torch names a CUDA device by its bare UUID, a MIG device's too: try both prefixes."""
        if target.upper().startswith(("GPU-", "MIG-")):
            return self._retry(self.nvml.nvmlDeviceGetHandleByUUID, target), target
        try:
            return self._retry(self.nvml.nvmlDeviceGetHandleByUUID, "GPU-" + target), "GPU-" + target
        except pynvml.NVMLError as exc:
            if code_of(exc) != NOT_FOUND:
                raise
        return self._retry(self.nvml.nvmlDeviceGetHandleByUUID, "MIG-" + target), "MIG-" + target

    def _open_mig(self, mig: Any, mig_uuid: str, target: int | str, key: int) -> DeviceInfo | None:
        """A MIG device is watched through its parent GPU: health, XIDs and ECC are per GPU.

        nvml.h, nvmlDeviceGetDeviceHandleFromMigDeviceHandle: INVALID_ARGUMENT, NOT_SUPPORTED, UNKNOWN;
        any of them leaves the job's MIG device an UNKNOWN entry of its own, named, never unwatched.
        """
        nv = self.nvml
        call = "nvmlDeviceGetDeviceHandleFromMigDeviceHandle"
        try:
            parent = self._retry(getattr(nv, call), mig)
            call = "nvmlDeviceGetUUID"
            uuid = text(self._retry(nv.nvmlDeviceGetUUID, parent))
        except (pynvml.NVMLError, AttributeError) as exc:
            failed = self.open_failed(key, target, -1, mig_uuid, "", call, exc)
            if failed is not None:
                failed.mig_devices = [mig_uuid]
            return failed
        device = self._opened(key, target, self._index_of(parent), uuid, parent)
        instance = self._optional("nvmlDeviceGetGpuInstanceId", getattr(nv, "nvmlDeviceGetGpuInstanceId", None), mig)
        compute = self._optional(
            "nvmlDeviceGetComputeInstanceId", getattr(nv, "nvmlDeviceGetComputeInstanceId", None), mig
        )
        label = mig_uuid
        if instance is not None:
            device.mig_instances.add(int(instance))
            label += f" (GPU instance {int(instance)}" + (
                f", compute instance {int(compute)})" if compute is not None else ")"
            )
        device.mig_devices = [label]
        return device

    def _lost_by_uuid(self, target: str, key: int, exc: BaseException) -> DeviceInfo | None:
        """nvml.h, nvmlDeviceGetHandleByUUID: GPU_IS_LOST "if any GPU has fallen off the bus or is otherwise
        inaccessible" — not necessarily this one. Find which GPU is lost (by index and PCI bus id) before
        marking anything: this target opened by index when it is readable, LOST only when it is not."""
        nv = self.nvml
        count = int(self._retry(nv.nvmlDeviceGetCount))
        lost: list[dict[str, Any]] = []
        found: tuple[int, Any, str] | None = None
        for index in range(count):
            handle = None
            try:
                handle = self._retry(nv.nvmlDeviceGetHandleByIndex, index)
                uuid = text(self._retry(nv.nvmlDeviceGetUUID, handle))
            except pynvml.NVMLError as err:
                if code_of(err) == LOST:
                    lost.append({"index": index, "pci_bus_id": self._pci_bus_id(handle) if handle is not None else ""})
                continue
            if _same(uuid, target) or any(_same(mig, target) for mig in self._migs_if_any(handle, target)):
                found = (index, handle, uuid)
        named = ", ".join(f"GPU {g['index']}" + (f" ({g['pci_bus_id']})" if g["pci_bus_id"] else "") for g in lost)
        if found is not None:
            if lost:
                note = f"{named}: lost (NVML answers GPU_IS_LOST); not one of the GPUs watched here"
                if note not in self.notes:
                    self.notes.append(note)
                    log.warning("gpuguard health: %s", note)
            index, handle, uuid = found
            if not _same(uuid, target):  # one of its MIG devices: opened through the parent, by index
                mig_uuid, mig = next((m, h) for m, h in self._mig_handles(handle) if _same(m, target))
                return self._open_mig(mig, mig_uuid, target, key)
            return self._opened(key, target, index, uuid, handle)
        if not lost:
            # No GPU answers lost on its own now: the open is tried again on the next poll.
            return self.open_failed(key, target, -1, target, "", "nvmlDeviceGetHandleByUUID", exc)
        evidence = {"lost_gpus": lost, "nvml_says": "GPU_IS_LOST if any GPU has fallen off the bus (nvml.h)"}
        only = lost[0] if len(lost) == 1 else None
        device = self.open_failed(
            key,
            target,
            only["index"] if only else -1,
            target,
            only["pci_bus_id"] if only else "",
            "nvmlDeviceGetHandleByUUID",
            exc,
        )
        if device is not None:
            device.open_evidence = evidence
            if not self._reopening:
                log.warning("gpuguard health: %s is not readable and NVML reports lost: %s", target, named)
        return device

    def _migs_if_any(self, parent: Any, target: str) -> list[str]:
        """A GPU's MIG devices, when the target may be one (a ``MIG-`` or bare UUID)."""
        return [] if target.upper().startswith("GPU-") else self.mig_devices_of(parent)

    def mig_devices_of(self, parent: Any) -> list[str]:
        """The UUIDs of the MIG devices on a GPU."""
        return [uuid for uuid, _ in self._mig_handles(parent)]

    def _mig_handles(self, parent: Any) -> list[tuple[str, Any]]:
        """The MIG devices on a GPU (nvmlDeviceGetMaxMigDeviceCount, then nvmlDeviceGetMigDeviceHandleByIndex,
        which answers NOT_FOUND "if no valid MIG device was found at index"), by index: not by UUID, which
        answers GPU_IS_LOST while any GPU is lost."""
        nv = self.nvml
        count_fn = getattr(nv, "nvmlDeviceGetMaxMigDeviceCount", None)
        most = self._optional("nvmlDeviceGetMaxMigDeviceCount", count_fn, parent)
        found = []
        for index in range(int(most or 0)):
            try:
                mig = self._retry(nv.nvmlDeviceGetMigDeviceHandleByIndex, parent, index)
                found.append((text(self._retry(nv.nvmlDeviceGetUUID, mig)), mig))
            except pynvml.NVMLError:
                continue
        return found

    def read_mig_mode(self, device: DeviceInfo) -> None:
        """MIG mode (nvmlDeviceGetMigMode: NOT_SUPPORTED "if device doesn't support MIG mode": None), and,
        for a GPU watched as a whole with MIG on, its MIG devices."""
        nv = self.nvml
        modes = self._optional("nvmlDeviceGetMigMode", getattr(nv, "nvmlDeviceGetMigMode", None), device.handle)
        if modes is None:
            device.mig_mode = None
            return
        current, pending = (int(m) for m in modes)
        mode = _MIG_MODES.get(current, str(current))
        device.mig_mode = mode if pending == current else mode + _MIG_PENDING.get(pending, f" (pending {pending})")
        if current == 1 and not device.mig_devices:
            device.mig_devices = self.mig_devices_of(device.handle)

    def open_failed(
        self, key: int, target: int | str, index: int, uuid: str, pci: str, call: str, exc: BaseException
    ) -> DeviceInfo | None:
        code = code_of(exc)
        who = f"GPU {index}" if index >= 0 else f"GPU {uuid}"
        message = f"{call} failed: {describe_error(exc)} ({error_name(code)})"
        if code == NO_PERMISSION and call == "nvmlDeviceGetHandleByIndex":
            # nvml.h: nvmlDeviceGetCount_v2 counts every GPU "even if nvmlDeviceGetHandleByIndex_v2 returns
            # NVML_ERROR_NO_PERMISSION for such device": one this container may not use is not ours to watch.
            note = f"{who}: skipped, NVML denies access ({message})"
            self.skipped.append(note)
            log.warning("gpuguard health: %s", note)
            return None
        if not self._reopening:  # said once, at start; the retries on each poll are quiet
            log.warning("gpuguard health: %s%s could not be opened: %s", who, f" ({pci})" if pci else "", message)
        return DeviceInfo(
            key=key,
            index=index,
            uuid=uuid,
            pci_bus_id=pci,
            name="",
            handle=None,
            limits=DeviceLimits(),
            target=target,
            fields=[],
            open_code=code,
            open_error=message,
            open_call=call,
        )

    def reopen(self, device: DeviceInfo) -> bool:
        """Try again to open a GPU that could not be opened (it may be back after a reset); True when it is."""
        if device.handle is not None:
            return False
        self._reopening = True
        try:
            fresh = self.open_target(device.target, device.key)
        finally:
            self._reopening = False
        if fresh is None or fresh.handle is None:
            if fresh is not None:  # the latest reason, which may have changed (LOST -> UNKNOWN, say)
                device.open_code, device.open_error, device.open_call = (
                    fresh.open_code,
                    fresh.open_error,
                    fresh.open_call,
                )
                device.open_evidence = fresh.open_evidence
            return False
        mig = device.mig_devices if not fresh.mig_devices else fresh.mig_devices
        device.__dict__.update(fresh.__dict__)
        device.mig_devices = mig
        log.warning("gpuguard health: GPU %d (%s) answers NVML again", device.index, device.uuid)
        return True

    def _index_of(self, handle: Any) -> int:
        fn = getattr(self.nvml, "nvmlDeviceGetIndex", None)
        if fn is None:
            return -1
        try:
            return int(self._retry(fn, handle))
        except pynvml.NVMLError:
            return -1

    def _pci_bus_id(self, handle: Any) -> str:
        pci = self._optional("nvmlDeviceGetPciInfo", self.nvml.nvmlDeviceGetPciInfo, handle)
        return text(pci.busId) if pci is not None else ""

    def _name(self, handle: Any) -> str:
        name = self._optional("nvmlDeviceGetName", self.nvml.nvmlDeviceGetName, handle)
        return text(name) if name is not None else ""


def _same(uuid: str, target: str) -> bool:
    """``target`` names ``uuid``: the same text, or the same without its ``GPU-``/``MIG-`` prefix (torch)."""
    return uuid == target or uuid.split("-", 1)[-1] == target
