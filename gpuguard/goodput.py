"""Goodput: the share of a job's wall time that ends up as kept training, with and without gpuguard.

The model, per policy (one `Policy`):

- Failures arrive as a Poisson process while the job runs, at ``failures_per_s`` for the whole job
  (the per-node rate times the nodes). Downtime does not age the job.
- Between failures the job repeats: ``interval_s`` of training, then ``stall_s`` blocked while a
  checkpoint is snapshotted. A checkpoint becomes usable (durable) ``durable_lag_s`` after its
  snapshot; blocking saves such as ``torch.save`` have a lag of 0 (the stall covers the write).
- A failure preceded by detectable degradation (a share ``detectable_share`` of them, gpuguard
  only) triggers an emergency checkpoint of the current step: no training is lost, the job spends
  ``emergency_s`` writing it, then leaves.
- Any other failure rolls back to the newest durable checkpoint: the training since then is lost.
- Every failure then costs ``downtime_s``: restart, reschedule onto another node, restore.

`closed_form` is exact for this model (renewal-reward: expected kept training per failure cycle over
its expected wall time, with the geometric sums done in closed form); `monte_carlo` samples failure
cycles and walks through the checkpoints to check it. Failure-rate references: NVIDIA reported 19
remediation requests per 1,000 GPU nodes per day; Meta's Llama 3 report, 419 unexpected
interruptions in 54 days on 16,384 H100 GPUs.

Example:
    >>> inputs = GoodputInputs(nodes=128, gpus_per_node=8)
    >>> report = compare(inputs)
    >>> report.gpuguard.goodput > report.periodic.goodput
    True
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from gpuguard.errors import ConfigError

DAY_S: Final = 86_400.0
_MIN_INTERVAL_S: Final = 1.0  # checkpointing more often than once a second is not a setting anyone uses

# NVIDIA, GeForce NOW fleet: 19 remediation requests per 1,000 GPU nodes per day (see DESIGN.md).
NVIDIA_PER_NODE_DAY: Final = 19 / 1000
# Meta, "The Llama 3 Herd of Models" (2024), section 3.3.4: 419 unexpected interruptions in 54 days
# of pre-training on 16,384 H100 GPUs.
LLAMA3_PER_GPU_DAY: Final = 419 / (54 * 16_384)
FAILURE_SOURCES: Final = ("nvidia", "llama3")

# Costs measured on one H200 for a 6 GiB state (fp32 model + AdamW), per GiB
# (tests/data/h200-checkpoint-baseline.json, in the repository; tests/test_goodput.py checks these against it):
H200_TORCH_SAVE_S_PER_GIB: Final = 12.55 / 6  # torch.save with fsync: blocks training throughout
H200_TORCH_LOAD_S_PER_GIB: Final = 4.699 / 6  # torch.load to the GPU
H200_PINNED_COPY_S_PER_GIB: Final = 0.117 / 6  # gpuguard's stall: copy into pinned buffers on a side stream
H200_PARALLEL_WRITE_S_PER_GIB: Final = 3.25 / 6  # 8 threads writing the staged bytes with fsync


@dataclass(frozen=True)
class Policy:
    """One checkpointing policy in the model (see the module docstring for what each field means)."""

    name: str
    failures_per_s: float
    interval_s: float
    stall_s: float
    durable_lag_s: float
    downtime_s: float
    detectable_share: float = 0.0
    emergency_s: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """What a policy yields, per the closed form."""

    name: str
    goodput: float  # kept training time / wall time
    training_h_per_day: float
    checkpoint_overhead: float  # share of running time spent stalled in periodic saves
    work_lost_per_failure_s: float  # training redone, averaged over every failure (detected or not)
    wall_lost_per_failure_s: float  # training redone + emergency save + downtime
    best_interval_s: float  # the interval that maximises goodput under the same costs
    best_goodput: float

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


@dataclass(frozen=True)
class GoodputInputs:
    """A job and its costs. Seconds throughout; ``None`` costs come from the H200 measurements, scaled
    by ``state_gib`` (the checkpoint size per GPU, written by every rank in parallel)."""

    nodes: int = 128
    gpus_per_node: int = 8
    step_time_s: float = 1.0
    state_gib: float = 6.0
    interval_s: float = 1800.0
    restart_s: float = 120.0
    reschedule_s: float = 300.0
    failure_source: str = "nvidia"
    failures_per_node_day: float | None = None  # overrides failure_source
    detectable_share: float = 0.2
    periodic_stall_s: float | None = None
    periodic_restore_s: float | None = None
    gpuguard_stall_s: float | None = None
    gpuguard_durable_s: float | None = None
    gpuguard_restore_s: float | None = None
    notes: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, value, "must be a whole number, 1 or greater")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("nodes", "gpus_per_node", "failure_source", "notes") or value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f.name, value, "must be a finite number")
            positive = f.name in ("step_time_s", "state_gib", "interval_s", "failures_per_node_day")
            if (positive and value <= 0) or value < 0:
                raise ConfigError(f.name, value, "must be greater than 0" if positive else "must be 0 or greater")
        if self.failure_source not in FAILURE_SOURCES:
            raise ConfigError("failure_source", self.failure_source, "allowed: " + ", ".join(FAILURE_SOURCES))
        if not 0 <= self.detectable_share <= 1:
            raise ConfigError("detectable_share", self.detectable_share, "must be from 0 to 1")
        lag = self.gpuguard_durable - self.gpuguard_stall
        if lag < 0:
            raise ConfigError("gpuguard_durable_s", self.gpuguard_durable, "must be at least gpuguard_stall_s")
        if lag > self.interval_s:
            raise ConfigError(
                "interval_s",
                self.interval_s,
                f"must be at least gpuguard's time to durable after the snapshot ({lag:g} s): "
                "checkpoints would queue behind each other",
            )

    # Resolved costs: the explicit value, or the H200 figure scaled to the state's size.
    @property
    def periodic_stall(self) -> float:
        return _or(self.periodic_stall_s, H200_TORCH_SAVE_S_PER_GIB * self.state_gib)

    @property
    def periodic_restore(self) -> float:
        return _or(self.periodic_restore_s, H200_TORCH_LOAD_S_PER_GIB * self.state_gib)

    @property
    def gpuguard_stall(self) -> float:
        return _or(self.gpuguard_stall_s, H200_PINNED_COPY_S_PER_GIB * self.state_gib)

    @property
    def gpuguard_durable(self) -> float:
        return _or(self.gpuguard_durable_s, H200_PARALLEL_WRITE_S_PER_GIB * self.state_gib)

    @property
    def gpuguard_restore(self) -> float:
        return _or(self.gpuguard_restore_s, H200_TORCH_LOAD_S_PER_GIB * self.state_gib)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def failures_per_day(self) -> float:
        """For the whole job."""
        if self.failures_per_node_day is not None:
            return self.failures_per_node_day * self.nodes
        if self.failure_source == "llama3":
            return LLAMA3_PER_GPU_DAY * self.gpus
        return NVIDIA_PER_NODE_DAY * self.nodes

    def policies(self) -> tuple[Policy, Policy]:
        rate = self.failures_per_day / DAY_S
        periodic = Policy(
            name="periodic only",
            failures_per_s=rate,
            interval_s=self.interval_s,
            stall_s=self.periodic_stall,
            durable_lag_s=0.0,  # a blocking save is durable when it returns
            downtime_s=self.restart_s + self.reschedule_s + self.periodic_restore,
        )
        guarded = Policy(
            name="gpuguard",
            failures_per_s=rate,
            interval_s=self.interval_s,
            stall_s=self.gpuguard_stall,
            durable_lag_s=self.gpuguard_durable - self.gpuguard_stall,
            downtime_s=self.restart_s + self.reschedule_s + self.gpuguard_restore,
            detectable_share=self.detectable_share,
            # The job stops at the detected step and leaves once the emergency checkpoint is durable.
            emergency_s=self.gpuguard_durable,
        )
        return periodic, guarded

    def assumptions(self) -> dict[str, Any]:
        """Every figure the result depends on, with where it comes from."""
        source = (
            f"{self.failures_per_node_day:g} per node per day (given)"
            if self.failures_per_node_day is not None
            else "Meta Llama 3: 419 interruptions in 54 days on 16,384 GPUs"
            if self.failure_source == "llama3"
            else "NVIDIA: 19 remediations per 1,000 nodes per day"
        )
        h200 = "H200 measurement scaled to the state size"
        return {
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "step_time_s": self.step_time_s,
            "state_gib_per_gpu": self.state_gib,
            "checkpoint_interval_s": self.interval_s,
            "failure_rate": source,
            "failures_per_day": round(self.failures_per_day, 4),
            "mean_time_between_failures_h": round(24 / self.failures_per_day, 3),
            "detectable_share": self.detectable_share,
            "restart_s": self.restart_s,
            "reschedule_s": self.reschedule_s,
            "periodic_stall_s": _cost(self.periodic_stall_s, self.periodic_stall, f"torch.save, {h200}"),
            "periodic_restore_s": _cost(self.periodic_restore_s, self.periodic_restore, f"torch.load, {h200}"),
            "gpuguard_stall_s": _cost(self.gpuguard_stall_s, self.gpuguard_stall, f"pinned copy, {h200}"),
            "gpuguard_durable_s": _cost(
                self.gpuguard_durable_s, self.gpuguard_durable, f"8-thread write with fsync, {h200}"
            ),
            "gpuguard_restore_s": _cost(self.gpuguard_restore_s, self.gpuguard_restore, f"torch.load, {h200}"),
            "model": "Poisson failures while running; periodic saves every interval; an undetected failure "
            "rolls back to the newest durable checkpoint; a detected one costs an emergency save and no "
            "training; every failure costs restart + reschedule + restore; no false alarms, no failures "
            "during downtime or during an emergency save; the storage bandwidth of frequent checkpoints is not charged",
        }


@dataclass(frozen=True)
class Report:
    inputs: GoodputInputs
    periodic: Outcome
    gpuguard: Outcome
    checks: tuple[Check, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "assumptions": self.inputs.assumptions(),
            "periodic": self.periodic.to_dict(),
            "gpuguard": self.gpuguard.to_dict(),
            "gpu_hours_saved_per_day": round(
                (self.gpuguard.goodput - self.periodic.goodput) * 24 * self.inputs.gpus, 2
            ),
            "monte_carlo": [c.to_dict() for c in self.checks],
        }


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _cost(given: float | None, value: float, default_source: str) -> str:
    return f"{value:.4g} (given)" if given is not None else f"{value:.4g} ({default_source})"


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
    p = policy.detectable_share
    kept = p * trained + (1 - p) * kept_if_missed
    wall = 1 / lam + policy.downtime_s + p * policy.emergency_s
    return kept, trained - kept, wall


def goodput(policy: Policy) -> float:
    kept, _, wall = expected_cycle(policy)
    return kept / wall


def best_interval(policy: Policy) -> tuple[float, float]:
    """The checkpoint interval with the highest goodput (golden-section search on its logarithm)."""
    lo = math.log(max(policy.durable_lag_s, _MIN_INTERVAL_S))
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
        wall_lost_per_failure_s=lost + policy.downtime_s + policy.detectable_share * policy.emergency_s,
        best_interval_s=best_t,
        best_goodput=best_g,
    )


def monte_carlo(policy: Policy, *, failures: int = 200_000, batches: int = 20, seed: int = 0) -> Check:
    """Sample ``failures`` failure cycles and walk each through its checkpoints.

    Independent of the closed form's sums: each cycle draws the running time to the failure, counts
    the snapshots taken and which of them were durable by then, and whether the failure was detected.
    """
    rng = random.Random(seed)
    t, c, lag = policy.interval_s, policy.stall_s, policy.durable_lag_s
    period = t + c
    per_batch = max(1, failures // batches)
    estimates = []
    for _ in range(batches):
        kept_sum = wall_sum = 0.0
        for _ in range(per_batch):
            x = rng.expovariate(policy.failures_per_s)
            snapshots = int(x // period)
            trained = snapshots * t + min(x - snapshots * period, t)
            wall = x + policy.downtime_s
            if rng.random() < policy.detectable_share:
                kept = trained  # the emergency checkpoint holds the failing step
                wall += policy.emergency_s
            else:
                durable = 0 if x < lag else int((x - lag) // period)
                kept = min(durable, snapshots) * t
            kept_sum += kept
            wall_sum += wall
        estimates.append(kept_sum / wall_sum)
    mean = statistics.fmean(estimates)
    stderr = statistics.stdev(estimates) / math.sqrt(batches) if batches > 1 else float("inf")
    return Check(policy.name, goodput(policy), mean, stderr, per_batch * batches)


def compare(inputs: GoodputInputs, *, check: bool = False, failures: int = 200_000, seed: int = 0) -> Report:
    """Periodic checkpoints alone against gpuguard, for one job; ``check`` adds the Monte Carlo runs."""
    periodic, guarded = inputs.policies()
    checks: tuple[Check, ...] = ()
    if check:
        checks = tuple(monte_carlo(p, failures=failures, seed=seed + i) for i, p in enumerate((periodic, guarded)))
    return Report(inputs, outcome(periodic), outcome(guarded), checks)
