"""The NVML event path (XIDs, double-bit ECC, ...): registration per GPU, the wait, and its failures.

What can fail and where it is kept (nvml.h's return codes):

- ``nvmlEventSetCreate``: any error leaves every GPU without events: retried on each poll.
- ``nvmlDeviceRegisterEvents`` (INVALID_ARGUMENT, NOT_SUPPORTED, GPU_IS_LOST, UNKNOWN): NOT_SUPPORTED
  switches events off for that GPU; any other error leaves its events unreadable, retried on each poll.
- ``nvmlEventSetWait_v2`` (INVALID_ARGUMENT, TIMEOUT, GPU_IS_LOST, UNKNOWN): GPU_IS_LOST "if a GPU has
  fallen off the bus" is found per GPU (`find_lost_in_events`); any other error stays on the event path
  (the monitor marks XID events unreadable on every registered GPU and keeps polling).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

import pynvml

from gpuguard.health import _nvml_errors
from gpuguard.health._nvml_errors import error_name
from gpuguard.health._nvml_values import LOST, OFF_CODES, DeviceInfo, code_of, describe_error, handle_key
from gpuguard.health._samples import DeviceEvent
from gpuguard.health.signals import EVENT_TYPES

log = logging.getLogger("gpuguard.health")

WATCHED_EVENTS: Final[int] = sum(EVENT_TYPES.values())
# A GPU lost in the event wait is registered again (it may be back after a reset) no sooner than this.
# Each rebuild of the event set leaves a moment in which no set exists and the other GPUs' events are
# not queued anywhere (a new set sees only later events): retrying on every poll, which a lost GPU's
# own wake-up triggers at once, would reopen that window every few milliseconds (a GPU that registers
# but fails the wait) and lose a healthy GPU's XID in it. Short enough that a GPU back after a reset
# has its events again within a poll or two.
LOST_EVENTS_RETRY_S: Final = 5.0
# nvmlEventData_t.gpuInstanceId for an event that concerns the whole GPU, not one MIG instance.
_WHOLE_GPU: Final = 0xFFFFFFFF


class EventPath:
    """Mixed into `NvmlSource`: registers the watched GPUs in one event set and waits on it."""

    nvml: Any
    devices: list[DeviceInfo]
    _event_set: Any
    _by_handle: dict[int, DeviceInfo]
    _retry: Callable[..., Any]
    _switch_off: Callable[..., None]

    @property
    def has_event_set(self) -> bool:
        return self._event_set is not None

    def open_events(self, devices: Sequence[DeviceInfo] | None = None) -> int:
        """Create the event set and register each device's watched events; returns how many have events.

        A device whose registration fails stays on polling, with its XID events unreadable (retried by
        `retry_events`) unless NVML says they are not supported; the others keep events.
        """
        self._free_events()
        targets = list(self.devices if devices is None else devices)
        try:
            self._event_set = self._retry(self.nvml.nvmlEventSetCreate)
        except pynvml.NVMLError as exc:
            why = f"nvmlEventSetCreate: {describe_error(exc)} ({error_name(code_of(exc))})"
            for device in targets:
                if device.handle is not None and "events" not in device.signals_off:
                    device.events, device.events_error = False, why
            log.warning("gpuguard health: %s; XID events cannot be read, polling continues (retried)", why)
            return 0
        return sum(self._register(device) for device in targets)

    def retry_events(self, now: float) -> list[DeviceInfo]:
        """On each poll: register the GPUs whose registration failed (or create the set); returns those
        that got their events now (the monitor then starts its event thread if none runs)."""
        waiting = [
            d
            for d in self.devices
            if d.handle is not None and not d.events and "events" not in d.signals_off and now >= d.events_retry_at
        ]
        if not waiting:
            return []
        if self._event_set is None:
            self.open_events()
            return [d for d in waiting if d.events]
        return [d for d in waiting if self._register(d)]

    def _register(self, device: DeviceInfo) -> bool:
        nv = self.nvml
        device.events = False
        if device.handle is None or "events" in device.signals_off:
            return False
        try:
            supported = self._retry(nv.nvmlDeviceGetSupportedEventTypes, device.handle)
            mask = WATCHED_EVENTS & int(supported or 0)
            if not mask:
                self._switch_off(device, "events", why="no watched event type is supported")
                return False
            self._retry(nv.nvmlDeviceRegisterEvents, device.handle, mask, self._event_set)
        except pynvml.NVMLError as exc:
            code = code_of(exc)
            why = f"nvmlDeviceRegisterEvents: {describe_error(exc)} ({error_name(code)})"
            if code in OFF_CODES:
                self._switch_off(device, "events", why=why + "; polling alone watches it")
            else:
                if device.events_error is None:
                    log.warning(
                        "gpuguard health: GPU %d (%s): registering NVML events failed: %s; its XID events "
                        "cannot be read, polling continues, and registration is retried",
                        device.index,
                        device.uuid,
                        why,
                    )
                device.events_error = why
            return False
        device.events, device.events_error = True, None
        self._by_handle[handle_key(device.handle)] = device
        return True

    def _free_events(self) -> None:
        if self._event_set is not None:
            with contextlib.suppress(pynvml.NVMLError):
                self.nvml.nvmlEventSetFree(self._event_set)
            self._event_set = None

    def find_lost_in_events(self, now: float) -> list[DeviceInfo]:
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
                if code_of(exc) == LOST:
                    lost.append(device)
            finally:
                if probe is not None:
                    with contextlib.suppress(pynvml.NVMLError):
                        nv.nvmlEventSetFree(probe)
        for device in lost:
            # not off for good: registration is retried on each poll (a lost GPU answers GPU_IS_LOST to it)
            device.events, device.events_error = False, "nvmlEventSetWait_v2: NVML_ERROR_GPU_IS_LOST"
            device.events_retry_at = now + LOST_EVENTS_RETRY_S
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
        device = self._by_handle.get(handle_key(data.device))
        if device is None:
            return None
        event_type = int(data.eventType)
        instance = int(getattr(data, "gpuInstanceId", _WHOLE_GPU))
        for kind, bit in EVENT_TYPES.items():
            if bit and event_type & bit:
                xid = int(data.eventData) if kind == "xid" else None
                gpu_instance = None if instance == _WHOLE_GPU else instance
                return device, DeviceEvent(at=now(), kind=kind, xid=xid, gpu_instance=gpu_instance)
        return None
