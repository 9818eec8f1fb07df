"""The goodput model for one policy: the closed form (renewal-reward), the best interval, and a Monte Carlo
walk of the same process that checks it. `gpuguard.goodput` builds the policies from a job's inputs."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Final

DAY_S: Final = 86_400.0
_MIN_INTERVAL_S: Final = 1.0  # checkpointing more often than once a second is not a setting anyone uses


@dataclass(frozen=True)
class Policy:
    """One checkpointing policy in the model (see the module docstring for what each field means).

    ``downtime_s`` is what a failure the policy does not save costs; ``detected_downtime_s`` and
    ``jit_downtime_s`` (default: the same) are those of the detectable and the just-in-time-saved kinds.
    """

    name: str
    failures_per_s: float
    interval_s: float
    stall_s: float
    durable_lag_s: float
    downtime_s: float
    detectable_share: float = 0.0
    emergency_s: float = 0.0
    jit_share: float = 0.0
    jit_s: float = 0.0
    jit_replay_s: float = 0.0
    detected_downtime_s: float | None = None
    jit_downtime_s: float | None = None
    write_s: float = 0.0  # the storage's time to write one checkpoint of the whole job
    max_storage_share: float = 1.0  # of the storage's time, the most checkpoints may take

    @property
    def min_interval_s(self) -> float:
        """No shorter interval: checkpoints would queue (durable lag), or take more of the storage than allowed."""
        return max(self.durable_lag_s, self.write_s / self.max_storage_share - self.stall_s, _MIN_INTERVAL_S)

    @property
    def rolled_back_share(self) -> float:
        return 1.0 - self.detectable_share - self.jit_share

    def downtimes(self) -> tuple[float, float, float]:
        """(detectable, just-in-time saved, rolled back)."""
        detected = self.downtime_s if self.detected_downtime_s is None else self.detected_downtime_s
        jit = self.downtime_s if self.jit_downtime_s is None else self.jit_downtime_s
        return detected, jit, self.downtime_s


@dataclass(frozen=True)
class Outcome:
    """What a policy yields, per the closed form."""

    name: str
    goodput: float  # kept training time / wall time
    training_h_per_day: float
    checkpoint_overhead: float  # share of running time spent stalled in periodic saves
    work_lost_per_failure_s: float  # training redone, averaged over every failure (whatever its kind)
    wall_lost_per_failure_s: float  # training redone + saves after the failure + downtime
    best_interval_s: float  # the interval that maximises goodput under the same costs
    best_goodput: float
    storage_busy: float = 0.0  # share of the storage's time spent writing checkpoints, at this interval
    best_storage_busy: float = 0.0  # the same at the best interval

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """A Monte Carlo estimate of a policy's goodput beside the closed form."""

    name: str
    closed_form: float
    estimate: float
    stderr: float
    failures: int

    @property
    def agrees(self) -> bool:
        """Within four standard errors (and a hair for rounding) of the closed form."""
        return abs(self.estimate - self.closed_form) <= 4 * self.stderr + 1e-9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agrees": self.agrees}


def expected_cycle(policy: Policy) -> tuple[float, float, float]:
    """Per failure cycle (resume to resume): expected kept training, training lost, and wall time.

    With X ~ Exp(λ) the running time to the next failure, P = interval + stall, q = e^(-λP):
    checkpoint j is durable by X when jP + lag <= X, so E[#durable] = e^(-λ·lag)·q/(1-q); the
    stalled time before X is sum_j ∫ over each stall of P(X > t) dt.
    """
    lam, t, c = policy.failures_per_s, policy.interval_s, policy.stall_s
    period = t + c
    q = math.exp(-lam * period)
    stalled = math.exp(-lam * t) * -math.expm1(-lam * c) / (lam * -math.expm1(-lam * period))
    trained = 1 / lam - stalled  # all the training done before the failure
    kept_if_missed = t * math.exp(-lam * policy.durable_lag_s) * q / -math.expm1(-lam * period)
    p_d, p_j, p_u = policy.detectable_share, policy.jit_share, policy.rolled_back_share
    kept = p_d * trained + p_j * (trained - policy.jit_replay_s) + p_u * kept_if_missed
    detected, jit, rolled = policy.downtimes()
    wall = 1 / lam + p_d * (detected + policy.emergency_s) + p_j * (jit + policy.jit_s) + p_u * rolled
    return kept, trained - kept, wall


def goodput(policy: Policy) -> float:
    kept, _, wall = expected_cycle(policy)
    return kept / wall


def best_interval(policy: Policy) -> tuple[float, float]:
    """The checkpoint interval with the highest goodput (golden-section search on its logarithm); never
    shorter than `Policy.min_interval_s` (the storage bounds it)."""
    lo = math.log(policy.min_interval_s)
    hi = math.log(30 * DAY_S)

    def value(log_t: float) -> float:
        return goodput(_with_interval(policy, math.exp(log_t)))

    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(200):
        x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
        if value(x1) >= value(x2):
            b = x2
        else:
            a = x1
        if b - a < 1e-9:
            break
    best = math.exp((a + b) / 2)
    return best, goodput(_with_interval(policy, best))


def _with_interval(policy: Policy, interval_s: float) -> Policy:
    return Policy(**{**asdict(policy), "interval_s": interval_s})


def outcome(policy: Policy) -> Outcome:
    kept, lost, wall = expected_cycle(policy)
    best_t, best_g = best_interval(policy)
    return Outcome(
        name=policy.name,
        goodput=kept / wall,
        training_h_per_day=24 * kept / wall,
        checkpoint_overhead=policy.stall_s / (policy.interval_s + policy.stall_s),
        work_lost_per_failure_s=lost,
        wall_lost_per_failure_s=lost + wall - 1 / policy.failures_per_s,
        best_interval_s=best_t,
        best_goodput=best_g,
        storage_busy=policy.write_s / (policy.interval_s + policy.stall_s),
        best_storage_busy=policy.write_s / (best_t + policy.stall_s),
    )


def monte_carlo(policy: Policy, *, failures: int = 200_000, batches: int = 20, seed: int = 0) -> Check:
    """Sample ``failures`` failure cycles and walk each through its checkpoints.

    Independent of the closed form's sums: each cycle draws the running time to the failure, counts
    the snapshots taken and which of them were durable by then, and the failure's kind.
    """
    rng = random.Random(seed)
    t, c, lag = policy.interval_s, policy.stall_s, policy.durable_lag_s
    period = t + c
    detected, jit, rolled = policy.downtimes()
    per_batch = max(1, failures // batches)
    estimates = []
    for _ in range(batches):
        kept_sum = wall_sum = 0.0
        for _ in range(per_batch):
            x = rng.expovariate(policy.failures_per_s)
            snapshots = int(x // period)
            trained = snapshots * t + min(x - snapshots * period, t)
            kind = rng.random()
            if kind < policy.detectable_share:
                kept = trained  # the emergency checkpoint holds the failing step
                wall = x + policy.emergency_s + detected
            elif kind < policy.detectable_share + policy.jit_share:
                kept = trained - policy.jit_replay_s  # the survivors hold the last completed step
                wall = x + policy.jit_s + jit
            else:
                durable = 0 if x < lag else int((x - lag) // period)
                kept = min(durable, snapshots) * t
                wall = x + rolled
            kept_sum += kept
            wall_sum += wall
        estimates.append(kept_sum / wall_sum)
    mean = statistics.fmean(estimates)
    stderr = statistics.stdev(estimates) / math.sqrt(batches) if batches > 1 else float("inf")
    return Check(policy.name, goodput(policy), mean, stderr, per_batch * batches)
