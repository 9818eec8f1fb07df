"""A job's inputs to the goodput model, each default with where it comes from, and the policies they
make (see `gpuguard.goodput`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from gpuguard.errors import ConfigError
from gpuguard.goodput._model import DAY_S, Policy, expected_cycle

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

# The local tier. Write bandwidth per node: the H200 host's write of the 6 GiB state to /dev/shm by one writer,
# 2.83 s (2.28 GB/s; tests/data/h200-checkpoint-baseline.json, shm_write_s). A node's ranks write their parts in
# parallel, so this single writer's figure is a floor for a node, not its peak: give yours with local_gbps.
H200_SHM_WRITE_S_PER_GIB: Final = 2.83 / 6
# Capacity per node: /dev/shm is a tmpfs, by default half the RAM (Linux, Documentation/filesystems/tmpfs.rst:
# "The default is half of your physical RAM without swap"); an NVIDIA DGX H200 has 2 TB of system memory
# (DGX H200 datasheet).
DGX_H200_SHM_GIB: Final = 2e12 / 2 / GIB
# One local checkpoint is being written while the previous complete one must stay: fewer than two do not fit.
MIN_LOCAL_CHECKPOINTS: Final = 2

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
    local_gbps: float | None = None  # per node
    local_capacity_gib: float | None = None  # per node
    max_local_share: float = 0.5
    object_store_every: int | None = None  # None: per policy, the best at interval_s the local bound allows
    node_loss_share: float | None = None  # None: 1 - inplace_share_sudden
    notes: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        whole = ("nodes", "gpus_per_node", "object_store_every")
        for name in whole:
            value = getattr(self, name)
            if name == "object_store_every" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, value, "must be a whole number, 1 or greater")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in (*whole, "failure_source", "notes") or value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f.name, value, "must be a finite number")
            positive = f.name in (
                "step_time_s",
                "state_gib",
                "interval_s",
                "failures_per_node_day",
                "storage_gbps",
                "local_gbps",
                "local_capacity_gib",
            )
            if f.name.endswith("_share"):
                continue  # checked below, with their range
            if (positive and value <= 0) or value < 0:
                raise ConfigError(f.name, value, "must be greater than 0" if positive else "must be 0 or greater")
        if self.failure_source not in FAILURE_SOURCES:
            raise ConfigError("failure_source", self.failure_source, "allowed: " + ", ".join(FAILURE_SOURCES))
        shares = ("detectable_share", "sudden_replicated_share", "inplace_share_detectable", "inplace_share_sudden")
        for name in (*shares, "node_loss_share"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(name, value, "must be from 0 to 1")
        for name in ("max_storage_share", "max_local_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(name, getattr(self, name), "must be greater than 0 and at most 1")
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
        if self.local_keep < MIN_LOCAL_CHECKPOINTS:
            raise ConfigError(
                "local_capacity_gib",
                self.local_capacity,
                f"must hold at least {MIN_LOCAL_CHECKPOINTS} local checkpoints of state_gib x gpus_per_node = "
                f"{self.state_gib * self.gpus_per_node:g} GiB (one being written, one complete), so at least "
                f"{MIN_LOCAL_CHECKPOINTS * self.state_gib * self.gpus_per_node:g} GiB",
            )
        most = self._most_local_per_object()
        if self.object_store_every is not None and self.object_store_every > most:
            raise ConfigError(
                "object_store_every",
                self.object_store_every,
                f"must be at most {most} with interval_s {self.interval_s:g}: more local checkpoints in one interval "
                f"than the local bandwidth allows (each node writes "
                f"{self.node_checkpoint_bytes / 1e9:.4g} GB in {self.local_write_s:.4g} s, "
                f"at most {self.max_local_share:g} of the local storage's time)",
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

    # The local tier, per node.
    @property
    def local_bytes_per_s(self) -> float:
        return self.local_gbps * 1e9 if self.local_gbps is not None else GIB / H200_SHM_WRITE_S_PER_GIB

    @property
    def node_checkpoint_bytes(self) -> float:
        return self.state_gib * GIB * self.gpus_per_node

    @property
    def local_write_s(self) -> float:
        """A node's part of one checkpoint over its local bandwidth: the local tier's durable lag."""
        return self.node_checkpoint_bytes / self.local_bytes_per_s

    @property
    def local_capacity(self) -> float:
        return _or(self.local_capacity_gib, DGX_H200_SHM_GIB)

    @property
    def local_keep(self) -> int:
        """How many checkpoints of a node's state fit in its local tier."""
        return math.floor(self.local_capacity / (self.state_gib * self.gpus_per_node) + 1e-9)

    @property
    def node_loss(self) -> float:
        """Of the failures that roll back, the share whose node goes with its local tier."""
        return _or(self.node_loss_share, 1 - self.inplace_share_sudden)

    @property
    def local_restore(self) -> float:
        """Reading a node's part back from its local tier: torch.load's H200 time, and no faster than the local
        write bandwidth (no local read figure is measured)."""
        return max(H200_TORCH_LOAD_S_PER_GIB * self.state_gib, self.local_write_s)

    def _local_floor(self) -> float:
        """The shortest local interval the local bandwidth allows."""
        return max(self.local_write_s, self.local_write_s / self.max_local_share - self.gpuguard_stall, 1.0)

    def _most_local_per_object(self) -> int:
        c = self.gpuguard_stall
        return max(1, math.floor((self.interval_s + c) / (self._local_floor() + c) + 1e-9))

    def _with_local_tier(self, base: Policy, name: str) -> Policy:
        """``base`` with a local tier, object storage's interval kept at ``interval_s``: every
        ``object_store_every``-th checkpoint to object storage, or the best such m the local bound allows."""
        c = self.gpuguard_stall
        tier = {
            "name": name,
            "local_tier": True,
            "durable_lag_s": self.local_write_s,
            # The object copy is written after the local one lands.
            "object_lag_s": self.local_write_s + self.gpuguard_durable - c,
            "local_share": 1 - self.node_loss,
            "local_write_s": self.local_write_s,
            "max_local_share": self.max_local_share,
            "local_bytes_per_node": self.node_checkpoint_bytes,
            # Its node survived: restored from its local tier instead of object storage.
            "local_downtime_s": base.downtime_s - self.gpuguard_restore + self.local_restore,
        }

        def every(m: int) -> Policy:
            return Policy(**{**asdict(base), **tier, "object_every": m, "interval_s": (self.interval_s + c) / m - c})

        if self.object_store_every is not None:
            return every(self.object_store_every)
        one = every(1)

        def value(m: int) -> float:
            kept, _, wall = expected_cycle(one, interval_s=(self.interval_s + c) / m - c, object_every=m)
            return kept / wall

        return every(max(range(1, self._most_local_per_object() + 1), key=value))

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

    def policies(self) -> tuple[Policy, Policy, Policy, Policy, Policy]:
        """Periodic checkpoints alone, gpuguard (emergency saves of detected failures), gpuguard with
        just-in-time saves of sudden failures that leave a replica, and those two with a local tier
        (object storage's interval kept at ``interval_s``, local checkpoints between)."""
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
            checkpoint_bytes=self.checkpoint_bytes,
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
            checkpoint_bytes=self.checkpoint_bytes,
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
        local = self._with_local_tier(guarded, "gpuguard + local tier")
        jit_local = self._with_local_tier(jit, "gpuguard + just-in-time + local tier")
        if self.detectable_share:  # periodic-only restarts detectable failures where their kind says
            p = self.detectable_share
            periodic = Policy(
                **{
                    **asdict(periodic),
                    "downtime_s": p * self._downtime(self.inplace_share_detectable, self.periodic_restore)
                    + (1 - p) * periodic.downtime_s,
                }
            )
        return periodic, guarded, jit, local, jit_local

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
            "local_bandwidth_per_node": f"{self.local_gbps:g} GB/s (given)"
            if self.local_gbps is not None
            else f"{self.local_bytes_per_s / 1e9:.4g} GB/s (H200 host: 6 GiB to /dev/shm by one writer in 2.83 s; a "
            "floor for a node whose ranks write in parallel)",
            "local_write_s": f"{self.local_write_s:.4g} (a node's {self.node_checkpoint_bytes / 1e9:.4g} GB)",
            "local_capacity_per_node": f"{self.local_capacity:.4g} GiB "
            + ("(given)" if self.local_capacity_gib is not None else "(/dev/shm: half of a DGX H200's 2 TB of RAM)")
            + f": {self.local_keep} checkpoints",
            "local_checkpoints_per_node": self.local_keep,
            "local_restore_s": f"{self.local_restore:.4g} (torch.load, {h200}, at least the local write: no local "
            "read figure measured)",
            "max_local_share": f"{self.max_local_share:g} (an assumption: the node's memory and cores also feed "
            "the data loader)",
            "node_loss_share": f"{self.node_loss:.4g} "
            + (
                "(given)"
                if self.node_loss_share is not None
                else "(1 - inplace_share_sudden: a failure a restart in place does not clear moves the job off "
                "its node and its local tier)"
            ),
            "object_store_every": f"{self.object_store_every} (given)"
            if self.object_store_every is not None
            else f"per policy, the best of 1-{self._most_local_per_object()} (the local bound) at this interval",
            "model": "Poisson failures while running; periodic saves every interval; a detected failure costs an "
            "emergency save and no training; a sudden one with a surviving replica (gpuguard + just-in-time) costs "
            "detection + the survivors' save + the steps replayed; any other rolls back to the newest durable "
            "checkpoint; every failure costs restart (+ reschedule unless a restart in place clears it) + restore; "
            "saves and restores are bounded by the aggregate storage bandwidth; with a local tier every checkpoint "
            "lands on node-local storage and every m-th also in object storage, and a roll back loses since the newest "
            "local checkpoint (and restores from it) if the node survives, else since the newest object-storage one; "
            "no false alarms, no failures during downtime or during a save",
        }


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
