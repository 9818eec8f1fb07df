"""Reads GPUs through NVML: the only module that calls ``pynvml`` functions.

It takes any object that answers like the ``pynvml`` module, so the real library and
`gpuguard.fakenvml.FakeNvml` run the same code path.

Failures are isolated per device and per call, after NVML's documented return codes (``nvml.h``):
one GPU that cannot be opened is an entry of its own (LOST, FAILING or UNKNOWN; skipped when NVML
denies it), one call that a GPU does not answer switches that signal off for that GPU only, and an
event registration that fails leaves that GPU on polling alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pynvml

from gpuguard.errors import HealthError, NvmlError, NvmlUnavailableError
from gpuguard.health import _nvml_errors
from gpuguard.health.config import HealthConfig
from gpuguard.health.rules import DeviceEvent, DeviceLimits, Sample
from gpuguard.health.signals import (
    EVENT_TYPES,
    FIELD_SIGNALS,
    NVLINK_STATE_FIELD,
    ROTATING_CALLS,
    FieldSignal,
    nvml_constant,
)

log = logging.getLogger("gpuguard.health")

# Return codes that mean "this GPU or driver does not offer this signal (to us)": the signal is
# switched off for that GPU only. NOT_SUPPORTED and INVALID_ARGUMENT per nvml.h; NO_PERMISSION for
# queries a container may not make; FUNCTION_NOT_FOUND when the driver's library predates the call
# (pynvml raises it from _nvmlGetFunctionPointer, e.g. nvmlDeviceGetCurrentClocksEventReasons before R535).
_OFF_CODES: Final = frozenset(
    {
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_ERROR_INVALID_ARGUMENT,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    }
)
_LOST: Final = pynvml.NVML_ERROR_GPU_IS_LOST
_RESET_REQUIRED: Final = pynvml.NVML_ERROR_RESET_REQUIRED

WATCHED_EVENTS: Final[int] = sum(EVENT_TYPES.values())

# nvmlValueType_t in nvml.h; absent from nvidia-ml-py 12.535.161.
_VALUE_TYPE_UNSIGNED_SHORT: Final[int] = nvml_constant("NVML_VALUE_TYPE_UNSIGNED_SHORT", 6)
# NVML_FEATURE_ENABLED: what NVML_FI_DEV_NVLINK_GET_STATE answers for an active link (nvml.h).
_LINK_ACTIVE: Final[int] = int(pynvml.NVML_FEATURE_ENABLED)


@dataclass
class DeviceInfo:
    """A watched GPU: identity, limits, and which signals it answers.

    ``handle`` is None when NVML could not open the GPU; ``open_code`` and ``open_error`` then say why,
    and every poll reports that instead of reading.
    """

    key: int
    index: int
    uuid: str
    pci_bus_id: str
    name: str
    handle: Any
    limits: DeviceLimits
    fields: list[FieldSignal] = field(default_factory=lambda: list(FIELD_SIGNALS))
    signals_off: set[str] = field(default_factory=set)
    nvlink_links: list[int] = field(default_factory=list)
    events: bool = False
    open_code: int | None = None
    open_error: str | None = None
    cycles: int = 0


class _Lost(Exception):
    def __init__(self, call: str) -> None:
        super().__init__(call)
        self.call = call


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _code(exc: BaseException) -> int:
    return int(getattr(exc, "value", pynvml.NVML_ERROR_UNKNOWN))


def _describe_error(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # pynvml's __str__ calls into the library, which may be the thing that is missing
        return f"NVML error {_code(exc)}"


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
    if kind == _VALUE_TYPE_UNSIGNED_SHORT:
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
        self.skipped: list[str] = []
        self._by_handle: dict[int, DeviceInfo] = {}
        self._event_set: Any = None
        self._initialised = False
        self._said: set[tuple[int, str, int]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self, selection: Sequence[int | str] | None = None) -> list[DeviceInfo]:
        """Initialise NVML and read each selected GPU's identity and limits.

        A GPU that NVML counts but cannot open does not blind the others: GPU_IS_LOST makes it a LOST
        entry, RESET_REQUIRED a FAILING one, other failures an UNKNOWN one (identified by index, and by
        PCI bus id when only the UUID could not be read); NO_PERMISSION (a GPU the container's cgroup
        denies) skips it, said once in the log and in `skipped`.

        Args:
            selection: NVML indices or UUIDs; every GPU when None. UUIDs are opened by UUID.

        Raises:
            NvmlUnavailableError: NVML itself cannot be used.
            NvmlError: an index in ``selection`` past the GPUs NVML counts. (A UUID NVML does not know is
                an UNKNOWN entry: the job's GPU is missing, which must show, and the others are watched.)
        """
        nv = self.nvml
        self._call("nvmlInit", nv.nvmlInit)
        self._initialised = True
        count = self._call("nvmlDeviceGetCount", nv.nvmlDeviceGetCount)
        targets: list[int | str] = list(range(count)) if selection is None else list(selection)
        missing = [str(t) for t in targets if isinstance(t, int) and not 0 <= t < count]
        devices: list[DeviceInfo] = []
        self.skipped = []
        for target in targets:
            if isinstance(target, int) and not 0 <= target < count:
                continue
            device = self._open_one(target, len(devices))
            if device is not None:
                devices.append(device)
        if missing:
            raise NvmlError(
                f"GPUs not found by NVML: {', '.join(sorted(missing))} (NVML sees {count})", code=-1, call="open"
            )
        self.devices = devices
        self._by_handle = {_handle_key(d.handle): d for d in devices if d.handle is not None}
        return devices

    def _open_one(self, target: int | str, key: int) -> DeviceInfo | None:
        nv = self.nvml
        index, uuid, pci = (target, "", "") if isinstance(target, int) else (-1, target, "")
        call = "nvmlDeviceGetHandleByIndex" if isinstance(target, int) else "nvmlDeviceGetHandleByUUID"
        try:
            if isinstance(target, int):
                handle = self._retry(nv.nvmlDeviceGetHandleByIndex, target)
            else:
                handle = self._retry(nv.nvmlDeviceGetHandleByUUID, target)
                index = self._index_of(handle)
            if not uuid:
                call = "nvmlDeviceGetUUID"
                uuid = _text(self._retry(nv.nvmlDeviceGetUUID, handle))
        except pynvml.NVMLError as exc:
            if call == "nvmlDeviceGetUUID":
                pci = self._pci_bus_id(handle)
            return self._open_failed(key, index, uuid, pci, call, exc)
        device = DeviceInfo(
            key=key, index=index, uuid=uuid, pci_bus_id="", name="", handle=handle, limits=DeviceLimits()
        )
        self._describe(device)
        return device

    def _open_failed(
        self, key: int, index: int, uuid: str, pci: str, call: str, exc: BaseException
    ) -> DeviceInfo | None:
        code = _code(exc)
        who = f"GPU {index}" if index >= 0 else f"GPU {uuid}"
        message = f"{call} failed: {_describe_error(exc)} (NVML error {code})"
        if code == pynvml.NVML_ERROR_NO_PERMISSION:
            # A GPU this container may not use (cgroup), though nvmlDeviceGetCount counts it: not ours to watch.
            note = f"{who}: skipped, NVML denies access ({message})"
            self.skipped.append(note)
            log.warning("gpuguard health: %s", note)
            return None
        log.warning("gpuguard health: %s%s could not be opened: %s", who, f" ({pci})" if pci else "", message)
        return DeviceInfo(
            key=key,
            index=index,
            uuid=uuid,
            pci_bus_id=pci,
            name="",
            handle=None,
            limits=DeviceLimits(),
            fields=[],
            open_code=code,
            open_error=message,
        )

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
        return _text(pci.busId) if pci is not None else ""

    def _describe(self, device: DeviceInfo) -> None:
        nv, handle = self.nvml, device.handle
        device.pci_bus_id = self._pci_bus_id(handle)
        name = self._optional("nvmlDeviceGetName", nv.nvmlDeviceGetName, handle)
        device.name = _text(name) if name is not None else ""
        links = self._nvlink_links(device)
        device.nvlink_links = links
        device.limits = DeviceLimits(
            pcie_max_link_width=self._optional(
                "nvmlDeviceGetMaxPcieLinkWidth", nv.nvmlDeviceGetMaxPcieLinkWidth, handle
            ),
            pcie_generation=self._optional(
                "nvmlDeviceGetCurrPcieLinkGeneration", getattr(nv, "nvmlDeviceGetCurrPcieLinkGeneration", None), handle
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
        if links:
            # One entry per link in the same batched read: link state costs no call of its own.
            device.fields = [
                *device.fields,
                *(FieldSignal(f"nvlink_state_{i}", NVLINK_STATE_FIELD, "", i) for i in links),
            ]
        else:
            # No NVLink here: its counters answer NotSupported, so leave them out of the batch; without
            # NVLink there is no NVSwitch fabric either.
            names = [s.name for s in FIELD_SIGNALS if s.name.startswith("nvlink_")]
            self._switch_off(device, *names, "nvlink_down", "fabric")

    def _nvlink_links(self, device: DeviceInfo) -> list[int]:
        """The NVLinks this GPU has: those whose state answers, in one batched field read at start.

        A link whose state read fails is skipped alone (the others are still watched); a link that
        answers but is inactive already at start counts, so the rules see it down (DCGM fails any
        down link, whenever it went down).
        """
        most = int(getattr(self.nvml, "NVML_NVLINK_MAX_LINKS", 18))
        try:
            values = self._retry(
                self.nvml.nvmlDeviceGetFieldValues, device.handle, [(NVLINK_STATE_FIELD, i) for i in range(most)]
            )
        except pynvml.NVMLError:
            return []
        return [i for i, v in enumerate(values) if int(v.nvmlReturn) == pynvml.NVML_SUCCESS]

    def close(self) -> None:
        self._free_events()
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(pynvml.NVMLError):
                self.nvml.nvmlShutdown()

    # -- polling --------------------------------------------------------------------------------

    def read(self, device: DeviceInfo, now: float) -> Sample:
        """One poll of one GPU: one batched field read plus two single calls.

        The batch carries the counters and one state entry per NVLink; the clock event reasons are read
        every cycle; temperature, PCIe link width, utilization and the NVSwitch fabric state take turns
        in the third call (all of them in the first cycle; signals a GPU lacks drop out of the turns).
        A cycle is three NVML calls per GPU however many NVLinks it has.

        Never raises for the GPU's sake: a lost GPU, a GPU that needs a reset and failed calls come
        back in the sample; a call the GPU does not answer switches that signal off for it.
        """
        if device.handle is None:
            return Sample(
                at=now,
                lost=device.open_code == _LOST,
                reset_required=device.open_code == _RESET_REQUIRED,
                error=device.open_error,
                call="open",
            )
        readings: dict[str, float | int] = {}
        errors: list[str] = []
        reset = False
        try:
            reset = self._read_fields(device, readings, errors)
            if not reset:
                turns = [c for c in ROTATING_CALLS if c not in device.signals_off]
                calls = turns if device.cycles == 0 or not turns else [turns[device.cycles % len(turns)]]
                for name in ("clock_events", *calls):
                    reset = self._read_call(device, readings, errors, name)
                    if reset:
                        break
        except _Lost as lost:
            return Sample(at=now, lost=True, call=lost.call)
        finally:
            device.cycles += 1
        if reset:
            return Sample(at=now, readings=readings, reset_required=True)
        if not readings:
            reason = "; ".join(errors) if errors else "every signal is off for this GPU"
            return Sample(at=now, error=reason)
        return Sample(at=now, readings=readings, errors=tuple(errors))

    def _read_fields(self, device: DeviceInfo, readings: dict[str, float | int], errors: list[str]) -> bool:
        if not device.fields:
            return False
        fields = list(device.fields)
        ids = [(s.field_id, s.scope) if s.scope else s.field_id for s in fields]
        fn = self.nvml.nvmlDeviceGetFieldValues
        values = self._device_call(device, errors, "nvmlDeviceGetFieldValues", None, fn, device.handle, ids)
        if values is _RESET:
            return True
        if values is None:
            return False
        down: list[int] = []
        for signal, value in zip(fields, values, strict=False):
            ret = int(value.nvmlReturn)
            if ret == pynvml.NVML_SUCCESS:
                number = _decode(value)
                if signal.name.startswith("nvlink_state_"):
                    if int(number) != _LINK_ACTIVE:
                        down.append(signal.scope)
                    continue
                readings[signal.name] = number
            elif ret == _LOST:
                raise _Lost("nvmlDeviceGetFieldValues")
            elif ret == _RESET_REQUIRED:
                return True
            elif ret in _OFF_CODES:
                self._switch_off(device, signal.name)
            else:
                errors.append(f"{signal.name}: NVML error {ret}")
        if device.nvlink_links and "nvlink_down" not in device.signals_off:
            readings["nvlink_down"] = len(down)
            readings["nvlink_down_links"] = sum(1 << link for link in down)
        if "power_w" in readings:
            readings["power_w"] = readings["power_w"] / 1000.0
        return False

    def _read_call(self, device: DeviceInfo, readings: dict[str, float | int], errors: list[str], name: str) -> bool:
        if name in device.signals_off:
            return False
        nv, h = self.nvml, device.handle
        calls: dict[str, tuple[str, Callable[[], Any]]] = {
            "temperature": (
                "nvmlDeviceGetTemperature",
                lambda: nv.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            ),
            "clock_events": (
                "nvmlDeviceGetCurrentClocksEventReasons",
                lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h),
            ),
            "pcie_link_width": ("nvmlDeviceGetCurrPcieLinkWidth", lambda: nv.nvmlDeviceGetCurrPcieLinkWidth(h)),
            "utilization": ("nvmlDeviceGetUtilizationRates", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
        }
        if name == "fabric":
            return self._read_fabric(device, readings, errors)
        call, fn = calls[name]
        if getattr(nv, call, None) is None:  # this nvidia-ml-py release lacks the binding
            self._switch_off(device, name)
            return False
        value = self._device_call(device, errors, call, name, fn)
        if value is _RESET:
            return True
        if value is not None:
            readings[name] = value
        return False

    def _read_fabric(self, device: DeviceInfo, readings: dict[str, float | int], errors: list[str]) -> bool:
        """The GPU's NVSwitch fabric registration (nvmlDeviceGetGpuFabricInfo); off where there is no fabric."""
        nv = self.nvml
        info_type = getattr(nv, "c_nvmlGpuFabricInfo_t", None)
        fn = getattr(nv, "nvmlDeviceGetGpuFabricInfo", None)
        if info_type is None or fn is None:
            self._switch_off(device, "fabric")
            return False
        info = info_type()
        got = self._device_call(
            device, errors, "nvmlDeviceGetGpuFabricInfo", "fabric", fn, device.handle, ctypes.byref(info)
        )
        if got is _RESET:
            return True
        if got is None and "fabric" in device.signals_off:
            return False
        state = int(info.state)
        if state == 0:  # NVML_GPU_FABRIC_STATE_NOT_SUPPORTED: no NVSwitch fabric on this system
            self._switch_off(device, "fabric", why="no NVSwitch fabric")
            return False
        readings["fabric_state"] = state
        readings["fabric_status"] = int(info.status)
        return False

    def _device_call(
        self, device: DeviceInfo, errors: list[str], call: str, signal: str | None, fn: Callable[..., Any], *args: Any
    ) -> Any:
        """One NVML call for one GPU, isolated: the value, or None (said), `_RESET`, or `_Lost` raised."""
        try:
            return self._retry(fn, *args)
        except pynvml.NVMLError as exc:
            code = _code(exc)
            if code == _LOST:
                raise _Lost(call) from None
            if code == _RESET_REQUIRED:
                return _RESET
            if code in _OFF_CODES and signal is not None:
                self._switch_off(device, signal, why=f"{call}: {_describe_error(exc)}")
                return None
            text = f"{call}: {_describe_error(exc)} (NVML error {code})"
            errors.append(text)
            self._say_once(device, call, code, text)
            return None

    def _say_once(self, device: DeviceInfo, call: str, code: int, text: str) -> None:
        key = (device.key, call, code)
        if key not in self._said:
            self._said.add(key)
            log.warning("gpuguard health: GPU %d (%s): %s", device.index, device.uuid, text)

    def _switch_off(self, device: DeviceInfo, *names: str, why: str = "") -> None:
        new = [n for n in names if n not in device.signals_off]
        if not new:
            return
        device.signals_off.update(new)
        device.fields = [s for s in device.fields if s.name not in device.signals_off]
        # Said once per GPU and signal: the rules that need these signals are off for this GPU.
        log.info(
            "GPU %d (%s) does not support %s%s: those checks are off for it",
            device.index,
            device.uuid,
            ", ".join(new),
            f" ({why})" if why else "",
        )

    # -- events ---------------------------------------------------------------------------------

    def open_events(self, devices: Sequence[DeviceInfo] | None = None) -> int:
        """Register the watched event types on each device; returns how many devices have events.

        A device whose registration fails stays on polling alone, said once; the others keep events.

        Raises:
            HealthError: when no event set can be created at all (every GPU is then polled alone).
        """
        nv = self.nvml
        self._free_events()
        self._event_set = self._call("nvmlEventSetCreate", nv.nvmlEventSetCreate)
        registered = 0
        for device in self.devices if devices is None else devices:
            device.events = False
            if device.handle is None or "events" in device.signals_off:
                continue
            try:
                supported = self._retry(nv.nvmlDeviceGetSupportedEventTypes, device.handle)
                mask = WATCHED_EVENTS & int(supported or 0)
                if not mask:
                    self._switch_off(device, "events", why="no watched event type is supported")
                    continue
                self._retry(nv.nvmlDeviceRegisterEvents, device.handle, mask, self._event_set)
            except pynvml.NVMLError as exc:
                why = f"registering NVML events failed: {_describe_error(exc)} (NVML error {_code(exc)})"
                self._switch_off(device, "events", why=why + "; polling alone watches it")
                continue
            device.events = True
            registered += 1
        return registered

    def _free_events(self) -> None:
        if self._event_set is not None:
            with contextlib.suppress(pynvml.NVMLError):
                self.nvml.nvmlEventSetFree(self._event_set)
            self._event_set = None

    def find_lost_in_events(self) -> list[DeviceInfo]:
        """After the event wait answered GPU_IS_LOST: which registered GPUs are gone.

        ``nvmlEventSetWait_v2`` answers for the whole set, so each GPU is tried in an event set of its
        own (a zero-timeout wait); the ones that answer GPU_IS_LOST are returned, and the event set is
        rebuilt without them so that the other GPUs keep their events.
        """
        nv = self.nvml
        lost: list[DeviceInfo] = []
        for device in [d for d in self.devices if d.events]:
            probe = None
            try:
                probe = self._retry(nv.nvmlEventSetCreate)
                self._retry(
                    nv.nvmlDeviceRegisterEvents,
                    device.handle,
                    WATCHED_EVENTS & int(self._retry(nv.nvmlDeviceGetSupportedEventTypes, device.handle) or 0),
                    probe,
                )
                self._retry(nv.nvmlEventSetWait_v2, probe, 0)
            except pynvml.NVMLError as exc:
                if _code(exc) == _LOST:
                    lost.append(device)
            finally:
                if probe is not None:
                    with contextlib.suppress(pynvml.NVMLError):
                        nv.nvmlEventSetFree(probe)
        for device in lost:
            device.events = False
            device.signals_off.add("events")
        self.open_events([d for d in self.devices if d not in lost])
        return lost

    def wait_event(self, timeout_s: float, now: Callable[[], float]) -> tuple[DeviceInfo, DeviceEvent] | None:
        """Block up to ``timeout_s`` for one event; None on timeout or for devices not watched.

        Raises:
            NvmlError: the wait failed; ``code`` 15 (GPU_IS_LOST) when a registered GPU is gone.
        """
        if self._event_set is None:
            return None
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

    def _retry(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call NVML, retrying driver timeouts (nvml.h: TIMEOUT is transient); other errors propagate."""
        attempt = 0
        while True:
            try:
                return fn(*args)
            except pynvml.NVMLError as exc:
                if _nvml_errors.is_code(exc, pynvml.NVML_ERROR_TIMEOUT) and attempt < self.config.driver_retries:
                    attempt += 1
                    time.sleep(0.01 * attempt)
                    continue
                raise

    def _call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call NVML and translate its errors to gpuguard's (for the calls that concern NVML as a whole)."""
        try:
            return self._retry(fn, *args)
        except pynvml.NVMLError as exc:
            raise _nvml_errors.translate(exc, name) from exc
        except OSError as exc:  # ctypes failing to load the library surfaces as OSError on some systems
            raise NvmlUnavailableError(f"NVML is not available: {exc}") from exc

    def _optional(self, name: str, fn: Callable[..., Any] | None, *args: Any) -> Any:
        """A value that enriches the picture but is not worth failing for."""
        if fn is None:
            return None
        try:
            return self._call(name, fn, *args)
        except HealthError:
            return None


class _ResetMarker:
    def __repr__(self) -> str:
        return "<RESET_REQUIRED>"


_RESET: Final = _ResetMarker()
