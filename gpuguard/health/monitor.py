"""The background health monitor: a poll thread, an event thread, and a snapshot anyone can read."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import pynvml

from gpuguard._nvml import choose_nvml
from gpuguard.errors import HealthError, NvmlError
from gpuguard.health._nvml_errors import error_name
from gpuguard.health.config import HealthConfig
from gpuguard.health.devices import JobScope
from gpuguard.health.model import DeviceHealth, HealthChange, HealthSnapshot, HealthState, Reason, worst_state
from gpuguard.health.nvml_source import DeviceInfo, NvmlSource, Selection
from gpuguard.health.rules import DeviceEvent, DeviceRules
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
        devices: ``"job"`` (this job's GPUs, found from CUDA, ``CUDA_VISIBLE_DEVICES``,
            ``NVIDIA_VISIBLE_DEVICES`` and ``LOCAL_RANK`` as `gpuguard.health.devices` describes, and
            said once at start), ``"all"``, or NVML indices and UUIDs (``MIG-...`` UUIDs are watched
            through their parent GPU).
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
        self._threaded = False
        self._event_thread: threading.Thread | None = None
        self.polls = 0
        self.events = 0
        self.event_wait_failures = 0

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
        self._say_watching()
        self._rules = {d.key: self._new_rules(d) for d in devices}
        for note in self.source.skipped:
            self._errors.append(note)
        events_ok = False
        try:
            # Per device: a GPU whose registration fails is polled alone; the others keep their events.
            events_ok = self.source.open_events() > 0
        except HealthError as exc:
            self._record_error(exc, "creating the NVML event set (every GPU is polled alone)")
        self._events_registered(self.source.devices)
        self._threaded = threads
        self.poll()
        if threads:
            self._spawn("gpuguard-nvml-poll", self._poll_loop)
            if events_ok:
                self._start_event_thread()
        return self._snapshot

    def _new_rules(self, device: DeviceInfo) -> DeviceRules:
        rules = DeviceRules(self.config, self._xids, device.limits)
        rules.own_instances = frozenset(device.mig_instances)
        return rules

    def _say_watching(self) -> None:
        """Once, at start: which GPUs are watched and how they were chosen (never a silent whole node)."""
        source = self.source
        opened = ", ".join(
            f"GPU {d.index} ({d.uuid or d.pci_bus_id or d.target})"
            + (f" via MIG {', '.join(d.mig_devices)}" if d.mig_devices and self._selection != "all" else "")
            for d in source.devices
        )
        line = f"gpuguard health: watching {opened or 'no GPU'}: {source.watching}"
        level = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}[source.watching_level]
        log.log(level, "%s", line)

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
        """Read every watched GPU once and re-evaluate. The poll thread calls this every interval.

        What failed before is tried again first: a GPU that could not be opened (it may be back after a
        reset) and event registrations that failed; in the steady state that costs nothing.
        """
        for device in self.source.devices:
            if device.handle is None and self.source.reopen(device):
                with self._lock:
                    self._rules[device.key].limits = device.limits
                    self._rules[device.key].own_instances = frozenset(device.mig_instances)
        registered = self.source.retry_events(self.clock())
        if registered:
            self._events_registered(registered)
            if self._threaded:
                self._start_event_thread()
        samples = [(d, self.source.read(d, self.clock())) for d in self.source.devices]
        with self._lock:
            for device, sample in samples:
                self._rules[device.key].observe(sample)
            self.polls += 1
        return self._publish()

    def process_events(self, timeout_s: float = 0.0) -> int:
        """Wait up to ``timeout_s`` for NVML events and apply all that are ready; returns how many.

        Never raises for NVML's sake: GPU_IS_LOST marks the GPUs that are gone; any other wait error
        stays on the event path (XID events unreadable on every registered GPU, polling goes on).
        """
        applied = 0
        timeout = timeout_s
        changed = False
        while True:
            try:
                got = self.source.wait_event(timeout, self.clock)
            except NvmlError as exc:
                if exc.code == pynvml.NVML_ERROR_GPU_IS_LOST:
                    self._events_lost(exc)
                    applied += 1
                else:
                    self._event_wait_failed(exc)
                    changed = True
                break
            changed |= self._event_path_ok()
            if got is None:
                break
            device, event = got
            self._apply_event(device, event)
            applied += 1
            timeout = 0.0
        if applied or changed:
            self._publish()
        return applied

    def _events_registered(self, devices: list[DeviceInfo]) -> None:
        """A GPU whose events are registered can have its XIDs read (until a wait says otherwise)."""
        with self._lock:
            for device in devices:
                if device.events:
                    self._rules[device.key].reads.answered("events")

    def _event_path_ok(self) -> bool:
        """The wait answered (an event or a timeout): XID events are readable on every registered GPU."""
        changed = False
        with self._lock:
            for device in self.source.devices:
                if device.events:
                    rules = self._rules[device.key]
                    changed |= "events" in rules.reads.unreadable()
                    rules.event_path(None)
        return changed

    def _event_wait_failed(self, exc: NvmlError) -> None:
        """nvml.h, nvmlEventSetWait_v2: UNKNOWN "on any unexpected error" (and INVALID_ARGUMENT): not a GPU
        fault, but while it lasts XIDs go unseen. Each registered GPU's XID events are unreadable (UNKNOWN
        after `unresponsive_polls` failed waits); the poll thread goes on; the wait is tried again."""
        said = f"nvmlEventSetWait_v2: {error_name(exc.code)} ({exc.code})"
        self.event_wait_failures += 1
        with self._lock:
            for device in self.source.devices:
                if device.events:
                    self._rules[device.key].event_path(said)
        self._record_error(exc, "waiting for NVML events (XID events unseen meanwhile; polling continues)")

    def _events_lost(self, exc: NvmlError) -> None:
        """The event wait answered GPU_IS_LOST: mark the GPUs that are gone, keep events for the others."""
        now = self.clock()
        lost = self.source.find_lost_in_events(now)
        with self._lock:
            for device in lost:
                self._rules[device.key].lost_in_event_wait(now)
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

    def _resolve_selection(self) -> Selection:
        if self._selection == "all":
            return None
        if self._selection == "job":
            return JobScope.from_environment()
        return list(self._selection)

    def _publish(self) -> HealthSnapshot:
        now = self.clock()
        with self._lock:
            devices = tuple(self._device_health(d, now) for d in self.source.devices)
            previous = {(d.index, d.uuid): d for d in self._snapshot.devices}
            self._snapshot = HealthSnapshot(
                devices=devices,
                available=True,
                taken_at=now,
                skipped=tuple(self.source.skipped),
                watching=self.source.watching,
                notes=tuple(self.source.notes),
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
        if device.mig_devices:
            # Health is per GPU; the evidence names the MIG devices it concerns.
            reasons = tuple(
                replace(r, evidence={**r.evidence, "mig_devices": list(device.mig_devices)}) for r in reasons
            )
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
            signals_unreadable=rules.reads.unreadable(),
            mig_mode=device.mig_mode,
            mig_devices=tuple(device.mig_devices),
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

    def _spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

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

    def _start_event_thread(self) -> None:
        if self._event_thread is None or not self._event_thread.is_alive():
            self._event_thread = self._spawn("gpuguard-nvml-events", self._event_loop)

    def _event_loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            if not self.source.has_event_set:  # being retried by the poll thread
                self._stop.wait(self.config.event_wait_s)
                continue
            failures = self.event_wait_failures
            crashed = False
            try:
                if self.process_events(self.config.event_wait_s):
                    self._wake.set()  # re-read the fields now: an event often comes with new counter values
            except Exception as exc:  # a programming error: said with its traceback, the thread lives on
                self._record_error(exc, "waiting for NVML events")
                crashed = True
            if crashed or self.event_wait_failures > failures:  # the wait failed: back off, then try again
                backoff = min(30.0, max(self.config.event_wait_s, backoff * 2))
                self._stop.wait(backoff)
            else:
                backoff = 0.0

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
