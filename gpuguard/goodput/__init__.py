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

gpuguard with a node-local tier (``Guard(local_dir=..., object_store_every=m)``): every checkpoint lands
on each node's local storage first (``/dev/shm`` or NVMe: a node's part of the checkpoint over its local
bandwidth, at most ``max_local_share`` of that storage's time), and every m-th one then also goes to
object storage (its bandwidth and ``max_storage_share`` now bound m local intervals, not one); emergency
and just-in-time saves go to object storage as before. A rolled-back failure loses the training since the
newest local checkpoint when its node survives (a process crash, a restart in place), and since the
newest object-storage one when the node is gone with its local tier (``node_loss_share`` of them: by
default the failures a restart in place does not clear). The local tier must hold at least two
checkpoints (one being written, one complete). A failure whose node survives restores from the local
tier (at most the local bandwidth); every other restore reads object storage.

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
    >>> kept_nodes = compare(GoodputInputs(nodes=128, gpus_per_node=8, node_loss_share=0.0))
    >>> kept_nodes.gpuguard_local.best_goodput > kept_nodes.gpuguard.best_goodput
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpuguard.goodput._inputs import (
    DGX_H200_SHM_GIB,
    FAILURE_SOURCES,
    H200_PARALLEL_WRITE_S_PER_GIB,
    H200_PINNED_COPY_S_PER_GIB,
    H200_SHM_WRITE_S_PER_GIB,
    H200_TORCH_LOAD_S_PER_GIB,
    H200_TORCH_SAVE_S_PER_GIB,
    LLAMA3_INPLACE_SHARE,
    MIN_LOCAL_CHECKPOINTS,
    GoodputInputs,
)
from gpuguard.goodput._model import (
    DAY_S,
    Check,
    Outcome,
    Policy,
    best_interval,
    best_setting,
    expected_cycle,
    goodput,
    monte_carlo,
    outcome,
)


@dataclass(frozen=True)
class Report:
    inputs: GoodputInputs
    periodic: Outcome
    gpuguard: Outcome
    gpuguard_jit: Outcome
    gpuguard_local: Outcome
    gpuguard_jit_local: Outcome
    checks: tuple[Check, ...] = ()  # each policy at the given interval
    best_checks: tuple[Check, ...] = ()  # each policy at its best interval(s)

    @property
    def outcomes(self) -> tuple[Outcome, ...]:
        return self.periodic, self.gpuguard, self.gpuguard_jit, self.gpuguard_local, self.gpuguard_jit_local

    def tiers(self) -> list[dict[str, Any]]:
        """One row per policy at its best interval(s): each tier's interval and sustained GB/s, the goodput,
        and the Monte Carlo check of that setting (when run)."""
        checks = {c.name: c for c in self.best_checks}
        rows = []
        for o in self.outcomes:
            check = checks.get(o.name)
            rows.append(
                {
                    "policy": o.name,
                    "local_interval_s": o.best_interval_s if o.local_tier else None,
                    "object_store_every": o.best_object_every,
                    "object_interval_s": o.best_object_interval_s,
                    "local_gbps_per_node": o.best_local_gbps_per_node,
                    "local_gbps_job": o.best_local_gbps_per_node * self.inputs.nodes,
                    "object_gbps": o.best_object_gbps,
                    "goodput": o.best_goodput,
                    "monte_carlo": check.to_dict() if check else None,
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        gpus = self.inputs.gpus

        def saved(o: Outcome) -> float:
            return round((o.goodput - self.periodic.goodput) * 24 * gpus, 2)

        return {
            "assumptions": self.inputs.assumptions(),
            "periodic": self.periodic.to_dict(),
            "gpuguard": self.gpuguard.to_dict(),
            "gpuguard_jit": self.gpuguard_jit.to_dict(),
            "gpuguard_local": self.gpuguard_local.to_dict(),
            "gpuguard_jit_local": self.gpuguard_jit_local.to_dict(),
            "gpu_hours_saved_per_day": saved(self.gpuguard),
            "gpu_hours_saved_per_day_jit": saved(self.gpuguard_jit),
            "gpu_hours_saved_per_day_local": saved(self.gpuguard_local),
            "gpu_hours_saved_per_day_jit_local": saved(self.gpuguard_jit_local),
            "tiers": self.tiers(),
            "per_failure": per_failure(self.inputs),
            "monte_carlo": [c.to_dict() for c in self.checks],
            "monte_carlo_best": [c.to_dict() for c in self.best_checks],
        }


def per_failure(inputs: GoodputInputs) -> list[dict[str, Any]]:
    """Per kind of failure and policy, what one failure costs: the save after it, the training lost
    (about half an interval plus the durable lag on a roll back; with a local tier, that of the local tier
    when the node survives and of object storage when it does not, weighed by their shares), and the
    downtime (restart, reschedule unless a restart in place clears it, restore; with a local tier a roll back
    whose node survives restores from it)."""
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
            down = inputs.restart_s + (1 - inplace) * inputs.reschedule_s + restore
            if policy.local_tier and not saved:
                down += policy.local_share * (inputs.local_restore - restore)
            save = (policy.emergency_s if kind == "detectable" else policy.jit_s) if saved else 0.0
            replay = policy.jit_replay_s if saved and kind != "detectable" else 0.0
            rows.append(
                {
                    "policy": policy.name,
                    "kind": kind,
                    "share": round(share, 6),
                    "saved": saved,
                    "save_s": round(save, 3),
                    "training_lost_s": round(replay if saved else _rolled_back_loss(policy), 3),
                    "downtime_s": round(down, 3),
                }
            )
    return rows


def _rolled_back_loss(policy: Policy) -> float:
    local = policy.interval_s / 2 + policy.durable_lag_s
    if not policy.local_tier:
        return local
    remote = policy.object_every * (policy.interval_s + policy.stall_s) / 2 + policy.object_lag
    return policy.local_share * local + (1 - policy.local_share) * remote


def compare(inputs: GoodputInputs, *, check: bool = False, failures: int = 200_000, seed: int = 0) -> Report:
    """Periodic checkpoints alone, gpuguard, gpuguard with just-in-time saves, and both with a local tier,
    for one job; ``check`` adds the Monte Carlo runs, at the given interval and at each policy's best."""
    policies = inputs.policies()
    checks: tuple[Check, ...] = ()
    best_checks: tuple[Check, ...] = ()
    if check:
        checks = tuple(monte_carlo(p, failures=failures, seed=seed + i) for i, p in enumerate(policies))
        best = [best_setting(p)[0] for p in policies]
        best_checks = tuple(monte_carlo(p, failures=failures, seed=seed + 100 + i) for i, p in enumerate(best))
    periodic, guarded, jit, local, jit_local = (outcome(p) for p in policies)
    return Report(inputs, periodic, guarded, jit, local, jit_local, checks=checks, best_checks=best_checks)


__all__ = [
    "DAY_S",
    "DGX_H200_SHM_GIB",
    "FAILURE_SOURCES",
    "H200_PARALLEL_WRITE_S_PER_GIB",
    "H200_PINNED_COPY_S_PER_GIB",
    "H200_SHM_WRITE_S_PER_GIB",
    "H200_TORCH_LOAD_S_PER_GIB",
    "H200_TORCH_SAVE_S_PER_GIB",
    "LLAMA3_INPLACE_SHARE",
    "MIN_LOCAL_CHECKPOINTS",
    "Check",
    "GoodputInputs",
    "Outcome",
    "Policy",
    "Report",
    "best_interval",
    "best_setting",
    "compare",
    "expected_cycle",
    "goodput",
    "monte_carlo",
    "outcome",
    "per_failure",
]
