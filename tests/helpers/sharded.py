"""Workers for the sharded-checkpoint tests: DTensor and FSDP2 training on gloo (CPU), one process per rank.

Each task runs in every rank (torch.multiprocessing spawn) and writes what the test compares: full
(global) tensors gathered on rank 0 as safetensors, and per-rank JSON (step loaded, bytes read).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from gpuguard import CheckpointStore

# Global shapes chosen uneven for 2 and 4 ranks on every sharded dim.
SHAPES = {"w0": (7, 5), "w1": (5, 9), "w2": (9,), "b": (3,), "big": (1024, 520)}


def placements() -> dict[str, list[Any]]:
    """Shard(0), Shard(1), Replicate, both mesh dims, several layouts at once (a 2-D mesh)."""
    return {
        "w0": [Shard(0), Shard(1)],
        "w1": [Shard(1), Replicate()],
        "w2": [Replicate(), Shard(0)],
        "b": [Replicate(), Replicate()],
        "big": [Shard(0), Shard(0)],  # 2.1 MB: large enough that a reshard reads a share, not all
    }


def global_init(seed: int = 1234) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


class DModel(torch.nn.Module):
    """Parameters as given (DTensors on a mesh, or plain tensors for the unsharded twin)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_parameter(name, torch.nn.Parameter(tensor))

    def loss(self, scale: float) -> torch.Tensor:
        w0, w1, w2, b, big = (getattr(self, n) for n in SHAPES)
        return (w0 * 0.5).sum() ** 2 * scale + (w1**2).sum() + (w2 * w2).mean() + b.sum() ** 2 + (big**2).mean()


def mesh_for(world_size: int) -> DeviceMesh:
    return init_device_mesh("cpu", (2, world_size // 2) if world_size > 1 else (1, 1), mesh_dim_names=("a", "b"))


def dstate(mesh: DeviceMesh | None, seed: int = 1234) -> dict[str, Any]:
    init = global_init(seed)
    if mesh is not None:
        init = {n: distribute_tensor(t, mesh, placements()[n], src_data_rank=None) for n, t in init.items()}
    model = DModel(init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    return {"model": model, "optimizer": optimizer}


def train(state: dict[str, Any], steps: int) -> None:
    for _ in range(steps):
        scale = float(torch.rand(()))  # from the RNG a checkpoint restores
        state["optimizer"].zero_grad()
        state["model"].loss(scale).backward()
        state["optimizer"].step()


def full_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the state as a global tensor (a collective: every rank calls it)."""
    out = {}
    for name, value in state["model"].state_dict().items():
        out[f"model.{name}"] = value.full_tensor() if isinstance(value, DTensor) else value.detach().clone()
    for index, per_param in state["optimizer"].state_dict()["state"].items():
        for key, value in per_param.items():
            full = value.full_tensor() if isinstance(value, DTensor) else value.detach().clone()
            out[f"optimizer.{index}.{key}"] = full
    return {k: v.contiguous() for k, v in out.items()}


def _dump(rank: int, out: Path, tag: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    if rank == 0:
        save_file(tensors, str(out / f"{tag}.safetensors"))
    (out / f"{tag}-rank{rank}.json").write_text(json.dumps(info))


def _fsdp_state(world_size: int) -> dict[str, Any]:
    """FSDP2: a small MLP with uneven widths, each Linear and the root sharded with fully_shard."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.GELU(), torch.nn.Linear(11, 3))
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.01)}


def _fsdp_train(state: dict[str, Any], steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(4, 6)
        state["optimizer"].zero_grad()
        state["model"](x).pow(2).mean().backward()
        state["optimizer"].step()


def _refusals(rank: int, folder: Path) -> None:
    """What cannot be placed on load is refused at save, before any byte is written."""
    from torch.distributed.tensor import Partial

    from gpuguard import UnsupportedStateError

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cases = {"partial": DTensor.from_local(torch.ones(4), mesh, [Partial()], run_check=False)}
    messages = {}
    for case, tensor in cases.items():
        with CheckpointStore(f"memory://refuse-{rank}-{case}") as store:
            try:
                store.save(
                    {"extras": {"t": tensor}},
                    1,
                    rank=rank,
                    world_size=dist.get_world_size(),
                    checkpoint_id="step-000000000001-0000aaaa",
                )
                messages[case] = "saved"
            except UnsupportedStateError as exc:
                messages[case] = str(exc)
            messages[case + "_files"] = str(store.storage.fs.find(store.storage.root))
    (folder / f"refuse-rank{rank}.json").write_text(json.dumps(messages))


def worker(
    rank: int, world_size: int, port: int, plan: list[tuple[str, str, str]], out: str, s3: dict[str, Any] | None = None
) -> None:
    """Run ``plan`` on every rank: (action, checkpoint URL, tag) steps, dumping what the tests compare.

    ``dsave``: DTensors on a 2-D mesh, train 3 steps, save (step 3), dump ``TAG-saved``, train 3, dump
    ``TAG-after``. ``dload``: differently initialised DTensors, load, dump ``TAG-loaded`` (with the step
    and bytes read per rank), train 3, dump ``TAG-after``. ``fsave``/``fload``: the same with FSDP2 and
    2 steps. ``s3`` holds the storage options for ``s3://`` URLs.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    folder = Path(out)
    try:
        for action, url, tag in plan:
            if action == "refuse":
                _refusals(rank, folder)
                continue
            with CheckpointStore(url, s3 if url.startswith("s3://") else None) as store:
                if action in ("dsave", "fsave"):
                    torch.manual_seed(7 if action == "dsave" else 7 + rank)  # TP: one batch; FSDP: data parallel
                    state = dstate(mesh_for(world_size)) if action == "dsave" else _fsdp_state(world_size)
                    run = train if action == "dsave" else _fsdp_train
                    run(state, 3)
                    step_id = f"step-{3:012d}-{tag.encode().hex()[:8]:0<8}"
                    store.save(state, 3, rank=rank, world_size=world_size, checkpoint_id=step_id).wait(300)
                    _dump(rank, folder, f"{tag}-saved", full_tensors(state), {})
                else:
                    state = dstate(mesh_for(world_size), seed=99) if action == "dload" else _fsdp_state(world_size)
                    run = train if action == "dload" else _fsdp_train
                    step = store.load(state, rank=rank)
                    info = {"step": step, "bytes_read": store.last_load_bytes_read}
                    _dump(rank, folder, f"{tag}-loaded", full_tensors(state), info)
                run(state, 3)
                _dump(rank, folder, f"{tag}-after", full_tensors(state), {})
            dist.barrier()
    finally:
        dist.destroy_process_group()
