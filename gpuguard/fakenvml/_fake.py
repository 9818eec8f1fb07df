"""`FakeNvml`: answers like the ``pynvml`` module, from a recorded GPU and a fault scenario."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

from gpuguard.fakenvml._clock import ScenarioClock
from gpuguard.fakenvml._effects import consequences
from gpuguard.fakenvml._events import EventApi, FakeEventData
from gpuguard.fakenvml._mig import FakeMigHandle, MigApi
from gpuguard.fakenvml._recording import Recording, load_recording
from gpuguard.fakenvml._scenario import Scenario, ScenarioEvent, load_scenario
from gpuguard.health.signals import EVENT_TYPES, FIELD_BY_NAME, NVLINK_ERROR_SIGNALS, NVLINK_STATE_FIELD

# Field id -> the name a scenario uses for it: readable where gpuguard has one, else pynvml's.
_FIELD_NAMES: dict[int, str] = {
    **{getattr(pynvml, n): n for n in dir(pynvml) if n.startswith("NVML_FI_DEV_")},
    **{s.field_id: s.name for s in FIELD_BY_NAME.values()},
}
_THRESHOLD_NAMES: dict[int, str] = {
    getattr(pynvml, n): n.removeprefix("NVML_TEMPERATURE_THRESHOLD_")
    for n in dir(pynvml)
    if n.startswith("NVML_TEMPERATURE_THRESHOLD_")
}

# Call signals the scenario may change, and the recording entries they start from.
_CALL_BASE = {
    "temperature": "temp_gpu",
    "clock_events": "nvmlDeviceGetCurrentClocksEventReasons",
    "pcie_link_width": "pcie_width",
    "utilization": "util",
}


@dataclass
class FakeHandle:
    """A fake device handle; real handles are opaque pointers, so nothing may look inside."""

    index: int

    def __repr__(self) -> str:
        return f"<FakeHandle gpu {self.index}>"


class FakeNvml(MigApi, EventApi):
    """A stand-in for the ``pynvml`` module, with pynvml's real constants and exception classes.

    Attribute access falls through to ``pynvml`` for everything that is not a function the fake
    implements, so ``fake.NVML_ERROR_GPU_IS_LOST`` is 15 and ``fake.NVMLError_GpuIsLost`` is the very
    class that real code catches. Pass it wherever gpuguard takes an ``nvml`` argument.

    Args:
        scenario: what happens to which GPU when; no faults when None.
        recording: the recorded device every GPU starts as; the scenario's when None.
        clock: scenario time; manual (moved by the caller) by default.

    Example:
        >>> fake = FakeNvml.from_scenario({"gpus": 2, "events": [{"at": 4.0, "gpu": 1, "xid": 48}]})
        >>> fake.clock.advance(5.0)
    """

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        recording: Recording | None = None,
        clock: ScenarioClock | None = None,
        available: bool = True,
    ) -> None:
        self.scenario = scenario or Scenario(gpus=1)
        self.recording = recording or load_recording(self.scenario.recording)
        self.clock = clock or ScenarioClock()
        self.available = available
        self.calls = 0
        self._lock = threading.Lock()
        self._initialised = 0
        self._handles: list[Any] = [FakeHandle(i) for i in range(self.scenario.gpus)]
        self._timeouts_used: dict[int, int] = {}
        # The scenario's steps and what the hardware shows with each XID or event (a double-bit ECC
        # count with XID 48, a lost GPU with XID 79: gpuguard.fakenvml._effects), in time order.
        steps = [*self.scenario.events, *(c for e in self.scenario.events for c in consequences(e))]
        self._steps = sorted(steps, key=lambda e: e.at)
        # Events that arrive through event sets, in time order: (at, gpu, type bit, data, GPU instance).
        timeline: list[tuple[float, int, int, int, int]] = []
        for e in self.scenario.events:
            instance = 0xFFFFFFFF if e.instance is None else e.instance  # nvml.h: the whole GPU
            if e.xid is not None:
                timeline.append((e.at, e.gpu, EVENT_TYPES["xid"], e.xid, instance))
            elif e.event is not None:
                timeline.append((e.at, e.gpu, EVENT_TYPES[e.event], 0, instance))
        self._timeline = sorted(timeline, key=lambda t: t[0])

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def replay(cls, recording: str | Path = "h200", *, gpus: int = 1) -> FakeNvml:
        """GPUs that answer exactly what the recorded device answered, with no faults."""
        return cls(Scenario(gpus=gpus, recording=str(recording)))

    @classmethod
    def from_scenario(
        cls, scenario: str | Path | dict[str, Any] | Scenario, *, realtime: bool = False, speed: float = 1.0
    ) -> FakeNvml:
        """GPUs that go through a scenario; time is manual unless ``realtime``."""
        parsed = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        return cls(parsed, clock=ScenarioClock(realtime=realtime, speed=speed))

    @classmethod
    def from_env(cls, value: str) -> FakeNvml:
        """The fake named by ``GPUGUARD_FAKE_NVML``: ``h200``, a recording, or a scenario file.

        Scenarios run on a real-time clock from the moment the fake is made, so a job that knows
        nothing of fakes can be put through one: ``GPUGUARD_FAKE_NVML=fault.json torchrun train.py``.
        """
        if value == "h200":
            return cls.replay()
        path = Path(value)
        if path.suffix in (".yaml", ".yml"):
            return cls.from_scenario(path, realtime=True)
        import json

        from gpuguard.errors import ScenarioError

        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise ScenarioError(
                "GPUGUARD_FAKE_NVML", value, "no such file; give 'h200', a recording or a scenario"
            ) from None
        except (OSError, ValueError) as exc:
            raise ScenarioError("GPUGUARD_FAKE_NVML", value, f"cannot be read: {exc}") from None
        if isinstance(data, dict) and "calls" in data:
            return cls.replay(path)
        return cls.from_scenario(load_scenario(data), realtime=True)

    @classmethod
    def missing(cls) -> FakeNvml:
        """A machine without NVML: ``nvmlInit`` raises ``NVMLError_LibraryNotFound``."""
        return cls(available=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("nvml") and callable(getattr(pynvml, name, None)) and not name.startswith("nvmlClocks"):
            raise AttributeError(f"FakeNvml does not implement {name}; add it to gpuguard.fakenvml")
        return getattr(pynvml, name)

    # -- scenario state -------------------------------------------------------------------------

    def _events(self, gpu: int, now: float) -> list[ScenarioEvent]:
        """The steps on ``gpu`` that have started by ``now`` (each step's ``until`` is checked by its use)."""
        return [e for e in self._steps if e.gpu == gpu and e.at <= now]

    def _lost(self, gpu: int, now: float) -> bool:
        return any(e.lost and e.active(now) for e in self._events(gpu, now))

    def _fallen(self, gpu: int, now: float) -> bool:
        """Lost, or answering GPU_IS_LOST to some call: what makes every by-UUID open answer GPU_IS_LOST."""
        return self._lost(gpu, now) or any(
            e.error == "GpuIsLost" and e.link is None and e.entry is None and e.active(now)
            for e in self._events(gpu, now)
        )

    def _check(self, handle: Any, call: str) -> int:
        """Raise what NVML would raise for this GPU and call now; count the call."""
        self._require_init()
        self._raise_scripted(handle.index, call)
        return int(handle.index)

    def _raise_scripted(self, gpu: int, call: str, *, generic: bool = True) -> None:
        """The scripted failure of ``call`` on ``gpu`` now, if any.

        A step without ``call`` fails every call on the GPU (``generic``), as a GPU in trouble does;
        one with ``call`` fails that function only (a NO_PERMISSION or FUNCTION_NOT_FOUND on a single
        query, a failed event registration). ``lost`` fails every call with GPU_IS_LOST: nvml.h
        documents it for each per-device function gpuguard calls, the event wait included.
        """
        now = self.clock()
        if self._lost(gpu, now):
            raise pynvml.NVMLError_GpuIsLost()
        for e in self._events(gpu, now):
            targeted = e.call == call if e.call is not None else generic
            if not targeted or e.link is not None or e.entry is not None or not e.active(now):
                continue  # a per-link or per-entry step fails that link or entry alone
            if e.error is not None:
                raise getattr(pynvml, f"NVMLError_{e.error}")()
            if e.timeouts:
                key = id(e)
                used = self._timeouts_used.get(key, 0)
                if used < e.timeouts:
                    self._timeouts_used[key] = used + 1
                    raise pynvml.NVMLError_Timeout()

    def _value(self, gpu: int, name: str, base: float) -> float:
        """A signal's value now: the recorded value changed by the scenario's steps so far.

        A ``set`` or ``add`` counts while in force (``until`` undoes it: a volatile counter is back to what
        it was, as after a GPU reset); an ``add_per_s`` adds until ``until`` and keeps what it added.
        """
        now = self.clock()
        value = base
        for e in self._events(gpu, now):
            if e.field != name:
                continue
            if e.add_per_s is not None:
                end = now if e.until is None else min(now, e.until)
                value += int(e.add_per_s * max(0.0, end - e.at))
            elif not e.active(now):
                continue
            elif e.set is not None:
                value = e.set
            elif e.add is not None:
                value += e.add
        return value

    def _scripted(self, gpu: int, name: str) -> bool:
        return any(e.field == name and e.gpu == gpu for e in self._steps)

    def _require_init(self) -> None:
        if not self._initialised:
            raise pynvml.NVMLError_Uninitialized()

    def _recorded(self, name: str) -> Any:
        ok, value = self.recording.answer(name)
        if not ok:
            raise value()
        return value

    # -- pynvml: library ------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if not self.available:
            raise pynvml.NVMLError_LibraryNotFound()
        with self._lock:
            self._initialised += 1

    def nvmlInitWithFlags(self, flags: int) -> None:
        self.nvmlInit()

    def nvmlShutdown(self) -> None:
        self._require_init()
        with self._lock:
            self._initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._require_init()
        return str(self._recorded("driver"))

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        return self.scenario.gpus

    # -- pynvml: identity -----------------------------------------------------------------------

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._require_init()
        if not 0 <= index < self.scenario.gpus:
            raise pynvml.NVMLError_InvalidArgument()
        self._raise_scripted(index, "nvmlDeviceGetHandleByIndex")
        handle: FakeHandle = self._handles[index]
        return handle

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> Any:
        """By UUID, a GPU's or a MIG device's. nvml.h: GPU_IS_LOST "if any GPU has fallen off the bus or is
        otherwise inaccessible": while one GPU is lost, every by-UUID open answers it."""
        self._require_init()
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        now = self.clock()
        if any(self._fallen(gpu, now) for gpu in range(self.scenario.gpus)):
            raise pynvml.NVMLError_GpuIsLost()
        for handle in self._handles:
            if self._uuid(handle.index) == text:
                self._raise_scripted(handle.index, "nvmlDeviceGetHandleByUUID")
                return handle
        mig = self.mig_handle_by_uuid(text)
        if mig is not None:
            self._raise_scripted(mig.index, "nvmlDeviceGetHandleByUUID")
            return mig
        raise pynvml.NVMLError_NotFound()

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self._check(handle, "nvmlDeviceGetUUID")
        if isinstance(handle, FakeMigHandle):
            return self.mig_uuid(handle.index, handle.slot)
        return self._uuid(handle.index)

    def _uuid(self, index: int) -> str:
        base = str(self._recorded("uuid"))
        if index == 0:
            return base
        # Other GPUs get distinct, stable UUIDs derived from the recorded one.
        tail = (int(base[-4:], 16) + index) % 0x10000
        return f"{base[:-4]}{tail:04x}"

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        return self._check(handle, "nvmlDeviceGetIndex")

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        self._check(handle, "nvmlDeviceGetName")
        return str(self._recorded("name"))

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> Any:
        self._check(handle, "nvmlDeviceGetPciInfo")
        pci = dict(self._recorded("pci"))
        bus = int(pci.get("bus", 0)) + handle.index
        pci["bus"] = bus
        domain, _, rest = str(pci["busId"]).partition(":")
        _, _, devfn = rest.partition(":")
        pci["busId"] = f"{domain}:{bus:02x}:{devfn}"
        return type("FakePciInfo", (), pci)()

    # -- pynvml: readings -----------------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[Any]) -> Any:
        gpu = self._check(handle, "nvmlDeviceGetFieldValues")
        self.calls += 1
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for slot, requested in zip(values, field_ids, strict=False):
            fid, scope = requested if isinstance(requested, tuple) else (requested, 0)
            slot.fieldId, slot.scopeId = fid, scope
            if fid == NVLINK_STATE_FIELD and self.scenario.nvlink_links > 0:
                self._link_state(gpu, scope, slot)
                continue
            recorded = self.recording.fields.get(fid)
            name = _FIELD_NAMES.get(fid, "")
            failing = self._entry_error(gpu, name)
            if failing is not None:
                # nvml.h: "you must check the nvmlReturn field of each value for each individual status"
                slot.nvmlReturn = failing
                continue
            nvlink = name in NVLINK_ERROR_SIGNALS and self.scenario.nvlink_links > 0
            scripted = self._scripted(gpu, name) or nvlink
            if (recorded is None or recorded.ret != pynvml.NVML_SUCCESS) and not scripted:
                slot.nvmlReturn = recorded.ret if recorded else pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            value_type = recorded.value_type if recorded and recorded.ret == pynvml.NVML_SUCCESS else 3
            base = float(recorded.value) if recorded and recorded.ret == pynvml.NVML_SUCCESS else 0.0
            value = self._value(gpu, name, base)
            slot.nvmlReturn = pynvml.NVML_SUCCESS
            slot.valueType = value_type
            slot.timestamp = int(self.clock() * 1e6)
            if value_type == pynvml.NVML_VALUE_TYPE_DOUBLE:
                slot.value.dVal = value
            elif value_type == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
                slot.value.uiVal = int(value)
            else:
                slot.value.ullVal = int(value)
        return values

    def _entry_error(self, gpu: int, name: str) -> int | None:
        """The return code a scripted step puts in one entry of the batched read (``"entry"``), if any."""
        now = self.clock()
        for e in self._events(gpu, now):
            if e.entry == name and e.error is not None and e.active(now):
                return int(getattr(pynvml, f"NVMLError_{e.error}")().value)
        return None

    def _call_value(self, handle: FakeHandle, name: str, base: Any, call: str) -> float:
        gpu = self._check(handle, call)
        self.calls += 1
        return self._value(gpu, name, float(base))

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        recorded = self._recorded(_CALL_BASE["temperature"])
        return int(self._call_value(handle, "temperature", recorded, "nvmlDeviceGetTemperature"))

    def nvmlDeviceGetTemperatureThreshold(self, handle: FakeHandle, threshold: int) -> int:
        self._check(handle, "nvmlDeviceGetTemperatureThreshold")
        return int(self._recorded(f"temp_threshold_{_THRESHOLD_NAMES.get(threshold, '?')}"))

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        base = self._recorded(_CALL_BASE["clock_events"])
        return int(self._call_value(handle, "clock_events", base, "nvmlDeviceGetCurrentClocksEventReasons"))

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeHandle) -> int:
        recorded = self._recorded(_CALL_BASE["pcie_link_width"])
        return int(self._call_value(handle, "pcie_link_width", recorded, "nvmlDeviceGetCurrPcieLinkWidth"))

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeHandle) -> int:
        self._check(handle, "nvmlDeviceGetCurrPcieLinkGeneration")
        return int(self._recorded("pcie_gen"))

    def nvmlDeviceGetGpuFabricInfo(self, handle: FakeHandle, info: Any) -> int:
        """Fabric registration: NOT_SUPPORTED without NVLink (no NVSwitch, as on the recorded H200), else
        COMPLETED with success unless the scenario sets ``fabric_state`` / ``fabric_status``.

        pynvml passes the caller's ``c_nvmlGpuFabricInfo_t`` by reference and returns NVML's return code.
        """
        gpu = self._check(handle, "nvmlDeviceGetGpuFabricInfo")
        self.calls += 1
        target = getattr(info, "_obj", info)
        if self.scenario.nvlink_links == 0 and not self._scripted(gpu, "fabric_state"):
            raise pynvml.NVMLError_NotSupported()
        target.state = int(self._value(gpu, "fabric_state", 3.0))
        target.status = int(self._value(gpu, "fabric_status", 0.0))
        return int(pynvml.NVML_SUCCESS)

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeHandle) -> int:
        self._check(handle, "nvmlDeviceGetMaxPcieLinkWidth")
        return int(self._recorded("pcie_maxwidth"))

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        recorded = self._recorded(_CALL_BASE["utilization"])
        gpu_util = int(self._call_value(handle, "utilization", recorded["gpu"], "nvmlDeviceGetUtilizationRates"))
        return pynvml.c_nvmlUtilization_t(gpu=gpu_util, memory=int(recorded.get("memory", 0)))

    def _link_state(self, gpu: int, link: int, slot: Any) -> None:
        """NVML_FI_DEV_NVLINK_GET_STATE for one link: NVML_FEATURE_ENABLED/DISABLED, as nvmlDeviceGetNvLinkState.

        A link past the GPU's last answers INVALID_ARGUMENT (nvml.h: "link is invalid").
        """
        if link >= self.scenario.nvlink_links:
            slot.nvmlReturn = pynvml.NVML_ERROR_INVALID_ARGUMENT
            return
        now = self.clock()
        for e in self._events(gpu, now):
            # A step with "link" fails that link's state alone (in the batch, its own nvmlReturn).
            if e.link == link and e.error is not None and (e.until is None or now < e.until):
                slot.nvmlReturn = int(getattr(pynvml, f"NVMLError_{e.error}")().value)
                return
        down = self._links_down(gpu)
        slot.nvmlReturn = pynvml.NVML_SUCCESS
        slot.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
        slot.timestamp = int(self.clock() * 1e6)
        slot.value.uiVal = int(pynvml.NVML_FEATURE_DISABLED if link in down else pynvml.NVML_FEATURE_ENABLED)

    def _links_down(self, gpu: int) -> set[int]:
        now = self.clock()
        return {
            int(e.set)
            for e in self._events(gpu, now)
            if e.field == "nvlink_down" and e.set is not None and e.active(now)
        }

    def nvmlDeviceGetNvLinkState(self, handle: FakeHandle, link: int) -> int:
        gpu = self._check(handle, "nvmlDeviceGetNvLinkState")
        self.calls += 1
        now = self.clock()
        for e in self._events(gpu, now):
            if e.link == link and e.error is not None and (e.until is None or now < e.until):
                raise getattr(pynvml, f"NVMLError_{e.error}")()
        if link >= self.scenario.nvlink_links:
            if self.scenario.nvlink_links == 0:
                return int(self._recorded(f"nvlink_state_{link}"))  # raises NotSupported, as on the H200
            raise pynvml.NVMLError_InvalidArgument()
        down = self._links_down(gpu)
        return int(pynvml.NVML_FEATURE_DISABLED if link in down else pynvml.NVML_FEATURE_ENABLED)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle) -> Any:
        self._check(handle, "nvmlDeviceGetMemoryInfo")
        return type("FakeMemory", (), dict(self._recorded("memory")))()

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        self._check(handle, "nvmlDeviceGetPowerUsage")
        return int(self._recorded("power_mw"))


__all__ = ["FakeEventData", "FakeHandle", "FakeNvml"]
