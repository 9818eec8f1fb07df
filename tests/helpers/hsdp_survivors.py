"""The survivors' save of an HSDP state (2 x 2 replicate x shard mesh, gloo on CPU) without the dead rank.

Every rank trains two steps and dumps the global tensors (a collective, while all are alive); rank 1 then
mirrors its per-rank state to a file and leaves. The survivors (0, 2, 3) plan the save as the guard does
(`gpuguard.peers._plan.decide`) and write every rank's files — rank 1's by rank 3, the replica of its
shard — with no collective, as after a loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from gpuguard import CheckpointStore
from gpuguard.checkpoint._tree import RNG_KEY, FlatState, flatten
from gpuguard.peers._layout import replica_groups
from gpuguard.peers._plan import CheckIn, Plan, decide
from gpuguard.peers._records import StepRecord, capture

SHAPES = {"w": (7, 5), "b": (5,)}
STEP = 2
ID = "step-000000000002-5e7f1a2b"


def state(mesh: Any) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    module = torch.nn.Module()
    for name, shape in SHAPES.items():
        full = torch.randn(shape, generator=generator)
        local = full if mesh is None else distribute_tensor(full, mesh, [Replicate(), Shard(0)], src_data_rank=None)
        module.register_parameter(name, torch.nn.Parameter(local))
    return {"model": module, "optimizer": torch.optim.AdamW(module.parameters(), lr=0.01)}


def train(s: dict[str, Any], steps: int) -> None:
    for step in range(steps):
        torch.rand(())  # each rank draws from its own RNG, as dropout would: its RNG state is its own
        scale = float(torch.rand((), generator=torch.Generator().manual_seed(step)))  # replicas see the same data
        s["optimizer"].zero_grad()
        loss = (s["model"].w ** 2).sum() + s["model"].b.sum() * scale
        loss.backward()
        s["optimizer"].step()


def full(s: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.full_tensor() for k, v in s["model"].state_dict().items()}
    for index, per in s["optimizer"].state_dict()["state"].items():
        for key, value in per.items():
            out[f"optimizer.{index}.{key}"] = value.full_tensor() if isinstance(value, DTensor) else value.clone()
    return {k: v.contiguous() for k, v in out.items()}


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=4)
    folder = Path(out)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(100 + rank)
    s = state(mesh)
    train(s, STEP)
    expected = full(s)
    if rank == 0:
        save_file(expected, str(folder / "expected.safetensors"))
    record = capture(rank, STEP, {})
    (folder / f"record-{rank}.bin").write_bytes(record.to_bytes())
    (folder / f"rng-{rank}.pt").write_bytes(record.rng["torch"].numpy().tobytes())
    dist.barrier()
    if rank == 1:
        return  # lost: from here on it takes part in nothing
    flat = flatten(s, rng=False)
    groups = replica_groups(flat.tensors, 4, replicated=False)
    checkins = {r: CheckIn(r, STEP, STEP, (STEP,)) for r in (0, 2, 3)}
    plan = decide(checkins, 4, groups, {1: (STEP,)}, checkpoint_id=lambda step: ID, attempt="survivors-test")
    assert isinstance(plan, Plan), plan
    (folder / f"plan-{rank}.json").write_text(
        json.dumps({"groups": [list(g) for _, g in groups], "writers": plan.writers, "labels": [x for x, _ in groups]})
    )
    pendings = []
    with CheckpointStore(f"file://{folder / 'checkpoints'}") as store:
        for virtual in plan.assigned(rank):
            part = StepRecord.from_bytes((folder / f"record-{virtual}.bin").read_bytes()).checkpoint_part()
            tree = {**flat.tree, RNG_KEY: part.tree[RNG_KEY]}
            pendings.append(
                store._save_flat(
                    FlatState({**flat.tensors, **part.tensors}, tree, {**flat.devices, **part.devices}),
                    STEP,
                    reason="emergency",
                    rank=virtual,
                    world_size=4,
                    checkpoint_id=ID,
                    attempt=plan.attempt,
                    commit_timeout_s=120,
                )
            )
        for pending in pendings:
            pending.wait(180)
