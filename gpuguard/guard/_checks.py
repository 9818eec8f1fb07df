"""What the guard tells its user once: odd step numbers, an unwatched start, a preemption deadline
that sync_every and the step time, or the state's save time, cannot meet."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from gpuguard.errors import GpuGuardError
from gpuguard.guard.config import GuardConfig
from gpuguard.health.model import HealthSnapshot, HealthState

if TYPE_CHECKING:
    from gpuguard.checkpoint import CheckpointStore

log = logging.getLogger("gpuguard")


def odd_step(step: Any, last: int, resumed: int | None, report_once: Callable[[str, str], None]) -> int:
    """The step number to use for a ``guard.step(step)`` that is not an int above ``last``; reports why."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        report_once(
            "type",
            f"guard.step({step!r}): the step must be an int (a {type(step).__name__} was passed); "
            "counting steps from the previous one instead",
        )
        return last + 1
    number = int(step)  # numpy integers are fine
    if number > last:
        return number
    if number < 0:
        report_once("negative", f"guard.step({number}): step numbers start at 0")
    elif resumed is not None and number <= resumed:
        report_once(
            "resumed",
            f"guard.step({number}) lies at or below the resumed step {resumed} "
            f"(resume() returned {resumed + 1}): start the loop at resume()'s value",
        )
    else:
        report_once(
            "order",
            f"guard.step({number}) after guard.step({last}): steps must increase; a checkpoint is "
            "named by its step and resume() returns the one after it, so repeated or decreasing numbers "
            "(a per-epoch batch index, say) resume at the wrong place",
        )
    return number


def say_what_is_watched(snapshot: HealthSnapshot, fail_mode: str) -> None:
    """Loudly, at start: a job that trains unmonitored, or on a GPU already bad, must know it."""
    if not snapshot.available:
        if fail_mode == "closed":
            log.error("gpuguard: GPU health cannot be read (%s); fail_mode=closed: leaving", snapshot.error)
        else:
            log.error(
                "gpuguard: GPU health is NOT monitored (%s): training continues unwatched (fail_mode=open); "
                "periodic and preemption checkpoints still run. Set health.fail_mode=closed to refuse.",
                snapshot.error,
            )
        return
    for device in snapshot.devices:
        if device.state is HealthState.UNKNOWN and fail_mode != "closed":
            # A GPU the job asked for that NVML could not open or read (a mistyped UUID, a GPU lost before the
            # start): the job trains on without its health, and must be told as loudly as when NVML is missing.
            reason = device.reasons[0].message if device.reasons else "its health cannot be read"
            name = device.uuid or device.pci_bus_id or f"index {device.index}"
            log.error(
                "gpuguard: GPU %s is NOT monitored (%s): training continues with it unwatched (fail_mode=open); "
                "check the devices the job names. Set health.fail_mode=closed to refuse.",
                name,
                reason,
            )
        if device.state.severity >= HealthState.FAILING.severity:
            reason = device.reasons[0].message if device.reasons else ""
            log.error(
                "gpuguard: GPU %s is %s at start (%s): the job leaves at its first step",
                device.index,
                device.state.value,
                reason,
            )


def check_preemption_bound(config: GuardConfig, step_s: float) -> None:
    """After a SIGTERM every rank must reach the agreed step: up to ``sync_every`` steps. Warn when
    that alone takes half the preemption deadline, leaving too little for the save."""
    if not config.preemption_signals:
        return
    to_agree = config.sync_every * step_s
    if to_agree >= config.preemption_deadline_s / 2:
        log.warning(
            "gpuguard: after a SIGTERM the ranks may need up to sync_every x step time = %d x %.2fs = %.1fs "
            "to reach the agreed step, over half of preemption_deadline_s=%gs: lower sync_every, or raise "
            "the deadline and the pod's terminationGracePeriodSeconds",
            config.sync_every,
            step_s,
            to_agree,
            config.preemption_deadline_s,
        )


def check_save_fits_deadline(config: GuardConfig, durable_s: float, step: int) -> bool:
    """Warn when a measured save took longer than ``preemption_deadline_s``: an emergency checkpoint
    of this state would then miss the deadline, and the next run would resume from an older one.
    Returns whether it warned. The deadline is never raised to fit: the pod's grace period is what it is."""
    if not config.preemption_signals or durable_s <= config.preemption_deadline_s:
        return False
    log.warning(
        "gpuguard: the checkpoint at step %d took %.2fs to commit, over preemption_deadline_s=%gs: after a "
        "SIGTERM the emergency checkpoint of this state would be abandoned at the deadline and the next run "
        "would resume from an older checkpoint; raise preemption_deadline_s (and the pod's "
        "terminationGracePeriodSeconds) above the measured save time, or make the state smaller or the storage faster",
        step,
        durable_s,
        config.preemption_deadline_s,
    )
    return True


# The probe that estimates a save's time at start: large enough that a disk's or an object store's
# throughput, not its latency, sets the rate; small enough to cost well under a second on either.
PROBE_BYTES: Final = 32 * 2**20


def estimate_save_against_deadline(config: GuardConfig, store: CheckpointStore) -> bool:
    """At the first step (the state's size known, its staging buffer prepared): estimate how long an
    emergency checkpoint of it takes here, from its size and the write rate measured by a probe
    written to the store, and warn when that is over ``preemption_deadline_s``. Returns whether it
    warned. (Each rank writes its shard at once in an emergency: the probe measures one writer.)"""
    if not config.preemption_signals or store.prepared_bytes <= 0:
        return False
    nbytes = store.prepared_bytes
    probe = min(nbytes, PROBE_BYTES)
    try:
        rate = store.measure_write_rate(probe)
    except GpuGuardError as exc:
        log.warning("gpuguard: could not measure the storage's write rate to check preemption_deadline_s: %s", exc)
        return False
    estimate_s = nbytes / rate
    log.info(
        "gpuguard: a checkpoint of %.1f MiB takes about %.2fs to write here (%.0f MB/s)",
        nbytes / 2**20,
        estimate_s,
        rate / 1e6,
    )
    if estimate_s <= config.preemption_deadline_s:
        return False
    log.warning(
        "gpuguard: an emergency checkpoint of this state (%.1f MiB) takes about %.2fs to write here (%.0f MB/s, "
        "measured writing %.0f MiB to %s), over preemption_deadline_s=%gs: after a SIGTERM it would be abandoned "
        "at the deadline and the next run would resume from an older checkpoint; raise preemption_deadline_s (and "
        "the pod's terminationGracePeriodSeconds) above it, or make the state smaller or the storage faster",
        nbytes / 2**20,
        estimate_s,
        rate / 1e6,
        probe / 2**20,
        store.url,
        config.preemption_deadline_s,
    )
    return True
