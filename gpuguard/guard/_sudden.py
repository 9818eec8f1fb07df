"""The guard's side of a sudden loss: start the part, and leave after the survivors' save.

`gpuguard.peers.SuddenLoss` does the work; this module turns its outcome into what every evacuation
produces — the log line, the plugins' hooks (and so the Kubernetes Event), the launcher's record and
`Evacuation` with the reschedule code — from what it is handed, not from the guard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from gpuguard.checkpoint.store import SaveTimings
from gpuguard.errors import GpuGuardError
from gpuguard.guard._evacuation import Evacuation, EvacuationReport
from gpuguard.guard.config import GuardConfig
from gpuguard.guard.policy import Action, Decision
from gpuguard.peers.sudden import SuddenLoss, SurvivorOutcome, reason_of

log = logging.getLogger("gpuguard")


def start_sudden_loss(
    config: GuardConfig,
    view: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    token: str,
    checkpoint_id: Callable[[int], str],
    health: Callable[[], str],
) -> SuddenLoss | None:
    if not config.sudden_loss or world_size < 2:
        return None
    return SuddenLoss.start(
        view,
        rank=rank,
        world_size=world_size,
        prefix=token,
        replicated=config.replicated,
        heartbeat_s=config.peer_heartbeat_s,
        timeout_s=config.peer_timeout_s,
        checkpoint_id=checkpoint_id,
        health=health,
    )


def peer_lost_behind(exc: BaseException, sudden: SuddenLoss, config: GuardConfig) -> bool:
    """Whether ``exc`` (leaving the guard's ``with`` block) came with a peer's loss.

    A collective's error (RuntimeError, torch's DistError) may come before the watch has told: wait for its
    verdict, at most one detection bound. Any other error is only checked against an alarm already up.
    """
    wait = config.peer_timeout_s + 2 * config.peer_heartbeat_s if isinstance(exc, RuntimeError) else 0.0
    if wait:
        log.warning(
            "gpuguard: %s raised; waiting up to %.1fs to learn whether a peer was lost", type(exc).__name__, wait
        )
    return sudden.lost_a_peer(wait)


def health_words(monitor: Any) -> str:
    """This rank's GPUs in a few words, for its heartbeat (the monitor's memory: no NVML call)."""
    if monitor is None:
        return ""
    from gpuguard.health.model import HealthState

    snapshot = monitor.snapshot()
    bad = [f"{d.uuid} {d.state.value}" for d in snapshot.devices if d.state is not HealthState.HEALTHY]
    return "; ".join(bad) if bad else f"{len(snapshot.devices)} GPU(s) healthy"


def _resume_point(store: Any) -> str:
    """Where the next run resumes when the survivors saved nothing: how much work the loss cost, said."""
    try:
        newest = store.latest()
    except Exception as exc:  # the storage may be what failed the save
        return f"the newest committed checkpoint could not be read ({reason_of(exc).splitlines()[0]})"
    if newest is None:
        return "no committed checkpoint: the next run starts from step 0"
    return f"the next run resumes from the newest committed checkpoint, step {newest.step} ({newest.id})"


def survive(
    sudden: SuddenLoss,
    store: Any,
    view: Mapping[str, Any],
    *,
    config: GuardConfig,
    plugins: Any,
    step: int,
    preempted_at: float | None,
) -> tuple[EvacuationReport, Evacuation]:
    """Run the survivors' save and build the evacuation to raise (the caller records the report and raises).

    Args:
        step: this rank's last completed step.
        preempted_at: ``time.monotonic()`` of a SIGTERM (the launcher stops the survivors too): the save
            then has what is left of ``preemption_deadline_s``.
    """
    budget = config.commit_timeout_s
    if preempted_at is not None:
        budget = min(budget, max(1.0, config.preemption_deadline_s - (time.monotonic() - preempted_at)))
    started = time.perf_counter()
    outcome = sudden.survive(store, view, budget_s=budget)
    if outcome.result != "saved":
        outcome.message += f"; {_resume_point(store)}"
    code = config.reschedule_exit_code
    level = logging.WARNING if outcome.result == "saved" else logging.ERROR
    log.log(level, "gpuguard: %s -> exit %d", outcome.message, code)
    evidence = {"sudden_loss": outcome.to_dict(), "report": _reports(sudden, outcome)}
    lost_health = {r: sudden.watch.last_heard.get(r, {}).get("health", "") for r in outcome.lost}
    evidence["lost_ranks_health"] = {str(r): h for r, h in lost_health.items() if h}
    decision = Decision(Action.RESCHEDULE, "reschedule", outcome.message, evidence=evidence)
    saved = outcome.result == "saved"
    report = EvacuationReport(
        outcome.step if saved and outcome.step is not None else step,
        Action.RESCHEDULE.name,
        evidence=evidence,
        durable_s=time.perf_counter() - started if saved else 0.0,
        checkpoint_id=outcome.checkpoint_id,
        error=None if saved else outcome.message,
    )
    plugins.hook.gpuguard_checkpoint_finished(
        step=report.step,
        reason="emergency",
        info=outcome.checkpoint,
        timings=SaveTimings(0.0, report.durable_s),
        error=None if saved else GpuGuardError(outcome.message),
        tier="object storage",
    )
    plugins.hook.gpuguard_on_evacuation(decision=decision, exit_code=code, checkpoint=outcome.checkpoint)
    from gpuguard.integrations.exits import record_exit

    record_exit(sudden.rank, code, outcome.message, sudden_loss=outcome.to_dict())
    return report, Evacuation(code, decision, report.step, outcome.checkpoint)


def _reports(sudden: SuddenLoss, outcome: SurvivorOutcome) -> bool:
    """One Event per pod: the lowest surviving rank on this host reports (the others' pods report theirs)."""
    mine = sudden.watch.registration(sudden.rank)
    host = mine.host if mine is not None else None
    local = []
    for member in outcome.members or (sudden.rank,):
        try:
            found = sudden.watch.registration(member)
        except GpuGuardError:
            found = None
        if found is not None and found.host == host:
            local.append(member)
    return not local or min(local) == sudden.rank
