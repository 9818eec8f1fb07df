"""The fake's NVML event API: event sets, registration, and a wait that delivers the scenario's events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml

from gpuguard.fakenvml._clock import ScenarioClock
from gpuguard.fakenvml._recording import Recording


@dataclass
class FakeEventData:
    """Same attributes as ``pynvml.c_nvmlEventData_t``."""

    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


class _EventSet:
    def __init__(self) -> None:
        self.masks: dict[int, int] = {}
        self.delivered = 0  # index into the fake's event timeline


class EventApi:
    """Mixed into `FakeNvml`: events come from its timeline of (at, gpu, type bit, data, GPU instance)."""

    clock: ScenarioClock
    recording: Recording
    _lock: threading.Lock
    _handles: list[Any]
    _timeline: list[tuple[float, int, int, int, int]]
    _check: Callable[[Any, str], int]
    _require_init: Callable[[], None]
    _raise_scripted: Callable[..., None]

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        self._check(handle, "nvmlDeviceGetSupportedEventTypes")
        return self.recording.supported_events

    def nvmlEventSetCreate(self) -> _EventSet:
        self._require_init()
        event_set = _EventSet()
        # A new set sees only events after its creation, as NVML's do: one at or before it (an XID at
        # "at": 0 for a monitor started at 0) is past; the readings it moved show it (_effects).
        now = self.clock()
        event_set.delivered = sum(1 for at, *_ in self._timeline if at <= now)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: _EventSet) -> None:
        self._check(handle, "nvmlDeviceRegisterEvents")
        unsupported = event_types & ~self.recording.supported_events
        if unsupported:
            raise pynvml.NVMLError_NotSupported()
        event_set.masks[handle.index] = event_set.masks.get(handle.index, 0) | event_types

    def nvmlEventSetWait_v2(self, event_set: _EventSet, timeout_ms: int) -> FakeEventData:
        self._require_init()
        deadline_wall = time.monotonic() + timeout_ms / 1000.0
        while True:
            now = self.clock()
            with self._lock:
                # Events already queued are delivered before a failure that came with them (the XID 79
                # that announces a GPU falling off the bus arrives; the next wait answers GPU_IS_LOST).
                while event_set.delivered < len(self._timeline) and self._timeline[event_set.delivered][0] <= now:
                    _at, gpu, bit, data, instance = self._timeline[event_set.delivered]
                    event_set.delivered += 1
                    if event_set.masks.get(gpu, 0) & bit:
                        return FakeEventData(self._handles[gpu], bit, data, gpuInstanceId=instance)
                next_at = self._timeline[event_set.delivered][0] if event_set.delivered < len(self._timeline) else None
            for gpu in list(event_set.masks):
                # A registered GPU that is lost (or scripted to fail the wait) fails the whole wait, as
                # nvmlEventSetWait_v2 answers for the set, not per device; steps without "call" do not.
                self._raise_scripted(gpu, "nvmlEventSetWait_v2", generic=False)
            left = deadline_wall - time.monotonic()
            if left <= 0:
                raise pynvml.NVMLError_Timeout()
            # Sleep until the next event is due or the clock moves, at most the timeout; then look again,
            # since a GPU lost meanwhile fails the wait at once, as the real one does (a lost GPU's wait
            # does not sit out its timeout). In real time, look again every 50 ms of scenario time.
            target = next_at if next_at is not None else float("inf")
            step = 0.05 if self.clock.realtime else 1e-9
            self.clock.sleep_until(min(target, now + step), left)

    def nvmlEventSetWait(self, event_set: _EventSet, timeout_ms: int) -> FakeEventData:
        return self.nvmlEventSetWait_v2(event_set, timeout_ms)

    def nvmlEventSetFree(self, event_set: _EventSet) -> None:
        event_set.masks.clear()
