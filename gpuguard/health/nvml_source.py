"""Reads GPUs through NVML: the only module that calls ``pynvml`` functions.

It takes any object that answers like the ``pynvml`` module, so the real library and
`gpuguard.fakenvml.FakeNvml` run the same code path.

Failures are isolated per device and per call, after NVML's documented return codes (``nvml.h``):
one GPU that cannot be opened is an entry of its own (LOST, FAILING or UNKNOWN; skipped when NVML
denies it), tried again on each poll; a call the GPU does not offer (NOT_SUPPORTED, FUNCTION_NOT_FOUND)
switches that signal off for that GPU only; any other failure leaves the signal unreadable for that
cycle, said in the sample, and retried on the next. Opening lives in `_nvml_open`, events in
`_nvml_events`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pynvml

from gpuguard.errors import HealthError, NvmlError, NvmlUnavailableError
from gpuguard.health import _nvml_errors
from gpuguard.health._nvml_errors import error_name
from gpuguard.health._nvml_events import WATCHED_EVENTS, EventPath
from gpuguard.health._nvml_open import Opening
from gpuguard.health._nvml_values import (
    LINK_ACTIVE,
    LOST,
    OFF_CODES,
    RESET,
    RESET_REQUIRED,
    DeviceInfo,
    GpuLost,
    code_of,
    decode,
    describe_error,
    handle_key,
)
from gpuguard.health.config import HealthConfig
from gpuguard.health.devices import JobScope, Level
from gpuguard.health.rules import DeviceLimits, Sample
from gpuguard.health.signals import (
    FIELD_SIGNALS,
    NVLINK_STATE_FIELD,
    ROTATING_CALLS,
    FieldSignal,
)

log = logging.getLogger("gpuguard.health")

Selection = Sequence[int | str] | JobScope | None


class NvmlSource(Opening, EventPath):
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
        self.notes: list[str] = []
        self.watching = ""
        self.watching_level: Level = "info"
        self._by_handle: dict[int, DeviceInfo] = {}
        self._event_set: Any = None
        self._initialised = False
        self._said: set[tuple[int, str, int]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self, selection: Selection = None) -> list[DeviceInfo]:
        """Initialise NVML and read each selected GPU's identity and limits.

        A GPU that NVML counts but cannot open does not blind the others: GPU_IS_LOST makes it a LOST
        entry (from a by-UUID open, only once the lost GPU is found to be this one), RESET_REQUIRED,
        INSUFFICIENT_POWER and IRQ_ISSUE a FAILING one, other failures an UNKNOWN one (identified by index,
        and by PCI bus id when only the UUID could not be read); NO_PERMISSION (a GPU the container's
        cgroup denies) skips it, said once in the log and in `skipped`. A MIG device is watched through
        its parent GPU.

        Args:
            selection: NVML indices or UUIDs (``GPU-...``, ``MIG-...``); a `JobScope` (the job's GPUs,
                mapped here onto NVML's); every GPU when None. UUIDs are opened by UUID.

        Raises:
            NvmlUnavailableError: NVML itself cannot be used.
            NvmlError: an index in ``selection`` past the GPUs NVML counts. (A UUID NVML does not know is
                an UNKNOWN entry: the job's GPU is missing, which must show, and the others are watched.)
        """
        nv = self.nvml
        self._call("nvmlInit", nv.nvmlInit)
        self._initialised = True
        count = self._call("nvmlDeviceGetCount", nv.nvmlDeviceGetCount)
        self.skipped, self.notes = [], []
        targets = self._targets(selection, count)
        missing = [str(t) for t in targets if isinstance(t, int) and not 0 <= t < count]
        devices: list[DeviceInfo] = []
        for target in targets:
            if isinstance(target, int) and not 0 <= target < count:
                continue
            device = self.open_target(target, len(devices))
            if device is not None:
                devices.append(device)
        if missing:
            raise NvmlError(
                f"GPUs not found by NVML: {', '.join(sorted(missing))} (NVML sees {count})", code=-1, call="open"
            )
        self.devices = _merge_mig(devices)
        self._by_handle = {handle_key(d.handle): d for d in self.devices if d.handle is not None}
        return self.devices

    def _targets(self, selection: Selection, count: int) -> list[int | str]:
        if isinstance(selection, JobScope):
            inventory = self.inventory(count) if selection.needs_inventory else None
            resolved = selection.resolve(inventory)
            self.watching, self.watching_level = resolved.description, resolved.level
            return list(range(count)) if resolved.targets is None else resolved.targets
        if selection is None:
            self.watching = f"every GPU NVML shows ({count})"
            return list(range(count))
        self.watching = "GPU(s) " + ", ".join(str(t) for t in selection) + " (as asked)"
        return list(selection)

    def _describe(self, device: DeviceInfo) -> None:
        nv, handle = self.nvml, device.handle
        device.pci_bus_id = self._pci_bus_id(handle)
        device.name = self._name(handle)
        self.read_mig_mode(device)
        self._discover_links(device)
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
            nvlink_links=len(device.nvlink_links),
        )

    def _discover_links(self, device: DeviceInfo) -> str | None:
        """The NVLinks this GPU has: those whose state entry answers, in one batched field read.

        A link that answers INVALID_ARGUMENT ("link is invalid"), NOT_SUPPORTED or FUNCTION_NOT_FOUND does
        not exist here; one that answers another error exists but is unreadable now (the rules see it
        unreadable, and a down one as down: DCGM fails any down link, whenever it went down). A batch that
        fails as a whole leaves the links unknown: tried again on the next poll. Returns that error.
        """
        most = int(getattr(self.nvml, "NVML_NVLINK_MAX_LINKS", 18))
        try:
            values = self._retry(
                self.nvml.nvmlDeviceGetFieldValues, device.handle, [(NVLINK_STATE_FIELD, i) for i in range(most)]
            )
        except pynvml.NVMLError as exc:
            code = code_of(exc)
            if code in OFF_CODES:
                values = []
            else:
                return f"nvmlDeviceGetFieldValues (NVLink states): {describe_error(exc)} ({error_name(code)})"
        absent = {pynvml.NVML_ERROR_INVALID_ARGUMENT, *OFF_CODES}
        links = [i for i, v in enumerate(values) if int(v.nvmlReturn) not in absent]
        device.nvlink_links, device.nvlink_known = links, True
        device.limits = DeviceLimits(**{**device.limits.__dict__, "nvlink_links": len(links)})
        if links:
            # One entry per link in the same batched read: link state costs no call of its own.
            device.fields = [
                *(f for f in device.fields if not f.name.startswith("nvlink_state_")),
                *(FieldSignal(f"nvlink_state_{i}", NVLINK_STATE_FIELD, "", i) for i in links),
            ]
        else:
            # No NVLink here: its counters answer NotSupported, so leave them out of the batch; without
            # NVLink there is no NVSwitch fabric either.
            names = [s.name for s in FIELD_SIGNALS if s.name.startswith("nvlink_")]
            self._switch_off(device, *names, "nvlink_down", "fabric")
        return None

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
        back in the sample (``unreadable`` names each signal that failed, with the NVML error); a call
        the GPU does not offer switches that signal off for it.
        """
        if device.handle is None:
            return Sample(
                at=now,
                lost=device.open_code == LOST,
                reset_required=device.open_code == RESET_REQUIRED,
                error=device.open_error,
                call=device.open_call or "open",
                open_code=device.open_code,
                evidence=dict(device.open_evidence),
            )
        readings: dict[str, float | int] = {}
        errors: list[str] = []
        unreadable: dict[str, str] = {}
        reset = False
        try:
            if not device.nvlink_known:
                failed = self._discover_links(device)
                if failed is not None:
                    for name in ("nvlink_down", *(s.name for s in FIELD_SIGNALS if s.name.startswith("nvlink_"))):
                        unreadable[name] = failed
            reset = self._read_fields(device, readings, errors, unreadable)
            if not reset:
                turns = [c for c in ROTATING_CALLS if c not in device.signals_off]
                calls = turns if device.cycles == 0 or not turns else [turns[device.cycles % len(turns)]]
                for name in ("clock_events", *calls):
                    reset = self._read_call(device, readings, errors, unreadable, name)
                    if reset:
                        break
        except GpuLost as lost:
            return Sample(at=now, lost=True, call=lost.call)
        finally:
            device.cycles += 1
        if device.events_error is not None:
            unreadable["events"] = device.events_error
        off = frozenset(device.signals_off)
        unreadable = {name: said for name, said in unreadable.items() if name not in off}
        if reset:
            return Sample(at=now, readings=readings, reset_required=True, unreadable=unreadable, off=off)
        if not readings:
            reason = "; ".join(errors) if errors else "every signal is off for this GPU"
            return Sample(at=now, error=reason, unreadable=unreadable, off=off)
        return Sample(at=now, readings=readings, errors=tuple(errors), unreadable=unreadable, off=off)

    def _read_fields(
        self, device: DeviceInfo, readings: dict[str, float | int], errors: list[str], unreadable: dict[str, str]
    ) -> bool:
        if not device.fields:
            return False
        fields = list(device.fields)
        ids = [(s.field_id, s.scope) if s.scope else s.field_id for s in fields]
        fn = self.nvml.nvmlDeviceGetFieldValues
        # nvml.h: the call fails as a whole only with INVALID_ARGUMENT, "if device is invalid"; each entry
        # has its own nvmlReturn, which "you must check" for each value.
        failed: dict[str, str] = {}
        values = self._device_call(device, errors, failed, "nvmlDeviceGetFieldValues", None, fn, device.handle, ids)
        if failed:
            for signal in fields:
                unreadable[_signal_of(signal)] = failed["*"]
            return False
        if values is RESET:
            return True
        if values is None:
            return False
        down: list[int] = []
        unread_links: list[int] = []
        for signal, value in zip(fields, values, strict=False):
            ret = int(value.nvmlReturn)
            if ret == pynvml.NVML_SUCCESS:
                number = decode(value)
                if signal.name.startswith("nvlink_state_"):
                    if int(number) != LINK_ACTIVE:
                        down.append(signal.scope)
                    continue
                readings[signal.name] = number
            elif ret == LOST:
                raise GpuLost("nvmlDeviceGetFieldValues")
            elif ret == RESET_REQUIRED:
                return True
            elif ret in OFF_CODES:
                self._switch_off(device, signal.name)
            else:
                said = f"nvmlDeviceGetFieldValues: {error_name(ret)} ({ret})"
                if signal.name.startswith("nvlink_state_"):
                    unread_links.append(signal.scope)
                    said = f"link {signal.scope}: {said}"
                name = _signal_of(signal)
                unreadable[name] = f"{unreadable[name]}; {said}" if name in unreadable else said
                errors.append(f"{signal.name}: {error_name(ret)}")
                self._say_once(device, f"field {signal.name}", ret, said)
        if device.nvlink_links and "nvlink_down" not in device.signals_off and (down or not unread_links):
            # A link read down is evidence even while another link cannot be read; "all up" needs them all.
            readings["nvlink_down"] = len(down)
            readings["nvlink_down_links"] = sum(1 << link for link in down)
        if "power_w" in readings:
            readings["power_w"] = readings["power_w"] / 1000.0
        return False

    def _read_call(
        self,
        device: DeviceInfo,
        readings: dict[str, float | int],
        errors: list[str],
        unreadable: dict[str, str],
        name: str,
    ) -> bool:
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
            return self._read_fabric(device, readings, errors, unreadable)
        call, fn = calls[name]
        if getattr(nv, call, None) is None:  # this nvidia-ml-py release lacks the binding
            self._switch_off(device, name)
            return False
        value = self._device_call(device, errors, unreadable, call, name, fn)
        if value is RESET:
            return True
        if value is not None:
            readings[name] = value
        return False

    def _read_fabric(
        self, device: DeviceInfo, readings: dict[str, float | int], errors: list[str], unreadable: dict[str, str]
    ) -> bool:
        """The GPU's NVSwitch fabric registration (nvmlDeviceGetGpuFabricInfo); off where there is no fabric."""
        nv = self.nvml
        info_type = getattr(nv, "c_nvmlGpuFabricInfo_t", None)
        fn = getattr(nv, "nvmlDeviceGetGpuFabricInfo", None)
        if info_type is None or fn is None:
            self._switch_off(device, "fabric")
            return False
        info = info_type()
        got = self._device_call(
            device, errors, unreadable, "nvmlDeviceGetGpuFabricInfo", "fabric", fn, device.handle, ctypes.byref(info)
        )
        if got is RESET:
            return True
        if got is None:  # switched off, or failed this cycle (said in the sample's errors)
            return False
        state = int(info.state)
        if state == 0:  # NVML_GPU_FABRIC_STATE_NOT_SUPPORTED: no NVSwitch fabric on this system
            self._switch_off(device, "fabric", why="no NVSwitch fabric")
            return False
        readings["fabric_state"] = state
        readings["fabric_status"] = int(info.status)
        return False

    def _device_call(
        self,
        device: DeviceInfo,
        errors: list[str],
        unreadable: dict[str, str],
        call: str,
        signal: str | None,
        fn: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """One NVML call for one GPU, isolated: the value, or None (said), `RESET`, or `GpuLost` raised.

        NOT_SUPPORTED / FUNCTION_NOT_FOUND switch the signal off (every field signal, for the batched
        read); any other error leaves it unreadable this cycle (``unreadable[signal]``, or
        ``unreadable["*"]`` for the batch) and it is tried again on the next.
        """
        try:
            return self._retry(fn, *args)
        except pynvml.NVMLError as exc:
            code = code_of(exc)
            if code == LOST:
                raise GpuLost(call) from None
            if code == RESET_REQUIRED:
                return RESET
            said = f"{call}: {describe_error(exc)} ({error_name(code)})"
            if code in OFF_CODES:
                names = [signal] if signal is not None else [f.name for f in device.fields]
                self._switch_off(device, *names, why=said)
                return None
            unreadable[signal or "*"] = said
            errors.append(said)
            self._say_once(device, call, code, said)
            return None

    def _say_once(self, device: DeviceInfo, call: str, code: int, text: str) -> None:
        key = (device.key, call, code)
        if key not in self._said:
            self._said.add(key)
            log.warning(
                "gpuguard health: GPU %d (%s): %s; retried on every poll (said once)", device.index, device.uuid, text
            )

    def _switch_off(self, device: DeviceInfo, *names: str, why: str = "") -> None:
        new = [n for n in names if n not in device.signals_off]
        if not new:
            return
        device.signals_off.update(new)
        device.fields = [s for s in device.fields if s.name not in device.signals_off]
        # Said once per GPU and signal: the rules that need these signals are off for this GPU
        # (listed per GPU in DeviceHealth.signals_off).
        log.info(
            "GPU %d (%s) does not support %s%s: those checks are off for it",
            device.index,
            device.uuid,
            ", ".join(new),
            f" ({why})" if why else "",
        )

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


def _signal_of(signal: FieldSignal) -> str:
    """The signal a batch entry belongs to: every per-link state entry is part of ``nvlink_down``."""
    return "nvlink_down" if signal.name.startswith("nvlink_state_") else signal.name


def _merge_mig(devices: list[DeviceInfo]) -> list[DeviceInfo]:
    """Several of the job's MIG devices on one GPU: one entry for the GPU, naming each of them."""
    merged: list[DeviceInfo] = []
    by_uuid: dict[str, DeviceInfo] = {}
    for device in devices:
        first = by_uuid.get(device.uuid) if device.handle is not None else None
        if first is None:
            if device.handle is not None:
                by_uuid[device.uuid] = device
            merged.append(device)
            continue
        first.mig_devices = [*first.mig_devices, *(m for m in device.mig_devices if m not in first.mig_devices)]
        first.mig_instances |= device.mig_instances
    for key, device in enumerate(merged):
        device.key = key
    return merged


__all__ = ["WATCHED_EVENTS", "DeviceInfo", "NvmlSource"]
