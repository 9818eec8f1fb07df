"""The background health monitor: a poll thread, an event thread, and a snapshot anyone can read."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pynvml

from gpuguard._nvml import choose_nvml
from gpuguard.errors import HealthError, NvmlError
from gpuguard.health.config import HealthConfig
from gpuguard.health.devices import job_device_selection
from gpuguard.health.model import DeviceHealth, HealthChange, HealthSnapshot, HealthState, Reason, worst_state
from gpuguard.health.nvml_source import DeviceInfo, NvmlSource
from gpuguard.health.rules import DeviceEvent, DeviceRules, Sample
from gpuguard.health.signals import RECOVERY_ACTIONS, clock_event_names
from gpuguard.health.xid import XidTable

log = logging.getLogger("gpuguard.health")

Subscriber = Callable[[HealthChange], None]
DeviceSelection = Literal["job", "all"] | Sequence[int | str]


class HealthMonitor:
    """Watches GPUs through NVML from two daemon threads and keeps a current `HealthSnapshot`.

    `start` runs on the caller's thread (it opens NVML and reads each GPU once); after it, no NVML
    call runs on the caller's thread: `snapshot` returns the latest picture from memory. A failure of
    NVML itself never raises into the caller: it is recorded (`errors`), logged once, and shows as
    ``UNKNOWN``.

    Args:
        nvml: a ``pynvml``-compatible module, or a `gpuguard.fakenvml.FakeNvml`; when None, the real
            ``pynvml`` — or the fake that ``GPUGUARD_FAKE_NVML`` names (``h200``, a recording or a
            scenario file), for putting a whole job through a fault without a broken GPU.
        config: thresholds and timings.
        devices: ``"job"`` (the CUDA devices this process sees, by UUID; every GPU when that cannot be
            told), ``"all"``, or NVML indices and UUIDs.
        clock: seconds, monotonic; the fake NVML's scenario clock when it has one.

    Example:
        >>> from gpuguard.fakenvml import FakeNvml
        >>> with HealthMonitor(FakeNvml.replay()) as monitor:
        ...     monitor.snapshot().devices[0].state
        <HealthState.HEALTHY: 'HEALTHY'>
    """

    def __init__(
        self,
        nvml: Any = None,
        config: HealthConfig | None = None,
        devices: DeviceSelection = "job",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config or HealthConfig()
        nvml = choose_nvml(nvml)
        self.source = NvmlSource(nvml, self.config)
        self.clock: Callable[[], float] = clock or getattr(nvml, "clock", None) or time.monotonic
        self._selection = devices
        self._xids = XidTable(self.config.application_xids)
        self._rules: dict[int, DeviceRules] = {}
        self._lock = threading.Lock()
        self._snapshot = HealthSnapshot(devices=(), available=False, error="not started")
        self._subscribers: list[Subscriber] = []
        self._errors: deque[str] = deque(maxlen=50)
        self._logged_errors: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.polls = 0
        self.events = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, *, threads: bool = True) -> HealthSnapshot:
        """Open NVML, read every watched GPU once, and start the background threads.

        Args:
            threads: False to drive the monitor by hand with `poll` and `process_events`
                (deterministic tests and scenario evaluation).

        Returns:
            The first snapshot; ``available`` is False when NVML cannot be used here.
        """
        selection = self._resolve_selection()
        try:
            devices = self.source.open(selection)
        except HealthError as exc:
            self._record_error(exc, "opening NVML")
            self._snapshot = HealthSnapshot(devices=(), available=False, error=str(exc), taken_at=self.clock())
            return self._snapshot
        self._rules = {d.key: DeviceRules(self.config, self._xids, d.limits) for d in devices}
        for note in self.source.skipped:
            self._errors.append(note)
        events_ok = False
        try:
            # Per device: a GPU whose registration fails is polled alone; the others keep their events.
            events_ok = self.source.open_events() > 0
        except HealthError as exc:
            self._record_error(exc, "creating the NVML event set (every GPU is polled alone)")
        self.poll()
        if threads:
            self._spawn("gpuguard-nvml-poll", self._poll_loop)
            if events_ok:
                self._spawn("gpuguard-nvml-events", self._event_loop)
        return self._snapshot

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the threads, wait for them, and release NVML. Safe to call twice."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()
        self.source.close()

    def __enter__(self) -> HealthMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading --------------------------------------------------------------------------------

    def snapshot(self) -> HealthSnapshot:
        """The latest picture, from memory; never calls NVML."""
        return self._snapshot

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` on the monitor's thread whenever a GPU's state or reasons change.

        The callback must return quickly; its exceptions are logged and otherwise ignored.

        Returns:
            A function that unsubscribes.
        """
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    @property
    def errors(self) -> list[str]:
        """The source's recent errors, oldest first (NVML failures, not GPU faults)."""
        return list(self._errors)

    # -- driving --------------------------------------------------------------------------------

    def poll(self) -> HealthSnapshot:
        """Read every watched GPU once and re-evaluate. The poll thread calls this every interval."""
        samples = [(d, self.source.read(d, self.clock())) for d in self.source.devices]
        with self._lock:
            for device, sample in samples:
                self._rules[device.key].observe(sample)
            self.polls += 1
        return self._publish()

    def process_events(self, timeout_s: float = 0.0) -> int:
        """Wait up to ``timeout_s`` for NVML events and apply all that are ready; returns how many."""
        applied = 0
        timeout = timeout_s
        while True:
            try:
                got = self.source.wait_event(timeout, self.clock)
            except NvmlError as exc:
                if exc.code != pynvml.NVML_ERROR_GPU_IS_LOST:
                    raise
                self._events_lost(exc)
                applied += 1
                break
            if got is None:
                break
            device, event = got
            self._apply_event(device, event)
            applied += 1
            timeout = 0.0
        if applied:
            self._publish()
        return applied

    def _events_lost(self, exc: NvmlError) -> None:
        """The event wait answered GPU_IS_LOST: mark the GPUs that are gone, keep events for the others."""
        lost = self.source.find_lost_in_events()
        now = self.clock()
        with self._lock:
            for device in lost:
                self._rules[device.key].observe(Sample(at=now, lost=True, call="nvmlEventSetWait_v2"))
        if not lost:
            self._record_error(exc, "waiting for NVML events (no GPU answered lost on its own)")
        log.warning(
            "gpuguard health: nvmlEventSetWait_v2 answered GPU_IS_LOST; lost: %s; events continue for the others",
            ", ".join(f"GPU {d.index} ({d.uuid})" for d in lost) or "none found",
        )
        self._wake.set()

    def _apply_event(self, device: DeviceInfo, event: DeviceEvent) -> None:
        with self._lock:
            self._rules[device.key].record_event(event)
            self.events += 1
        log.debug("GPU %d event %s xid=%s", device.index, event.kind, event.xid)

    # -- internals ------------------------------------------------------------------------------

    def _resolve_selection(self) -> list[int | str] | None:
        if self._selection == "all":
            return None
        if self._selection == "job":
            return job_device_selection()
        return list(self._selection)

    def _publish(self) -> HealthSnapshot:
        now = self.clock()
        with self._lock:
            devices = tuple(self._device_health(d, now) for d in self.source.devices)
            previous = {(d.index, d.uuid): d for d in self._snapshot.devices}
            self._snapshot = HealthSnapshot(
                devices=devices, available=True, taken_at=now, skipped=tuple(self.source.skipped)
            )
            subscribers = list(self._subscribers)
        for current in devices:
            before = previous.get((current.index, current.uuid))
            if before is None or _codes(before.reasons) != _codes(current.reasons) or before.state is not current.state:
                self._notify(subscribers, HealthChange(before, current))
        return self._snapshot

    def _device_health(self, device: DeviceInfo, now: float) -> DeviceHealth:
        rules = self._rules[device.key]
        reasons = rules.reasons(now)
        readings: dict[str, Any] = dict(rules.readings)
        if "nvlink_down_links" in readings:
            mask = int(readings.pop("nvlink_down_links"))
            readings["nvlink_down_links"] = [i for i in range(64) if mask >> i & 1]
        if "clock_events" in readings:
            readings["clock_events"] = clock_event_names(int(readings["clock_events"]))
        if "recovery_action" in readings:
            readings["recovery_action"] = RECOVERY_ACTIONS.get(
                int(readings["recovery_action"]), readings["recovery_action"]
            )
        return DeviceHealth(
            index=device.index,
            uuid=device.uuid,
            pci_bus_id=device.pci_bus_id,
            name=device.name,
            state=worst_state(reasons),
            reasons=reasons,
            readings=readings,
            signals_off=tuple(sorted(device.signals_off)),
            updated_at=now,
        )

    def _notify(self, subscribers: list[Subscriber], change: HealthChange) -> None:
        if change.state_changed and change.current.state is not HealthState.HEALTHY:
            top = change.current.reasons[0].message if change.current.reasons else ""
            log.warning("GPU %d (%s) is %s: %s", change.current.index, change.current.uuid, change.current.state, top)
        for callback in subscribers:
            try:
                callback(change)
            except Exception as exc:
                self._record_error(exc, f"health subscriber {callback!r}")

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.poll_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.poll()
            except Exception as exc:  # a monitor thread never dies and never raises into training
                self._record_error(exc, "polling NVML")

    def _event_loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                if self.process_events(self.config.event_wait_s):
                    self._wake.set()  # re-read the fields now: an event often comes with new counter values
                backoff = 0.0
            except Exception as exc:
                self._record_error(exc, "waiting for NVML events")
                backoff = min(30.0, max(1.0, backoff * 2))
                self._stop.wait(backoff)

    def _record_error(self, exc: BaseException, doing: str) -> None:
        message = f"{doing}: {exc}"
        self._errors.append(message)
        key = f"{doing}:{type(exc).__name__}"
        if key not in self._logged_errors:
            self._logged_errors.add(key)
            if isinstance(exc, HealthError):
                log.warning("gpuguard health: %s", message)
            else:
                log.error("gpuguard health: unexpected error %s", doing, exc_info=exc)


def _codes(reasons: tuple[Reason, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((r.code, r.state.value) for r in reasons)
