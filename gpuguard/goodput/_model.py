"""The goodput model for one policy: the closed form (renewal-reward), the best interval, and a Monte Carlo
walk of the same process that checks it. `gpuguard.goodput` builds the policies from a job's inputs.

A policy has one or two tiers. Without a local tier every checkpoint goes to object storage. With one
(``local_tier``), every checkpoint lands on node-local storage (durable there ``durable_lag_s`` after its
snapshot) and every ``object_every``-th also goes to object storage (durable there ``object_lag_s`` after
its snapshot). A rolled-back failure restores from the local tier when its node survives (``local_share``
of them; its downtime ``local_downtime_s``) and from object storage when the node is gone, its local tier
with it."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Final

from gpuguard.errors import ConfigError

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
    write_s: float = 0.0  # object storage's time to write one checkpoint of the whole job
    max_storage_share: float = 1.0  # of object storage's time, the most checkpoints may take
    checkpoint_bytes: float = 0.0  # one checkpoint of the whole job (for the GB/s reported; not in the model)
    # The local tier (see the module docstring); without it the fields below keep their defaults.
    local_tier: bool = False
    object_every: int = 1
    object_lag_s: float | None = None  # None: durable_lag_s (one tier)
    local_share: float = 0.0  # of rolled-back failures, those whose node (and local tier) survives
    local_write_s: float = 0.0  # a node's local storage's time to write its part of one checkpoint
    max_local_share: float = 1.0  # of the local storage's time, the most checkpoints may take
    local_bytes_per_node: float = 0.0  # a node's part of one checkpoint (for the GB/s reported)
    local_downtime_s: float | None = None  # a rolled-back failure restored from the local tier (None: downtime_s)

    def __post_init__(self) -> None:
        if not isinstance(self.object_every, int) or isinstance(self.object_every, bool) or self.object_every < 1:
            raise ConfigError("object_every", self.object_every, "must be a whole number, 1 or greater")
        if not self.local_tier and (
            self.object_every != 1 or self.local_share or self.local_write_s or self.local_downtime_s is not None
        ):
            raise ConfigError(
                "local_tier",
                self.local_tier,
                "must be True with object_every, local_share, local_write_s or local_downtime_s",
            )
        if not 0 <= self.local_share <= 1:
            raise ConfigError("local_share", self.local_share, "must be from 0 to 1")
        if self.object_lag < self.durable_lag_s:
            raise ConfigError(
                "object_lag_s", self.object_lag_s, f"must be at least durable_lag_s ({self.durable_lag_s:g})"
            )

    @property
    def local_rolled_downtime(self) -> float:
        return self.downtime_s if self.local_downtime_s is None else self.local_downtime_s

    @property
    def object_lag(self) -> float:
        return self.durable_lag_s if self.object_lag_s is None else self.object_lag_s

    @property
    def min_interval_s(self) -> float:
        """No shorter interval: checkpoints would queue (durable lag), or take more of a tier's time than
        allowed (object storage sees one checkpoint every ``object_every`` periods)."""
        period_floor = max(
            self.write_s / self.max_storage_share / self.object_every,
            self.local_write_s / self.max_local_share,
        )
        return max(self.durable_lag_s, period_floor - self.stall_s, _MIN_INTERVAL_S)

    @property
    def object_interval_s(self) -> float:
        """Training and stalls between two checkpoints that reach object storage, less one stall (with
        ``object_every`` 1: ``interval_s``)."""
        return self.object_every * (self.interval_s + self.stall_s) - self.stall_s

    @property
    def rolled_back_share(self) -> float:
        return 1.0 - self.detectable_share - self.jit_share

    def downtimes(self) -> tuple[float, float, float]:
        """(detectable, just-in-time saved, rolled back from object storage)."""
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
    storage_busy: float = 0.0  # share of object storage's time spent writing checkpoints, at this interval
    best_storage_busy: float = 0.0  # the same at the best interval
    # Per tier: the interval between checkpoints reaching each tier, and the GB/s they sustain there.
    local_tier: bool = False
    interval_s: float = 0.0  # between checkpoints (with a local tier: the local interval)
    object_every: int = 1
    object_interval_s: float = 0.0
    object_gbps: float = 0.0  # the whole job's, into object storage
    local_gbps_per_node: float = 0.0  # each node's, into its local tier (0 without one)
    local_busy: float = 0.0  # share of the local storage's time spent writing checkpoints
    best_object_every: int = 1
    best_object_interval_s: float = 0.0
    best_object_gbps: float = 0.0
    best_local_gbps_per_node: float = 0.0
    best_local_busy: float = 0.0

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


def expected_cycle(
    policy: Policy, *, interval_s: float | None = None, object_every: int | None = None
) -> tuple[float, float, float]:
    """Per failure cycle (resume to resume): expected kept training, training lost, and wall time.

    With X ~ Exp(λ) the running time to the next failure, P = interval + stall, q = e^(-λP):
    checkpoint j is durable by X when jP + lag <= X, so E[#durable] = e^(-λ·lag)·q/(1-q); the
    stalled time before X is sum_j ∫ over each stall of P(X > t) dt.
    """
    lam, c = policy.failures_per_s, policy.stall_s
    # The searches vary these without building a Policy each time.
    t = policy.interval_s if interval_s is None else interval_s
    period = t + c
    q = math.exp(-lam * period)
    stalled = math.exp(-lam * t) * -math.expm1(-lam * c) / (lam * -math.expm1(-lam * period))
    trained = 1 / lam - stalled  # all the training done before the failure
    kept_if_missed = t * math.exp(-lam * policy.durable_lag_s) * q / -math.expm1(-lam * period)
    if policy.local_tier:
        # The node lost: only object storage's checkpoints count, one every m periods, each holding m intervals.
        m = policy.object_every if object_every is None else object_every
        kept_object = m * t * math.exp(-lam * policy.object_lag) * q**m / -math.expm1(-lam * m * period)
        kept_if_missed = policy.local_share * kept_if_missed + (1 - policy.local_share) * kept_object
    p_d, p_j, p_u = policy.detectable_share, policy.jit_share, policy.rolled_back_share
    kept = p_d * trained + p_j * (trained - policy.jit_replay_s) + p_u * kept_if_missed
    detected, jit, rolled = policy.downtimes()
    if policy.local_tier:
        rolled = policy.local_share * policy.local_rolled_downtime + (1 - policy.local_share) * rolled
    wall = 1 / lam + p_d * (detected + policy.emergency_s) + p_j * (jit + policy.jit_s) + p_u * rolled
    return kept, trained - kept, wall


def goodput(policy: Policy) -> float:
    kept, _, wall = expected_cycle(policy)
    return kept / wall


def best_interval(policy: Policy) -> tuple[float, float]:
    """The checkpoint interval with the highest goodput and that goodput (with a local tier: the local
    interval, at the best ``object_every``; `best_setting` says which)."""
    best, value = best_setting(policy)
    return best.interval_s, value


# Past this many local checkpoints per object one, object storage's bound no longer sets the search.
_MAX_OBJECT_EVERY: Final = 10_000
# Every m up to this is tried; past it, a geometric grid (5% apart) and the neighbours of its best, so that a
# fast local tier over slow object storage (m in the thousands) costs a fraction of a second, not minutes.
_EVERY_M_UP_TO: Final = 128


def best_setting(policy: Policy, *, object_every: int | None = None) -> tuple[Policy, float]:
    """The policy at its best interval (with a local tier: the best local interval and ``object_every``,
    or the best local interval for the ``object_every`` given) and its goodput. Each interval is bounded by
    its tier's bandwidth (`Policy.min_interval_s`).

    With a local tier, for each ``object_every`` m from 1 up to the first whose object-storage bound no
    longer exceeds the local one, the best local interval for that m; sending fewer checkpoints to object
    storage than its bound allows only loses more to failures that take a node. Every m up to 128, then
    a grid 5% apart and the neighbours of its best.
    """
    if object_every is not None:
        return _best_for(_with(policy, object_every=object_every))
    if not policy.local_tier:
        return _best_for(policy)
    local_floor = _with(policy, object_every=1, write_s=0.0).min_interval_s
    object_period = policy.write_s / policy.max_storage_share
    last = min(_MAX_OBJECT_EVERY, max(1, math.ceil(object_period / (local_floor + policy.stall_s))))
    tried: dict[int, tuple[Policy, float]] = {}

    def at(m: int) -> tuple[Policy, float]:
        if m not in tried:
            tried[m] = _best_for(_with(policy, object_every=m))
        return tried[m]

    grid = list(range(1, min(last, _EVERY_M_UP_TO) + 1))
    while grid[-1] < last:
        grid.append(min(last, max(grid[-1] + 1, math.floor(grid[-1] * 1.05))))
    best_m = max(grid, key=lambda m: at(m)[1])
    if best_m > _EVERY_M_UP_TO:
        step = max(1, math.ceil(best_m * 0.05))
        best_m = max(range(max(1, best_m - step), min(last, best_m + step) + 1), key=lambda m: at(m)[1])
    return at(best_m)


def _best_for(policy: Policy) -> tuple[Policy, float]:
    """Golden-section search on the interval's logarithm, ``object_every`` fixed."""
    lo = math.log(policy.min_interval_s)
    hi = math.log(30 * DAY_S)

    def value(log_t: float) -> float:
        kept, _, wall = expected_cycle(policy, interval_s=math.exp(log_t))
        return kept / wall

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
    best = _with(policy, interval_s=math.exp((a + b) / 2))
    return best, goodput(best)


def _with(policy: Policy, **changes: Any) -> Policy:
    return Policy(**{**asdict(policy), **changes})


def outcome(policy: Policy) -> Outcome:
    kept, lost, wall = expected_cycle(policy)
    best, best_g = best_setting(policy)
    best_t = best.interval_s
    return Outcome(
        name=policy.name,
        goodput=kept / wall,
        training_h_per_day=24 * kept / wall,
        checkpoint_overhead=policy.stall_s / (policy.interval_s + policy.stall_s),
        work_lost_per_failure_s=lost,
        wall_lost_per_failure_s=lost + wall - 1 / policy.failures_per_s,
        best_interval_s=best_t,
        best_goodput=best_g,
        storage_busy=_object_busy(policy),
        best_storage_busy=_object_busy(best),
        local_tier=policy.local_tier,
        interval_s=policy.interval_s,
        object_every=policy.object_every,
        object_interval_s=policy.object_interval_s,
        object_gbps=_object_gbps(policy),
        local_gbps_per_node=_local_gbps(policy),
        local_busy=policy.local_write_s / (policy.interval_s + policy.stall_s),
        best_object_every=best.object_every,
        best_object_interval_s=best.object_interval_s,
        best_object_gbps=_object_gbps(best),
        best_local_gbps_per_node=_local_gbps(best),
        best_local_busy=best.local_write_s / (best.interval_s + best.stall_s),
    )


def _object_busy(policy: Policy) -> float:
    return policy.write_s / (policy.object_every * (policy.interval_s + policy.stall_s))


def _object_gbps(policy: Policy) -> float:
    """Sustained: one checkpoint's bytes per object period."""
    return policy.checkpoint_bytes / (policy.object_every * (policy.interval_s + policy.stall_s)) / 1e9


def _local_gbps(policy: Policy) -> float:
    return policy.local_bytes_per_node / (policy.interval_s + policy.stall_s) / 1e9 if policy.local_tier else 0.0


def monte_carlo(policy: Policy, *, failures: int = 200_000, batches: int = 20, seed: int = 0) -> Check:
    """Sample ``failures`` failure cycles and walk each through its checkpoints.

    Independent of the closed form's sums: each cycle draws the running time to the failure, counts
    the snapshots taken and which of them were durable by then, and the failure's kind.
    """
    rng = random.Random(seed)
    t, c, lag = policy.interval_s, policy.stall_s, policy.durable_lag_s
    m, object_lag = policy.object_every, policy.object_lag
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
                # Drawn only with a local tier, so that one-tier policies walk the same samples as before.
                if policy.local_tier and rng.random() >= policy.local_share:  # the node and its local tier gone
                    durable = 0 if x < object_lag else m * int((x - object_lag) // (m * period))
                    down = rolled
                else:
                    durable = 0 if x < lag else int((x - lag) // period)
                    down = policy.local_rolled_downtime if policy.local_tier else rolled
                kept = min(durable, snapshots) * t
                wall = x + down
            kept_sum += kept
            wall_sum += wall
        estimates.append(kept_sum / wall_sum)
    mean = statistics.fmean(estimates)
    stderr = statistics.stdev(estimates) / math.sqrt(batches) if batches > 1 else float("inf")
    return Check(policy.name, goodput(policy), mean, stderr, per_batch * batches)
