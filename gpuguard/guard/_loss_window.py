"""The loss check after a restore: a checkpoint whose restored model trains at a loss far outside the
window it recorded is demoted for good, and the job restarts from the next older verified one.

A checksum proves the bytes are the ones written; the NaN check (`_sanity`) catches a state gone
non-finite. Neither catches finite garbage: an exponent bit flipped in a weight by a failing GPU, a state
saved mid-divergence, optimizer moments out of step with the parameters. The loss does. Each checkpoint
records the loss window before it (median, a robust spread, how many), from the losses the training loop
hands to ``Guard.step(step, loss)``; after a resume from it, at step ``resumed + loss_check_steps`` (one
point every rank reaches), each rank compares the median of its losses since the restore with that
window, the ranks agree (one small gather), and a checkpoint that fails on any rank is demoted with a
marker in storage (`CheckpointStore.demote`) that every later process honours: the job leaves with the
restart exit and resumes from the next older verified checkpoint, never this one again. When every
checkpoint is demoted, `Guard.resume` raises: never a silent start from step 0.

The window is rank 0's: the committing rank writes the manifest, and under data parallelism every rank's
losses come from the same distribution. A rank that passes no losses has no opinion at the check (a pipeline
stage without a loss); when rank 0 passes none, no window is recorded and no check follows.

The training thread stays free of device syncs and I/O: ``step`` keeps a detached reference to each loss
in a ring of the last `WINDOW` (a deque append). Losses become floats only where the training thread
waits for the device anyway: on rank 0 at a checkpoint's save (whose snapshot waits for the same stream
right after: one conversion of `WINDOW` values per checkpoint), and once at the check after a resume
(which is a collective).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import torch

from gpuguard.errors import CheckpointError
from gpuguard.guard._evacuation import Evacuation
from gpuguard.guard.policy import Action, Decision

if TYPE_CHECKING:
    from gpuguard.checkpoint._collective import RankGroup
    from gpuguard.guard.config import GuardConfig

log = logging.getLogger("gpuguard")

WINDOW: Final = 64  # losses a checkpoint's window summarises: the last steps before it
MIN_WINDOW: Final = 8  # fewer finite losses before a save: no window recorded, so no check after its resume
MIN_AFTER: Final = 3  # fewer losses since the restore on a rank: that rank has no opinion
# The spread is never taken below this fraction of the window median's magnitude: a window of nearly
# equal losses (a converged model) must not make an ordinary wobble "far outside".
FLOOR: Final = 0.1
EXTRA_KEY: Final = "loss_window"  # in the checkpoint's manifest, under "extra"
# The median of a normal distribution's absolute deviations is 0.6745 sigma: this makes the MAD a sigma.
MAD_TO_SIGMA: Final = 1.4826


class LossRing:
    """The last `WINDOW` losses, as the training loop handed them: floats or detached 0-dim tensors."""

    def __init__(self, size: int = WINDOW) -> None:
        self._kept: deque[tuple[int, float | torch.Tensor]] = deque(maxlen=size)

    def record(self, step: int, loss: Any) -> bool:
        """Keep ``loss`` (no sync: a tensor is kept by reference); False when it is not one number.

        On the training thread at every step: about a microsecond and a half (a deque append).
        """
        if loss.__class__ is float:
            self._kept.append((step, loss))
            return True
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:  # metadata: no sync
                return False
            # detach() only when needed (a microsecond): a tensor with a graph would keep it alive
            self._kept.append((step, loss.detach() if loss.requires_grad else loss))
            return True
        if isinstance(loss, bool):
            return False
        try:
            self._kept.append((step, float(loss)))  # an int, a numpy scalar
        except (TypeError, ValueError):
            return False
        return True

    def clear(self) -> None:
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)

    def floats(self, after: int | None = None) -> tuple[list[int], list[float]]:
        """The steps and losses (those of steps above ``after``), as floats: ONE device sync when any is a
        tensor on a device. Call it only where the training thread waits for the device anyway."""
        pairs = [(s, v) for s, v in self._kept if after is None or s > after]
        tensors = [v for _, v in pairs if isinstance(v, torch.Tensor)]
        converted: list[float] = []
        if tensors:
            try:
                converted = [float(x) for x in torch.stack([t.reshape(()) for t in tensors]).double().cpu().tolist()]
            except (RuntimeError, TypeError):  # mixed devices or dtypes: one at a time
                converted = [float(t) for t in tensors]
        it = iter(converted)
        return [s for s, _ in pairs], [next(it) if isinstance(v, torch.Tensor) else float(v) for _, v in pairs]


def summarize(steps: list[int], losses: list[float]) -> dict[str, Any] | None:
    """The window a checkpoint records: median, robust spread (MAD as a sigma), counts; None if too few."""
    finite = [v for v in losses if math.isfinite(v)]
    if len(finite) < MIN_WINDOW:
        return None
    median = statistics.median(finite)
    spread = MAD_TO_SIGMA * statistics.median(abs(v - median) for v in finite)
    return {
        "median": median,
        "spread": spread,
        "count": len(finite),
        "non_finite": len(losses) - len(finite),
        "first_step": steps[0],
        "last_step": steps[-1],
    }


def limit(window: dict[str, Any], threshold: float) -> tuple[float, float]:
    """(the highest median allowed after a restore, the scale the threshold multiplies)."""
    median = float(window["median"])
    scale = max(float(window["spread"]), FLOOR * abs(median))
    if scale <= 0.0:  # a window of identical zeros
        scale = FLOOR
    return median + threshold * scale, scale


@dataclass(frozen=True)
class Verdict:
    """One rank's judgement: ``failing`` None when it has too few losses since the restore to judge."""

    failing: bool | None
    median: float | None  # of the losses since the restore, non-finite ones counted as +inf; None: inf
    count: int
    non_finite: int

    def to_json(self) -> dict[str, Any]:
        return {"failing": self.failing, "median": self.median, "count": self.count, "non_finite": self.non_finite}


def judge(window: dict[str, Any], losses: list[float], threshold: float) -> Verdict:
    """Is the median of ``losses`` (non-finite ones as +inf: a few NaN do not trip it, a majority does)
    above the window's median by more than ``threshold`` times its spread (at least `FLOOR` × |median|)?

    One-sided: a loss far below the window is never taken for a bad checkpoint.
    """
    non_finite = sum(1 for v in losses if not math.isfinite(v))
    if len(losses) < MIN_AFTER:
        return Verdict(None, None, len(losses), non_finite)
    median = statistics.median(v if math.isfinite(v) else math.inf for v in losses)
    highest, _ = limit(window, threshold)
    return Verdict(not median <= highest, median if math.isfinite(median) else None, len(losses), non_finite)


@dataclass(frozen=True)
class PendingCheck:
    """A resume from a checkpoint with a window: judged at step ``check_at``."""

    checkpoint_id: str
    step: int  # the checkpoint's
    window: dict[str, Any]
    check_at: int


def window_of(extra: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The loss window a checkpoint's ``extra`` holds, or None (none recorded, or not a valid one)."""
    window = (extra or {}).get(EXTRA_KEY)
    return window if _valid(window) else None


def arm(
    config: GuardConfig, checkpoint_id: str, step: int, windows: Sequence[dict[str, Any] | None], rank: int
) -> PendingCheck | None:
    """The check after a resume from ``checkpoint_id`` at ``step``, or None when off or no window was recorded.

    ``windows`` are every rank's (gathered, the same list on every rank: ranks may have restored the same
    id from different tiers, and only rank 0's copies hold a window): a rank judges against its own, else
    the first rank's that has one, and every rank arms alike, for the check is a collective.
    """
    if not config.loss_gate:
        return None
    mine = windows[rank] if rank < len(windows) else None
    window = mine or next((w for w in windows if w), None)
    if window is None:
        return None
    return PendingCheck(checkpoint_id, step, window, step + config.loss_check_steps)


def _valid(window: Any) -> bool:
    if not isinstance(window, dict):
        return False
    numbers = [window.get("median"), window.get("spread")]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)


def window_extra(ring: LossRing, pending: PendingCheck | None) -> dict[str, Any]:
    """What a checkpoint's ``extra`` holds of the loss: the window before it.

    While a resume's check is pending, the state is not vouched for yet: a checkpoint taken then (an
    emergency one) carries the window it is to be judged against, so that its own resume is checked the
    same way, and says where that window came from.
    """
    if pending is not None:
        return {EXTRA_KEY: pending.window, "loss_window_inherited_from": pending.checkpoint_id}
    steps, losses = ring.floats()
    window = summarize(steps, losses)
    return {} if window is None else {EXTRA_KEY: window}


def gather_verdicts(group: RankGroup, verdict: Verdict) -> list[dict[str, Any]]:
    """Every rank's verdict, on every rank (one small gather of JSON)."""
    return list(group.all_gather(verdict.to_json()))


def describe_failure(
    pending: PendingCheck, step: int, verdicts: list[dict[str, Any]], threshold: float
) -> tuple[list[int], str]:
    """The failing ranks, and the numbers in words for the ERROR line."""
    failing = [rank for rank, v in enumerate(verdicts) if v.get("failing")]
    highest, scale = limit(pending.window, threshold)
    w = pending.window
    parts = []
    for rank in failing:
        v = verdicts[rank]
        median = "non-finite" if v.get("median") is None else f"{v['median']:.6g}"
        parts.append(f"rank {rank}: median {median} of {v['count']} losses ({v['non_finite']} non-finite)")
    words = (
        f"{'; '.join(parts)} over steps {pending.step + 1}..{step}, against the window it recorded (median "
        f"{w['median']:.6g}, spread {w['spread']:.6g}, {w.get('count', '?')} losses): the limit is {highest:.6g} "
        f"(median + loss_threshold {threshold:g} x {scale:.6g})"
    )
    return failing, words


def check(
    pending: PendingCheck,
    step: int,
    ring: LossRing,
    group: RankGroup,
    config: GuardConfig,
    *,
    unchecked: Sequence[str] = (),
    demote: Callable[..., str | None],
    resume_point: Callable[[], str],
) -> None:
    """Judge the losses since the restore on every rank, agree, and on a failure anywhere: demote the
    checkpoint for good (rank 0 calls ``demote``, which returns why it failed or None; every rank waits for
    it) and raise `Evacuation` with the restart exit code on every rank, so the job resumes from the next
    older verified checkpoint (``resume_point`` says which, in words). The ``unchecked`` checkpoints, taken
    since the restore from the state it gave, are demoted with it.

    Raises:
        Evacuation: the check failed on some rank; the marker is written.
        CheckpointError: the check failed but the marker could not be written: a restart would load the
            same checkpoint again, so the job leaves with an error instead.
    """
    _, losses = ring.floats(after=pending.step)  # the one sync: at a collective anyway
    verdicts = gather_verdicts(group, judge(pending.window, losses, config.loss_threshold))
    if not any(v.get("failing") for v in verdicts):
        judged = [v for v in verdicts if v.get("failing") is not None]
        if not judged:
            log.info(
                "gpuguard: loss check after the resume from %s skipped: no rank passed enough losses to step() "
                "(at least %d since the restore)",
                pending.checkpoint_id,
                MIN_AFTER,
            )
        elif group.rank == 0:
            medians = ", ".join("non-finite" if v["median"] is None else f"{v['median']:.6g}" for v in judged)
            log.info(
                "gpuguard: loss check after the resume from %s passed at step %d: median(s) %s, limit %.6g",
                pending.checkpoint_id,
                step,
                medians,
                limit(pending.window, config.loss_threshold)[0],
            )
        return
    failing, words = describe_failure(pending, step, verdicts, config.loss_threshold)
    error = None
    if group.rank == 0:
        details = {
            "checked_at_step": step,
            "ranks": failing,
            "window": pending.window,
            "threshold": config.loss_threshold,
            "verdicts": verdicts,
        }
        error = demote(pending.checkpoint_id, "loss", step=pending.step, **details)
        for later in unchecked:  # descendants first written, then never resumed from either
            error = error or demote(later, "loss", descends_from=pending.checkpoint_id, **details)
    # Rank 0's marker is durable before any rank leaves: a launcher restarts the job once they are gone.
    written = group.all_gather_ints([0 if error else 1])[0][0]
    if not written:
        raise CheckpointError(
            f"checkpoint {pending.checkpoint_id} (step {pending.step}) failed the loss check after restore ({words}), "
            f"and its demotion could not be recorded in storage (rank 0: {error or 'see its log'}): leaving with an "
            "error, not a restart, which would resume from it again"
        )
    try:
        after = resume_point()
    except Exception as exc:  # on the way out: said, never raised over the exit
        after = f"the next resume point could not be listed ({exc})"
    also = f", with the checkpoint(s) taken since from its state: {', '.join(unchecked)}" if unchecked else ""
    message = (
        f"checkpoint {pending.checkpoint_id} (step {pending.step}) failed the loss check after restore: {words}; "
        f"demoted for good (demoted/{pending.checkpoint_id}.json){also}; leaving with exit "
        f"{config.restart_exit_code} (restart in place): {after}"
    )
    log.error("gpuguard: %s", message)
    evidence = {"loss_check": {"checkpoint": pending.checkpoint_id, "ranks": failing, "verdicts": verdicts}}
    decision = Decision(Action.RESTART, "restart", message, evidence=evidence)
    raise Evacuation(config.restart_exit_code, decision, step, None)
