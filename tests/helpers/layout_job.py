"""Workers for the parallel-layout tests: the GPT of `gpt` trained, saved and loaded as users do, on gloo (CPU).

Each rank runs a plan of actions; what the tests compare lands in ``out``: the global state as
safetensors (rank 0, gathered from every rank) and a JSON per rank. Actions:

- ``guarded``: train under a `Guard` with periodic checkpoints, leave through an emergency checkpoint
  (one rank asks for an evacuation), then resume into a freshly built model and train to the end;
- ``reference``: the same steps with no guard and no interruption;
- ``save``: train, save with `CheckpointStore` on every rank, dump the state;
- ``load``: build the layout with other values, load, dump; train on and dump again.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import gpuguard
from gpuguard import CheckpointStore
from gpuguard.fakenvml import FakeNvml
from helpers import gpt

CHECKPOINT_ID = "step-{step:012d}-{tag:0<8}"


def _dump(out: Path, tag: str, state: dict[str, Any], info: dict[str, Any]) -> None:
    tensors = gpt.full_state(state)  # a collective
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        save_file(tensors, str(out / f"{tag}.safetensors"))
    (out / f"{tag}-rank{rank}.json").write_text(json.dumps(info))


def _checkpointed(state: dict[str, Any]) -> dict[str, Any]:
    return {"model": state["model"], "optimizer": state["optimizer"]}


def _perturbed(layout: str, tp: int, mixed_precision: bool = False, groups_reversed: bool = False) -> dict[str, Any]:
    """The layout's model after one step on other data: every value differs from what a load brings back."""
    state = gpt.build(layout, mixed_precision=mixed_precision, tp=tp, groups_reversed=groups_reversed)
    gpt.train_step(state, 10_000)
    return state


def guarded(
    out: Path, url: str, layout: str, tp: int, steps: int, evacuate_at: int, tag: str, mixed: bool = False
) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    info: dict[str, Any] = {"rank": rank}
    settings: dict[str, Any] = {
        "nvml": FakeNvml.from_scenario({"gpus": 1, "events": []}),
        "devices": "all",
        "sync_every": 4,
        "checkpoint_every_steps": 10,
        "checkpoint_every_s": 0,
        "commit_timeout_s": 120,
        "keep": 100,
    }
    state = gpt.build(layout, mixed_precision=mixed, tp=tp)
    try:
        with gpuguard.Guard(url, _checkpointed(state), **settings) as guard:
            info["first_start"] = guard.resume()
            for step in range(info["first_start"], steps):
                gpt.train_step(state, step)
                if step == evacuate_at and rank == world - 1:
                    guard.request_evacuation("the test asks the last rank to leave")
                guard.step(step)
    except gpuguard.Evacuation as evacuation:
        info["evacuated_at"] = evacuation.step
        info["emergency_error"] = guard.last_evacuation.error if guard.last_evacuation else "no report"
    state = _perturbed(layout, tp, mixed)
    with gpuguard.Guard(url, _checkpointed(state), **settings) as guard:
        info["resumed_at"] = start = guard.resume()
        for step in range(start, steps):
            gpt.train_step(state, step)
            guard.step(step)
    _dump(out, f"{tag}-guarded", state, info)


def reference(out: Path, layout: str, tp: int, steps: int, tag: str, mixed: bool = False) -> None:
    state = gpt.build(layout, mixed_precision=mixed, tp=tp)
    for step in range(steps):
        gpt.train_step(state, step)
    _dump(out, f"{tag}-reference", state, {})


def save(out: Path, url: str, layout: str, tp: int, steps: int, tag: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    state = gpt.build(layout, tp=tp)
    for step in range(steps):
        gpt.train_step(state, step)
    with CheckpointStore(url) as store:
        checkpoint_id = CHECKPOINT_ID.format(step=steps, tag=tag.encode().hex()[:8])
        store.save(_checkpointed(state), steps, rank=rank, world_size=world, checkpoint_id=checkpoint_id).wait(120)
    _dump(out, f"{tag}-saved", state, {})
    for step in range(steps, steps + 2):
        gpt.train_step(state, step)
    _dump(out, f"{tag}-after", state, {})


def load(out: Path, url: str, layout: str, tp: int, tag: str, groups_reversed: bool = False) -> None:
    rank = dist.get_rank()
    state = _perturbed(layout, tp, groups_reversed=groups_reversed)
    with CheckpointStore(url) as store:
        step = store.load(_checkpointed(state), rank=rank)
        info = {"step": step, "bytes_read": store.last_load_bytes_read}
    _dump(out, f"{tag}-loaded", state, info)
    for s in range(step, step + 2):
        gpt.train_step(state, s)
    _dump(out, f"{tag}-after", state, {})


def worker(rank: int, world: int, port: int, plan: list[dict[str, Any]], out: str) -> None:
    """Run ``plan`` (a list of actions with their arguments) on every rank of a gloo group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    folder = Path(out)
    try:
        for action in plan:
            started = time.perf_counter()
            kind = action["action"]
            args = {k: v for k, v in action.items() if k != "action"}
            {"guarded": guarded, "reference": reference, "save": save, "load": load}[kind](folder, **args)
            dist.barrier()
            if rank == 0:
                print(f"{kind} {args.get('tag')}: {time.perf_counter() - started:.1f}s", flush=True)
    except BaseException:
        (folder / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
