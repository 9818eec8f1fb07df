"""Goodput: the share of a job's wall time that ends up as kept training, with and without gpuguard.

The model, per policy (one `Policy`):

- Failures arrive as a Poisson process while the job runs, at ``failures_per_s`` for the whole job
  (the per-node rate times the nodes). Downtime does not age the job.
- Between failures the job repeats: ``interval_s`` of training, then ``stall_s`` blocked while a
  checkpoint is snapshotted. A checkpoint becomes usable (durable) ``durable_lag_s`` after its
  snapshot; blocking saves such as ``torch.save`` have a lag of 0 (the stall covers the write).
- Three kinds of failure, by share:
  * *detectable* (``detectable_share``): preceded by degradation gpuguard sees; it takes an
    emergency checkpoint of the current step: no training is lost, the job spends ``emergency_s``
    writing it, then leaves;
  * *sudden with a surviving replica* (``jit_share``, gpuguard with just-in-time saves): the
    survivors save the last completed step after ``jit_s`` (detection + the save); the step in
    progress is computed again (``jit_replay_s``);
  * everything else rolls back to the newest durable checkpoint: the training since then is lost.
- Every failure then costs its kind's downtime: restart (on the same node when a restart in place
  clears it, else after a reschedule onto another node) and restore.

The costs are charged as the hardware bounds them: each checkpoint, emergency save and restore moves
the whole job's state through one storage system, so none is faster than its bytes over the
aggregate storage bandwidth — which bounds the best interval from below.

`closed_form` is exact for this model (renewal-reward: expected kept training per failure cycle over
its expected wall time, with the geometric sums done in closed form); `monte_carlo` samples failure
cycles and walks through the checkpoints to check it. Failure-rate references: NVIDIA reported 19
remediation requests per 1,000 GPU nodes per day; Meta's Llama 3 report, 419 unexpected
interruptions in 54 days on 16,384 H100 GPUs.

Example:
    >>> inputs = GoodputInputs(nodes=128, gpus_per_node=8)
    >>> report = compare(inputs)
    >>> report.gpuguard_jit.goodput > report.gpuguard.goodput > report.periodic.goodput
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from gpuguard.errors import ConfigError
from gpuguard.goodput._model import (
    DAY_S,
    Check,
    Outcome,
    Policy,
    best_interval,
    expected_cycle,
    goodput,
    monte_carlo,
    outcome,
)

GIB: Final = 1024**3

# NVIDIA, GeForce NOW fleet: 19 remediation requests per 1,000 GPU nodes per day (see DESIGN.md).
NVIDIA_PER_NODE_DAY: Final = 19 / 1000
# Meta, "The Llama 3 Herd of Models" (2024), section 3.3.4: 419 unexpected interruptions in 54 days
# of pre-training on 16,384 H100 GPUs.
LLAMA3_PER_GPU_DAY: Final = 419 / (54 * 16_384)
FAILURE_SOURCES: Final = ("nvidia", "llama3")

# Meta, "The Llama 3 Herd of Models" (2024), section 3.3.1: the Tectonic storage fabric behind Llama 3's
# 16,384 GPUs "supports a sustainable throughput of 2 TB/s and a peak throughput of 7 TB/s". The default
# aggregate bandwidth is that sustained figure per GPU (122 MB/s), times the job's GPUs.
TECTONIC_BYTES_PER_S: Final = 2e12
TECTONIC_GPUS: Final = 16_384

# Meta, Llama 3 report, Table 5: of 419 interruptions, 54 software bugs and 7 NCCL watchdog timeouts
# (14.6%) need no new hardware: a restart in place clears them. The rest (GPUs, HBM, network, hosts)
# need another node.
LLAMA3_INPLACE_SHARE: Final = 61 / 419

# Costs measured on one H200 for a 6 GiB state (fp32 model + AdamW), per GiB
# (tests/data/h200-checkpoint-baseline.json, in the repository; tests/test_goodput.py checks these against it):
H200_TORCH_SAVE_S_PER_GIB: Final = 12.55 / 6  # torch.save with fsync: blocks training throughout
H200_TORCH_LOAD_S_PER_GIB: Final = 4.699 / 6  # torch.load to the GPU
H200_PINNED_COPY_S_PER_GIB: Final = 0.117 / 6  # gpuguard's stall: copy into pinned buffers on a side stream
H200_PARALLEL_WRITE_S_PER_GIB: Final = 3.25 / 6  # 8 threads writing the staged bytes with fsync

# gpuguard's default bound on noticing a dead peer: peer_timeout_s + 2 x peer_heartbeat_s (3 + 2 x 0.5 s).
DEFAULT_JIT_DETECT_S: Final = 4.0


@dataclass(frozen=True)
class GoodputInputs:
    """A job and its costs. Seconds throughout; ``None`` costs come from the H200 measurements, scaled
    by ``state_gib`` (the checkpoint size per GPU, written by every rank in parallel), and never below
    what the aggregate storage bandwidth allows for the whole job's bytes."""

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
    sudden_replicated_share: float = 0.6
    inplace_share_detectable: float = 0.0
    inplace_share_sudden: float = LLAMA3_INPLACE_SHARE
    storage_gbps: float | None = None
    periodic_stall_s: float | None = None
    periodic_restore_s: float | None = None
    gpuguard_stall_s: float | None = None
    gpuguard_durable_s: float | None = None
    gpuguard_restore_s: float | None = None
    jit_detect_s: float = DEFAULT_JIT_DETECT_S
    jit_save_s: float | None = None
    jit_replay_steps: float = 1.0
    max_storage_share: float = 0.5
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
            positive = f.name in ("step_time_s", "state_gib", "interval_s", "failures_per_node_day", "storage_gbps")
            if (positive and value <= 0) or value < 0:
                raise ConfigError(f.name, value, "must be greater than 0" if positive else "must be 0 or greater")
        if self.failure_source not in FAILURE_SOURCES:
            raise ConfigError("failure_source", self.failure_source, "allowed: " + ", ".join(FAILURE_SOURCES))
        for name in ("detectable_share", "sudden_replicated_share", "inplace_share_detectable", "inplace_share_sudden"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, getattr(self, name), "must be from 0 to 1")
        if not 0 < self.max_storage_share <= 1:
            raise ConfigError("max_storage_share", self.max_storage_share, "must be greater than 0 and at most 1")
        if self.detectable_share + self.sudden_replicated_share > 1 + 1e-12:
            raise ConfigError(
                "sudden_replicated_share",
                self.sudden_replicated_share,
                f"must be at most 1 - detectable_share = {1 - self.detectable_share:g}: the shares are of all failures",
            )
        lag = self.gpuguard_durable - self.gpuguard_stall
        if lag < 0:
            raise ConfigError("gpuguard_durable_s", self.gpuguard_durable, "must be at least gpuguard_stall_s")
        if lag > self.interval_s:
            raise ConfigError(
                "interval_s",
                self.interval_s,
                f"must be at least gpuguard's time to durable after the snapshot ({lag:g} s, bounded by the storage "
                "bandwidth): checkpoints would queue behind each other",
            )

    # The storage bound: the whole job's checkpoint bytes through the aggregate bandwidth.
    @property
    def storage_bytes_per_s(self) -> float:
        if self.storage_gbps is not None:
            return self.storage_gbps * 1e9
        return TECTONIC_BYTES_PER_S * self.gpus / TECTONIC_GPUS

    @property
    def checkpoint_bytes(self) -> float:
        """One checkpoint of the whole job: every GPU's ``state_gib``."""
        return self.state_gib * GIB * self.gpus

    @property
    def storage_floor_s(self) -> float:
        """The least time one checkpoint (or restore) of the whole job can take through the storage."""
        return self.checkpoint_bytes / self.storage_bytes_per_s

    # Resolved costs: the explicit value or the H200 figure scaled to the state, never below the storage floor.
    @property
    def periodic_stall(self) -> float:
        return max(_or(self.periodic_stall_s, H200_TORCH_SAVE_S_PER_GIB * self.state_gib), self.storage_floor_s)

    @property
    def periodic_restore(self) -> float:
        return max(_or(self.periodic_restore_s, H200_TORCH_LOAD_S_PER_GIB * self.state_gib), self.storage_floor_s)

    @property
    def gpuguard_stall(self) -> float:
        return _or(self.gpuguard_stall_s, H200_PINNED_COPY_S_PER_GIB * self.state_gib)

    @property
    def gpuguard_durable(self) -> float:
        return max(_or(self.gpuguard_durable_s, H200_PARALLEL_WRITE_S_PER_GIB * self.state_gib), self.storage_floor_s)

    @property
    def gpuguard_restore(self) -> float:
        return max(_or(self.gpuguard_restore_s, H200_TORCH_LOAD_S_PER_GIB * self.state_gib), self.storage_floor_s)

    @property
    def jit_save(self) -> float:
        """The survivors write the whole job's state: as long as any gpuguard save, at least."""
        return max(_or(self.jit_save_s, self.gpuguard_durable), self.storage_floor_s)

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

    def _downtime(self, inplace_share: float, restore_s: float) -> float:
        return self.restart_s + (1 - inplace_share) * self.reschedule_s + restore_s

    def policies(self) -> tuple[Policy, Policy, Policy]:
        """Periodic checkpoints alone, gpuguard (emergency saves of detected failures), and gpuguard with
        just-in-time saves of sudden failures that leave a replica."""
        rate = self.failures_per_day / DAY_S
        sudden = self.inplace_share_sudden
        periodic = Policy(
            name="periodic only",
            failures_per_s=rate,
            interval_s=self.interval_s,
            stall_s=self.periodic_stall,
            durable_lag_s=0.0,  # a blocking save is durable when it returns
            downtime_s=self._downtime(sudden, self.periodic_restore),
            write_s=self.periodic_stall,
            max_storage_share=self.max_storage_share,
            # Detectable failures are failures like any other here; their kind decides where they restart.
            detectable_share=0.0,
        )
        guarded = Policy(
            name="gpuguard",
            failures_per_s=rate,
            interval_s=self.interval_s,
            stall_s=self.gpuguard_stall,
            durable_lag_s=self.gpuguard_durable - self.gpuguard_stall,
            downtime_s=self._downtime(sudden, self.gpuguard_restore),
            detectable_share=self.detectable_share,
            # The job stops at the detected step and leaves once the emergency checkpoint is durable.
            emergency_s=self.gpuguard_durable,
            detected_downtime_s=self._downtime(self.inplace_share_detectable, self.gpuguard_restore),
            write_s=self.gpuguard_durable,
            max_storage_share=self.max_storage_share,
        )
        jit = Policy(
            **{
                **asdict(guarded),
                "name": "gpuguard + just-in-time",
                "jit_share": self.sudden_replicated_share,
                "jit_s": self.jit_detect_s + self.jit_save,
                "jit_replay_s": self.jit_replay_steps * self.step_time_s,
                "jit_downtime_s": self._downtime(sudden, self.gpuguard_restore),
            }
        )
        if self.detectable_share:  # periodic-only restarts detectable failures where their kind says
            p = self.detectable_share
            periodic = Policy(
                **{
                    **asdict(periodic),
                    "downtime_s": p * self._downtime(self.inplace_share_detectable, self.periodic_restore)
                    + (1 - p) * periodic.downtime_s,
                }
            )
        return periodic, guarded, jit

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
        floor = f", at least the storage floor {self.storage_floor_s:.4g} s"
        bandwidth = (
            f"{self.storage_gbps:g} GB/s (given)"
            if self.storage_gbps is not None
            else f"{self.storage_bytes_per_s / 1e9:.4g} GB/s (Meta's Tectonic for Llama 3: 2 TB/s sustained for "
            "16,384 GPUs, scaled to this job's GPUs)"
        )
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
            "sudden_replicated_share": self.sudden_replicated_share,
            "sudden_unreplicated_share": round(1 - self.detectable_share - self.sudden_replicated_share, 6),
            "inplace_share_detectable": self.inplace_share_detectable,
            "inplace_share_sudden": _share_source(self.inplace_share_sudden),
            "restart_s": self.restart_s,
            "reschedule_s": self.reschedule_s,
            "storage_bandwidth": bandwidth,
            "checkpoint_bytes_per_job": f"{self.checkpoint_bytes / 1e12:.4g} TB",
            "storage_floor_s": round(self.storage_floor_s, 4),
            "max_storage_share": f"{self.max_storage_share:g} (an assumption: the rest of the storage's time is the "
            "data loader's and other jobs')",
            "periodic_stall_s": _cost(self.periodic_stall_s, self.periodic_stall, f"torch.save, {h200}{floor}"),
            "periodic_restore_s": _cost(self.periodic_restore_s, self.periodic_restore, f"torch.load, {h200}{floor}"),
            "gpuguard_stall_s": _cost(self.gpuguard_stall_s, self.gpuguard_stall, f"pinned copy, {h200}"),
            "gpuguard_durable_s": _cost(
                self.gpuguard_durable_s, self.gpuguard_durable, f"8-thread write with fsync, {h200}{floor}"
            ),
            "gpuguard_restore_s": _cost(self.gpuguard_restore_s, self.gpuguard_restore, f"torch.load, {h200}{floor}"),
            "jit_detect_s": _cost(
                None if self.jit_detect_s == DEFAULT_JIT_DETECT_S else self.jit_detect_s,
                self.jit_detect_s,
                "gpuguard's bound: peer_timeout_s + 2 x peer_heartbeat_s",
            ),
            "jit_save_s": _cost(
                self.jit_save_s, self.jit_save, "as gpuguard_durable_s: the survivors write every rank's part"
            ),
            "jit_replay_steps": self.jit_replay_steps,
            "model": "Poisson failures while running; periodic saves every interval; a detected failure costs an "
            "emergency save and no training; a sudden one with a surviving replica (gpuguard + just-in-time) costs "
            "detection + the survivors' save + the steps replayed; any other rolls back to the newest durable "
            "checkpoint; every failure costs restart (+ reschedule unless a restart in place clears it) + restore; "
            "saves and restores are bounded by the aggregate storage bandwidth; no false alarms, no failures during "
            "downtime or during a save",
        }


@dataclass(frozen=True)
class Report:
    inputs: GoodputInputs
    periodic: Outcome
    gpuguard: Outcome
    gpuguard_jit: Outcome
    checks: tuple[Check, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        gpus = self.inputs.gpus
        return {
            "assumptions": self.inputs.assumptions(),
            "periodic": self.periodic.to_dict(),
            "gpuguard": self.gpuguard.to_dict(),
            "gpuguard_jit": self.gpuguard_jit.to_dict(),
            "gpu_hours_saved_per_day": round((self.gpuguard.goodput - self.periodic.goodput) * 24 * gpus, 2),
            "gpu_hours_saved_per_day_jit": round((self.gpuguard_jit.goodput - self.periodic.goodput) * 24 * gpus, 2),
            "per_failure": per_failure(self.inputs),
            "monte_carlo": [c.to_dict() for c in self.checks],
        }


def per_failure(inputs: GoodputInputs) -> list[dict[str, Any]]:
    """Per kind of failure and policy, what one failure costs: the save after it, the training lost
    (about half an interval plus the durable lag on a roll back), and the downtime (restart, reschedule
    unless a restart in place clears it, restore)."""
    rows = []
    for policy in inputs.policies():
        restore = inputs.periodic_restore if policy.name == "periodic only" else inputs.gpuguard_restore
        kinds = [
            ("detectable", inputs.detectable_share, inputs.inplace_share_detectable, policy.detectable_share > 0),
            (
                "sudden, a replica survives",
                inputs.sudden_replicated_share,
                inputs.inplace_share_sudden,
                policy.jit_share > 0,
            ),
            (
                "sudden, no replica",
                1 - inputs.detectable_share - inputs.sudden_replicated_share,
                inputs.inplace_share_sudden,
                False,
            ),
        ]
        for kind, share, inplace, saved in kinds:
            save = (policy.emergency_s if kind == "detectable" else policy.jit_s) if saved else 0.0
            replay = policy.jit_replay_s if saved and kind != "detectable" else 0.0
            rows.append(
                {
                    "policy": policy.name,
                    "kind": kind,
                    "share": round(share, 6),
                    "saved": saved,
                    "save_s": round(save, 3),
                    "training_lost_s": round(replay if saved else policy.interval_s / 2 + policy.durable_lag_s, 3),
                    "downtime_s": round(inputs.restart_s + (1 - inplace) * inputs.reschedule_s + restore, 3),
                }
            )
    return rows


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _cost(given: float | None, value: float, default_source: str) -> str:
    if given is not None and value > given:
        return f"{value:.4g} (given {given:g}, raised to the storage floor)"
    return f"{value:.4g} (given)" if given is not None else f"{value:.4g} ({default_source})"


def _share_source(share: float) -> str:
    if share == LLAMA3_INPLACE_SHARE:
        return f"{share:.4g} (Meta Llama 3, Table 5: software bugs and NCCL watchdog timeouts, 61 of 419)"
    return f"{share:g} (given)"


def compare(inputs: GoodputInputs, *, check: bool = False, failures: int = 200_000, seed: int = 0) -> Report:
    """Periodic checkpoints alone, gpuguard, and gpuguard with just-in-time saves, for one job; ``check``
    adds the Monte Carlo runs."""
    policies = inputs.policies()
    checks: tuple[Check, ...] = ()
    if check:
        checks = tuple(monte_carlo(p, failures=failures, seed=seed + i) for i, p in enumerate(policies))
    periodic, guarded, jit = (outcome(p) for p in policies)
    return Report(inputs, periodic, guarded, jit, checks)


__all__ = [
    "DAY_S",
    "FAILURE_SOURCES",
    "Check",
    "GoodputInputs",
    "Outcome",
    "Policy",
    "Report",
    "best_interval",
    "compare",
    "expected_cycle",
    "goodput",
    "monte_carlo",
    "outcome",
    "per_failure",
]
