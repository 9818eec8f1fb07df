"""Leaving: the emergency checkpoint at the agreed step, then `Evacuation` — even when the
checkpoint fails, for the GPU is bad or the pod is going away; then the log, the evidence and the
Kubernetes Event say which checkpoint the next pod resumes from."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from gpuguard.checkpoint.store import CheckpointInfo, PendingSave, SaveTimings
from gpuguard.errors import GpuGuardError
from gpuguard.guard._exit import skip_final_collection
from gpuguard.guard._signals import signal_name
from gpuguard.guard._state import checkpointable
from gpuguard.guard.agreement import Agreed
from gpuguard.guard.policy import Action, Decision

if TYPE_CHECKING:
    from gpuguard.guard.guard import Guard

log = logging.getLogger("gpuguard")


class Evacuation(SystemExit):
    """Raised from `Guard.step` once the emergency checkpoint is durable: the job must leave.

    A ``SystemExit``, so ``finally`` blocks run and, uncaught, it ends the process with ``code``:
    75 (reschedule elsewhere) or 76 (restart in place) by default.

    Attributes:
        code: the exit code.
        decision: why.
        step: the step every rank checkpointed.
        checkpoint: the committed checkpoint (on every rank: `wait()` means committed), or None when it failed.
    """

    def __init__(self, code: int, decision: Decision, step: int, checkpoint: CheckpointInfo | None) -> None:
        super().__init__(code)
        self.decision = decision
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class EvacuationReport:
    """Timings of an evacuation, for logs, demos and benchmarks (seconds)."""

    step: int
    action: str
    decided_at: float | None = None
    stall_s: float = 0.0
    durable_s: float = 0.0
    checkpoint_id: str | None = None
    error: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    signal: str | None = None
    signal_to_durable_s: float | None = None
    resume_from: dict[str, Any] | None = None


def evacuate(guard: Guard, step: int, agreed: Agreed) -> NoReturn:
    """Checkpoint ``step`` (every rank calls this at the same step) and raise `Evacuation`."""
    c = guard.config
    guard._evacuating = True
    action = Action(agreed.action)
    forced = guard._forced
    if forced is not None and forced.action == action:
        decision = forced
    elif guard.decision.action == action:
        decision = guard.decision
    else:
        decision = Decision(
            action,
            action.name.lower(),
            f"rank {agreed.decided_by} decided to {action.name.lower()}",
            evidence={"decided_by_rank": agreed.decided_by},
        )
    code = c.reschedule_exit_code if action is Action.RESCHEDULE else c.restart_exit_code
    evidence = {**decision.to_dict(), "rank": guard.rank, "decided_by_rank": agreed.decided_by}
    if guard.slowest is not None:  # across ranks, who was slowest at the last agreement
        evidence["slowest_rank"], evidence["slowest_step_ms"] = guard.slowest[0], round(guard.slowest[1] * 1000, 3)
    report = EvacuationReport(step, action.name, guard.decided_at, evidence=evidence)
    # A preemption has a deadline (the pod's grace period): the save gets what is left of it, and not
    # a second more. At the deadline an uncommitted save is abandoned (it can no longer commit, so the
    # resume point reported below is the one a rerun finds); one whose commit had begun is waited for
    # (a single small write) and reported as committed.
    budget = c.commit_timeout_s
    if guard._preempted is not None:
        signum, since = guard._preempted
        report.signal = signal_name(signum)
        evidence["signal"] = report.signal
        evidence["signal_to_step_s"] = round(time.monotonic() - since, 4)
        budget = min(budget, c.preemption_deadline_s - (time.monotonic() - since))
    log.warning("evacuating at step %d (%s, exit %d): %s", step, action.name, code, decision.message)
    guard.plugins.hook.gpuguard_before_checkpoint(step=step, reason="emergency", evidence=evidence)
    info: CheckpointInfo | None = None
    try:
        assert guard.store is not None
        if budget <= 0:
            raise GpuGuardError(
                f"the preemption deadline of {c.preemption_deadline_s:g}s had passed when every rank reached step "
                f"{step}: no emergency checkpoint taken"
            )
        if guard._preempted is not None:
            # Under the deadline the newest state gets the staging buffers and the storage's bandwidth:
            # older periodic saves still writing are abandoned (one already committing is waited for).
            _settle_periodic(guard.periodic)
        started = time.perf_counter()
        pending = guard.store.save(
            checkpointable(guard.state),
            step,
            reason="emergency",
            evidence=evidence,
            rank=guard.rank,
            world_size=guard.world_size,
            checkpoint_id=guard._checkpoint_id(step, "emergency"),
            replicated=guard.config.replicated,
            commit_timeout_s=budget,
            extra=guard._loss_extra(),  # the loss window (rank 0's): its resume is checked against it
        )
        report.stall_s = pending.timings.stall_s
        report.checkpoint_id = pending.id
        if guard._preempted is not None:  # what is left of the deadline after the snapshot
            budget = c.preemption_deadline_s - (time.monotonic() - guard._preempted[1])
        else:
            budget += 5.0
        info = _wait(pending, budget, c.preemption_deadline_s)
        report.durable_s = time.perf_counter() - started
        if guard._preempted is not None:
            report.signal_to_durable_s = time.monotonic() - guard._preempted[1]
            log.warning(
                "gpuguard: %s -> checkpoint at step %d committed in %.2fs",
                report.signal,
                step,
                report.signal_to_durable_s,
            )
        if info is not None:
            report.resume_from = {"id": info.id, "step": info.step, "reason": info.reason}
            log.warning("gpuguard: %s", describe(report.resume_from))
    except Exception as exc:  # the job must leave the bad GPU all the same; resume uses the last good one
        # A GpuGuardError (storage, a commit that timed out) is expected and says what failed; anything else
        # is a bug: named by its type, and logged with its traceback below.
        expected = isinstance(exc, GpuGuardError)
        report.error = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        # So that the resume point named now is the one a rerun finds. Without a deadline (a GPU fault,
        # not a preemption) a periodic save still in flight is waited for first: one that can still commit
        # is a newer resume point than the last committed one, and abandoning it would lose its steps.
        _settle_periodic(guard.periodic, wait_s=c.commit_timeout_s if guard._preempted is None else 0.0)
        report.resume_from = guard._resume_point()
        evidence["emergency_checkpoint_error"] = report.error
        evidence["resume_from"] = report.resume_from
        where = describe(report.resume_from)
        decision = dataclasses.replace(
            decision,
            message=f"{decision.message}; emergency checkpoint failed ({report.error}); {where}",
            evidence={
                **decision.evidence,
                "resume_from": report.resume_from,
                "emergency_checkpoint_error": report.error,
            },
        )
        log.error(
            "emergency checkpoint at step %d failed: %s; leaving anyway; %s",
            step,
            report.error,
            describe(report.resume_from),
            exc_info=None if expected else exc,
        )
    guard.plugins.hook.gpuguard_after_checkpoint(step=step, reason="emergency", info=info)
    guard.plugins.hook.gpuguard_checkpoint_finished(
        step=step,
        reason="emergency",
        info=info,
        timings=SaveTimings(report.stall_s, report.durable_s),
        error=GpuGuardError(report.error) if report.error else None,
        tier="object storage",
    )
    guard.last_evacuation = report
    guard.plugins.hook.gpuguard_on_evacuation(decision=decision, exit_code=code, checkpoint=info)
    skip_final_collection()
    raise Evacuation(code, decision, step, info)


# After the deadline, how long a save whose manifest write had begun may take to finish it: one
# small file (a local disk: milliseconds; S3: one PUT). The process leaves within the deadline plus
# this, plus its teardown.
COMMIT_IN_FLIGHT_S = 5.0


def _wait(pending: PendingSave, timeout_s: float, deadline_s: float) -> CheckpointInfo | None:
    """The save's outcome within ``timeout_s``; past it the save is abandoned unless its commit began."""
    try:
        return pending.wait(timeout=max(0.0, timeout_s))
    except TimeoutError:
        if pending.abandon():
            raise GpuGuardError(
                f"emergency checkpoint {pending.id} not committed within {max(0.0, timeout_s):.2f}s "
                f"(preemption_deadline_s={deadline_s:g}): abandoned, it will not commit"
            ) from None
    # Its manifest write had begun at the deadline: it lands (or fails) within one small write.
    log.warning(
        "gpuguard: emergency checkpoint %s was committing at the deadline: waiting up to %gs for its manifest",
        pending.id,
        COMMIT_IN_FLIGHT_S,
    )
    try:
        info = pending.wait(timeout=COMMIT_IN_FLIGHT_S)
    except TimeoutError:
        # A write in flight cannot be called back: say so, rather than name a resume point that a
        # manifest landing later would make wrong (the next run would then resume from it, newer).
        raise GpuGuardError(
            f"emergency checkpoint {pending.id} was committing at the deadline and its manifest write had not "
            f"finished {COMMIT_IN_FLIGHT_S:g}s later: if it lands, the next run resumes from it"
        ) from None
    log.warning("gpuguard: emergency checkpoint %s committed just after the deadline", pending.id)
    return info


def _settle_periodic(saves: list[PendingSave], wait_s: float = 0.0) -> None:
    """Periodic saves still in flight: given ``wait_s`` to end on their own, then abandoned, or (when
    their commit has begun) waited for, so none commits after the resume point is reported."""
    deadline = time.monotonic() + wait_s
    for pending in saves:
        if not pending.done() and wait_s > 0:
            with contextlib.suppress(Exception):  # its outcome is read from the storage next
                pending.wait(timeout=max(0.0, deadline - time.monotonic()))
        if not pending.done() and not pending.abandon():
            with contextlib.suppress(Exception):  # its outcome is read from the storage next
                pending.wait(timeout=COMMIT_IN_FLIGHT_S)


def describe(point: dict[str, Any] | None) -> str:
    """The checkpoint a resume would use, in words: for logs and Events."""
    if point is None:
        return "no committed checkpoint: the next run starts from step 0"
    if "error" in point:
        return str(point["error"])
    return f"the next run resumes from {point['id']} (step {point['step']}, {point['reason']})"
