"""Reads GPUs through NVML: the only module that calls ``pynvml`` functions.

It takes any object that answers like the ``pynvml`` module, so the real library and
`gpuguard.fakenvml.FakeNvml` run the same code path.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import pynvml

from gpuguard.errors import HealthError, NvmlError, NvmlUnavailableError
from gpuguard.health import _nvml_errors
from gpuguard.health.config import HealthConfig
from gpuguard.health.rules import DeviceEvent, DeviceLimits, Sample
from gpuguard.health.signals import EVENT_TYPES, FIELD_SIGNALS, FieldSignal

log = logging.getLogger("gpuguard.health")

T = TypeVar("T")

# Per-field return codes that mean "this GPU or driver does not have this signal".
_OFF_CODES: Final = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT})

WATCHED_EVENTS: Final[int] = sum(EVENT_TYPES.values())


@dataclass
class DeviceInfo:
    """A watched GPU: identity, limits, and which signals it answers."""

    index: int
    uuid: str
    pci_bus_id: str
    name: str
    handle: Any
    limits: DeviceLimits
    fields: list[FieldSignal] = field(default_factory=lambda: list(FIELD_SIGNALS))
    signals_off: set[str] = field(default_factory=set)
    nvlink_up: list[int] = field(default_factory=list)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _handle_key(handle: Any) -> int:
    """A stable key for a device handle: real handles are ctypes pointers, fakes are objects."""
    try:
        return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


def _decode(value: Any) -> float | int:
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
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT:
        return int(v.usVal)
    return int(v.ullVal)


class NvmlSource:
    """Opens NVML, reads one GPU per call, and waits for NVML events.

    Args:
        nvml: a ``pynvml``-compatible module; ``pynvml`` itself when None.
        config: retries and timeouts.

    Raises:
        NvmlUnavailableError: from `open` when NVML cannot be used on this machine.
    """

    def __init__(self, nvml: Any = None, config: HealthConfig | None = None) -> None:
        self.nvml = nvml if nvml is not None else pynvml
        self.config = config or HealthConfig()
        self.devices: list[DeviceInfo] = []
        self._by_handle: dict[int, DeviceInfo] = {}
        self._event_set: Any = None
        self._initialised = False

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self, selection: Sequence[int | str] | None = None) -> list[DeviceInfo]:
        """Initialise NVML and read each selected GPU's identity and limits.

        Args:
            selection: NVML indices or UUIDs; every GPU when None.
        """
        nv = self.nvml
        self._call("nvmlInit", nv.nvmlInit)
        self._initialised = True
        count = self._call("nvmlDeviceGetCount", nv.nvmlDeviceGetCount)
        wanted = None if selection is None else {str(s) for s in selection}
        devices = []
        for index in range(count):
            handle = self._call("nvmlDeviceGetHandleByIndex", nv.nvmlDeviceGetHandleByIndex, index)
            uuid = _text(self._call("nvmlDeviceGetUUID", nv.nvmlDeviceGetUUID, handle))
            if wanted is not None and str(index) not in wanted and uuid not in wanted:
                continue
            devices.append(self._describe(index, uuid, handle))
        if wanted is not None:
            found = {str(d.index) for d in devices} | {d.uuid for d in devices}
            missing = sorted(wanted - found)
            if missing:
                raise NvmlError(
                    f"GPUs not found by NVML: {', '.join(missing)} (NVML sees {count})", code=-1, call="open"
                )
        self.devices = devices
        self._by_handle = {_handle_key(d.handle): d for d in devices}
        return devices

    def _describe(self, index: int, uuid: str, handle: Any) -> DeviceInfo:
        nv = self.nvml
        pci = self._optional("nvmlDeviceGetPciInfo", nv.nvmlDeviceGetPciInfo, handle)
        name = self._optional("nvmlDeviceGetName", nv.nvmlDeviceGetName, handle)
        links = []
        for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                state = nv.nvmlDeviceGetNvLinkState(handle, link)
            except pynvml.NVMLError:
                break  # NotSupported on the first link (no NVLink) or past the last one
            if state == pynvml.NVML_FEATURE_ENABLED:
                links.append(link)
        limits = DeviceLimits(
            pcie_max_link_width=self._optional(
                "nvmlDeviceGetMaxPcieLinkWidth", nv.nvmlDeviceGetMaxPcieLinkWidth, handle
            ),
            temperature_slowdown_c=self._optional(
                "nvmlDeviceGetTemperatureThreshold",
                nv.nvmlDeviceGetTemperatureThreshold,
                handle,
                pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
            ),
            memory_temperature_max_c=self._optional(
                "nvmlDeviceGetTemperatureThreshold",
                nv.nvmlDeviceGetTemperatureThreshold,
                handle,
                pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX,
            ),
            nvlink_links=len(links),
        )
        info = DeviceInfo(
            index=index,
            uuid=uuid,
            pci_bus_id=_text(pci.busId) if pci is not None else "",
            name=_text(name) if name is not None else "",
            handle=handle,
            limits=limits,
            nvlink_up=links,
        )
        if not links:
            # No NVLink here: its counters answer NotSupported, so leave them out of the batch.
            self._switch_off(info, *(s.name for s in FIELD_SIGNALS if s.name.startswith("nvlink_")), "nvlink_down")
        return info

    def close(self) -> None:
        if self._event_set is not None:
            with contextlib.suppress(pynvml.NVMLError):
                self.nvml.nvmlEventSetFree(self._event_set)
            self._event_set = None
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(pynvml.NVMLError):
                self.nvml.nvmlShutdown()

    # -- polling --------------------------------------------------------------------------------

    def read(self, device: DeviceInfo, now: float) -> Sample:
        """One poll of one GPU: one batched field read plus a few single calls.

        Never raises for the GPU's sake: a lost GPU and a failed call come back in the sample.
        """
        nv = self.nvml
        readings: dict[str, float | int] = {}
        try:
            if device.fields:
                ids = [s.field_id for s in device.fields]
                values = self._call("nvmlDeviceGetFieldValues", nv.nvmlDeviceGetFieldValues, device.handle, ids)
                for signal, value in zip(list(device.fields), values, strict=False):
                    ret = int(value.nvmlReturn)
                    if ret == pynvml.NVML_SUCCESS:
                        readings[signal.name] = _decode(value)
                    elif ret == pynvml.NVML_ERROR_GPU_IS_LOST:
                        return Sample(at=now, lost=True)
                    elif ret in _OFF_CODES:
                        self._switch_off(device, signal.name)
                if "power_w" in readings:
                    readings["power_w"] = readings["power_w"] / 1000.0
            h = device.handle
            self._read_call(
                device, readings, "temperature", nv.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU
            )
            self._read_call(device, readings, "clock_events", nv.nvmlDeviceGetCurrentClocksEventReasons, h)
            self._read_call(device, readings, "pcie_link_width", nv.nvmlDeviceGetCurrPcieLinkWidth, h)
            self._read_call(device, readings, "utilization", lambda x: nv.nvmlDeviceGetUtilizationRates(x).gpu, h)
            if device.nvlink_up and "nvlink_down" not in device.signals_off:
                down = sum(
                    1
                    for link in device.nvlink_up
                    if self._call("nvmlDeviceGetNvLinkState", nv.nvmlDeviceGetNvLinkState, h, link)
                    != pynvml.NVML_FEATURE_ENABLED
                )
                readings["nvlink_down"] = down
        except NvmlError as exc:
            if exc.code == pynvml.NVML_ERROR_GPU_IS_LOST:
                return Sample(at=now, lost=True)
            return Sample(at=now, error=str(exc))
        except HealthError as exc:
            return Sample(at=now, error=str(exc))
        return Sample(at=now, readings=readings)

    def _read_call(
        self,
        device: DeviceInfo,
        readings: dict[str, float | int],
        name: str,
        fn: Callable[..., Any],
        *args: Any,
    ) -> None:
        if name in device.signals_off:
            return
        try:
            readings[name] = self._call(name, fn, *args)
        except NvmlError as exc:
            if exc.code in _OFF_CODES:
                self._switch_off(device, name)
            else:
                raise

    def _switch_off(self, device: DeviceInfo, *names: str) -> None:
        new = [n for n in names if n not in device.signals_off]
        if not new:
            return
        device.signals_off.update(new)
        device.fields = [s for s in device.fields if s.name not in device.signals_off]
        # Said once per GPU and signal: the rules that need these signals are off for this GPU.
        log.info("GPU %d (%s) does not support %s: those checks are off", device.index, device.uuid, ", ".join(new))

    # -- events ---------------------------------------------------------------------------------

    def open_events(self) -> int:
        """Register the watched event types on every device; returns how many devices have some."""
        nv = self.nvml
        self._event_set = self._call("nvmlEventSetCreate", nv.nvmlEventSetCreate)
        registered = 0
        for device in self.devices:
            supported = self._optional(
                "nvmlDeviceGetSupportedEventTypes", nv.nvmlDeviceGetSupportedEventTypes, device.handle
            )
            mask = WATCHED_EVENTS & int(supported or 0)
            if not mask:
                self._switch_off(device, "events")
                continue
            self._call("nvmlDeviceRegisterEvents", nv.nvmlDeviceRegisterEvents, device.handle, mask, self._event_set)
            registered += 1
        return registered

    def wait_event(self, timeout_s: float, now: Callable[[], float]) -> tuple[DeviceInfo, DeviceEvent] | None:
        """Block up to ``timeout_s`` for one event; None on timeout or for devices not watched."""
        try:
            data = self.nvml.nvmlEventSetWait_v2(self._event_set, int(timeout_s * 1000))
        except pynvml.NVMLError as exc:
            if _nvml_errors.is_code(exc, pynvml.NVML_ERROR_TIMEOUT):
                return None
            raise _nvml_errors.translate(exc, "nvmlEventSetWait_v2") from exc
        device = self._by_handle.get(_handle_key(data.device))
        if device is None:
            return None
        event_type = int(data.eventType)
        for kind, bit in EVENT_TYPES.items():
            if bit and event_type & bit:
                xid = int(data.eventData) if kind == "xid" else None
                return device, DeviceEvent(at=now(), kind=kind, xid=xid)
        return None

    # -- calls ----------------------------------------------------------------------------------

    def _call(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        """Call NVML, retrying driver timeouts, and translate its errors."""
        attempt = 0
        while True:
            try:
                return fn(*args)
            except pynvml.NVMLError as exc:
                if _nvml_errors.is_code(exc, pynvml.NVML_ERROR_TIMEOUT) and attempt < self.config.driver_retries:
                    attempt += 1
                    time.sleep(0.01 * attempt)
                    continue
                raise _nvml_errors.translate(exc, name) from exc
            except OSError as exc:  # ctypes failing to load the library surfaces as OSError on some systems
                raise NvmlUnavailableError(f"NVML is not available: {exc}") from exc

    def _optional(self, name: str, fn: Callable[..., T], *args: Any) -> T | None:
        """A value that enriches the picture but is not worth failing for."""
        try:
            return self._call(name, fn, *args)
        except NvmlError:
            return None
