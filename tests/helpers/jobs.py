"""What real gloo ranks do in the multi-rank checkpoint tests: save, commit, resume, die; train as users do.

Each rank runs a plan of actions (`ACTIONS`); what the tests compare lands in ``out``: one JSON per rank
(``<tag>-rank<r>.json``) and, for the GPT actions, the global state as safetensors (rank 0, gathered from
every rank).

Agreement actions use per-rank values (``w`` = 100 × step + rank), so a rank that loads another step, or
another rank's part, shows it. GPT actions (`gpt`) train as users do:

- ``guarded``: train under a `Guard` with periodic checkpoints, leave through an emergency checkpoint
  (one rank asks for an evacuation), then resume into a freshly built model and train to the end;
- ``reference``: the same steps with no guard and no interruption;
- ``save``: train, save with `CheckpointStore` on every rank, dump the state, train on and dump again;
- ``load``: build the layout with other values, load, dump; train on and dump again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import gpuguard
from gpuguard import CheckpointStore, RetryPolicy
from gpuguard.fakenvml import FakeNvml
from helpers import gpt

QUICK = RetryPolicy(deadline_s=2.0, attempt_timeout_s=1.0)


def checkpoint_id(step: int, token: str = "a11ce") -> str:
    return f"step-{step:012d}-{token:0<8}"


def values(step: int, rank: int) -> dict[str, Any]:
    return {"w": torch.full((4096,), float(100 * step + rank)), "step": step}


def _save(store: CheckpointStore, step: int, token: str = "a11ce", **kwargs: Any) -> Any:
    rank, world = dist.get_rank(), dist.get_world_size()
    return store.save(
        values(step, rank), step, rank=rank, world_size=world, checkpoint_id=checkpoint_id(step, token), **kwargs
    )


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"value": fn()}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def save_steps(out: Path, url: str, steps: list[int], tag: str) -> None:
    """Save each step on every rank and wait for it (committed on every rank)."""
    with CheckpointStore(url, keep=100) as store:
        committed = [_save(store, step).wait(60).id for step in steps]
    _write(out, tag, {"committed": committed})


def resume(out: Path, url: str, tag: str) -> None:
    """``Guard.resume()`` and ``CheckpointStore.load`` on every rank: which step each got, and what it logged."""
    rank = dist.get_rank()
    captured = _Captured()
    logging.getLogger("gpuguard").addHandler(captured)
    report: dict[str, Any] = {}
    state: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
    nvml = FakeNvml.from_scenario({"gpus": 1, "events": []})
    with gpuguard.Guard(url, state, nvml=nvml, devices="all", checkpoint_every_s=0) as guard:
        report["guard"] = _outcome(guard.resume)
    report["guard_w"] = float(state["w"][0])
    with CheckpointStore(url) as store:
        target: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
        report["load"] = _outcome(lambda: store.load(target, rank=rank, fallback=True))
        report["load_w"] = float(target["w"][0])
        report["load_newest"] = _outcome(lambda: store.load({"w": torch.zeros(4096), "step": -1}, rank=rank))
    logging.getLogger("gpuguard").removeHandler(captured)
    report["log"] = captured.lines
    _write(out, tag, report)


def _linear(step: int, rank: int, poisoned: bool) -> torch.nn.Linear:
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(float(100 * step + rank))
        model.bias.zero_()
        if poisoned:
            model.weight[0, 0] = float("nan")  # a diverged step: perfect checksums, NaN values
    return model


def nan_saved(out: Path, url: str, steps: list[int], poisoned_rank: int, tag: str) -> None:
    """Save ``steps`` on every rank (a Linear each); at the last step only ``poisoned_rank``'s holds a NaN."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with CheckpointStore(url, keep=100) as store:
        for step in steps:
            model = _linear(step, rank, rank == poisoned_rank and step == steps[-1])
            store.save({"model": model}, step, rank=rank, world_size=world, checkpoint_id=checkpoint_id(step)).wait(60)
    _write(out, tag, {})


def nan_resume(out: Path, url: str, tag: str) -> None:
    """``Guard.resume()`` on every rank after ``nan_saved``: the step each got, its weight, what it logged."""
    captured = _Captured()
    logging.getLogger("gpuguard").addHandler(captured)
    model = torch.nn.Linear(4, 4)
    nvml = FakeNvml.from_scenario({"gpus": 1, "events": []})
    with gpuguard.Guard(url, {"model": model}, nvml=nvml, devices="all", checkpoint_every_s=0) as guard:
        report = {"guard": _outcome(guard.resume), "w": float(model.weight[0, 1])}
    logging.getLogger("gpuguard").removeHandler(captured)
    report["log"] = captured.lines
    _write(out, tag, report)


def wait_then_load(out: Path, url: str, trials: int, tag: str) -> None:
    """Save step 1, save step 2, wait on both, load: every rank must get step 2 (its own part)."""
    rank = dist.get_rank()
    got = []
    with CheckpointStore(url, keep=100) as store:
        for trial in range(trials):
            first, second = 10 * trial + 1, 10 * trial + 2
            pendings = [_save(store, first), _save(store, second)]
            waited = [p.wait(60).step for p in pendings]
            target: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
            step = store.load(target, rank=rank)
            got.append({"waited": waited, "loaded": step, "w": float(target["w"][0])})
    _write(out, tag, {"trials": got})


def reuse(out: Path, url: str, tag: str) -> None:
    """A second save under a committed id is refused on every rank; the committed one is untouched."""
    rank = dist.get_rank()
    with CheckpointStore(url, keep=100) as store:
        first = _save(store, 5, token="5a5e").wait(60)
        again = store.save(
            values(6, rank) | {"step": 5},
            5,
            rank=rank,
            world_size=dist.get_world_size(),
            checkpoint_id=checkpoint_id(5, "5a5e"),
        )
        report = {"first": first.id, "again": _outcome(lambda: again.wait(60).id)}
        target: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
        report["loaded"] = store.load(target, rank=rank)
        report["w"] = float(target["w"][0])
    _write(out, tag, report)


def committer_dies(out: Path, url: str, step: int, tag: str) -> None:
    """Rank 0 is killed right after its save returns; the other ranks' ``wait()`` must not report success."""
    rank = dist.get_rank()
    with CheckpointStore(url, retry=QUICK) as store:
        pending = _save(store, step, token="dead", commit_timeout_s=1.0)
        if rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        started = time.monotonic()
        report = _outcome(lambda: pending.wait(60).id)
        report["waited_s"] = time.monotonic() - started
        _write(out, tag, report)
    os._exit(0)  # the group lost a rank: no teardown collective


def retry_after_crash(out: Path, url: str, step: int, tag: str) -> None:
    """The crashed save's id again, in a new launch with new values: committed whole, this launch's files only."""
    rank = dist.get_rank()
    with CheckpointStore(url) as store:
        info = _save(store, step, token="dead", commit_timeout_s=30).wait(60)
        report = {"committed": info.id, "verify_ok": store.verify(info.id).ok if rank == 0 else None}
        target: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
        report["loaded"] = store.load(target, rank=rank)
        report["w"] = float(target["w"][0])
    _write(out, tag, report)


def slow_committer(out: Path, url: str, delay_s: float, tag: str) -> None:
    """Rank 0 starts its commit ``delay_s`` late: the other ranks' ``wait()`` returns only once the manifest is there."""
    rank = dist.get_rank()
    folder = Path(url.removeprefix("file://")) / checkpoint_id(7, "510e")
    with CheckpointStore(url) as store:
        if rank == 0:  # this process's committer only: the other ranks run the library as it is
            gather = store._committer.gather

            def late(*args: Any, **kwargs: Any) -> Any:
                time.sleep(delay_s)
                return gather(*args, **kwargs)

            store._committer.gather = late  # type: ignore[method-assign]
        info = _save(store, 7, token="510e").wait(60)
        report = {"committed": info.id, "manifest_there": (folder / "MANIFEST.json").exists()}
    _write(out, tag, report)


def _until(done: Any, what: str) -> None:
    limit = time.monotonic() + 120  # a guard against hangs, not a timing: each wait is on an event
    while not done():
        assert time.monotonic() < limit, f"never: {what}"
        time.sleep(0.01)


def abandon(out: Path, url: str, tag: str) -> None:
    """``abandon()`` on one rank of a multi-rank save: when it says the save will not commit, no rank commits it.

    - ``posted``: the last rank abandons after its record is out, the committing rank starts its commit only
      then: ``abandon()`` says the commit has begun (False), and every rank's ``wait()`` gives the checkpoint;
    - ``held``: the last rank abandons while its writer is held before its files: True, and the committing
      rank, which did not abandon, never commits (its wait for the record times out);
    - ``committer``: rank 0 abandons once its own record is out, before its commit: True; the others' ``wait()`` raises (the failure
      note), and their ``abandon()`` afterwards says the commit had begun there (their record was out).

    Afterwards every rank loads the newest committed step, the ``posted`` one.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    last = world - 1
    root = Path(url.removeprefix("file://"))
    go = out / f"{tag}-go"
    report: dict[str, Any] = {}
    with CheckpointStore(url, keep=100) as store:
        _save(store, 1).wait(60)
        gather = store._committer.gather

        def after_go(*args: Any, **kwargs: Any) -> Any:  # rank 0's commit starts once the test says go
            _until(go.exists, "go")
            return gather(*args, **kwargs)

        # posted
        if rank == 0:
            store._committer.gather = after_go  # type: ignore[method-assign]
        pending = _save(store, 2)
        if rank == last:
            record = root / checkpoint_id(2) / f"rank-{last:05d}-of-{world:05d}.done.json"
            _until(record.exists, "the record")
            report["posted_abandon"] = pending.abandon()
            go.touch()
        report["posted"] = _outcome(lambda: pending.wait(60).id)
        store._committer.gather = gather  # type: ignore[method-assign]
        dist.barrier()
        go.unlink(missing_ok=True)
        dist.barrier()
        # held
        write_files, release = store._saver._write_files, threading.Event()

        def held(*args: Any, **kwargs: Any) -> Any:
            release.wait(120)
            return write_files(*args, **kwargs)

        if rank == last:
            store._saver._write_files = held  # type: ignore[method-assign]
        pending = _save(store, 3, commit_timeout_s=1.0)
        if rank == last:
            report["held_abandon"] = pending.abandon()
            release.set()
        report["held"] = _outcome(lambda: pending.wait(60).id)
        store._saver._write_files = write_files  # type: ignore[method-assign]
        dist.barrier()
        # committer
        if rank == 0:
            store._committer.gather = after_go  # type: ignore[method-assign]
        pending = _save(store, 4)
        if rank == 0:
            _until((root / checkpoint_id(4) / f"rank-00000-of-{world:05d}.done.json").exists, "rank 0's record")
            report["committer_abandon"] = pending.abandon()
            go.touch()
        report["committer"] = _outcome(lambda: pending.wait(60).id)
        if rank != 0:
            report["committer_abandon"] = pending.abandon()
        store._committer.gather = gather  # type: ignore[method-assign]
        dist.barrier()
        report["manifests"] = sorted(p.parent.name for p in root.glob("*/MANIFEST.json"))
        target: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
        report["loaded"] = store.load(target, rank=rank)
        report["w"] = float(target["w"][0])
    _write(out, tag, report)


def prepare_small(out: Path, url: str, tag: str) -> None:
    """A DTensor of one element over every rank: the ranks past 0 hold only an empty piece of it.

    ``prepare`` (what the Guard runs at its first step) agrees with the other ranks on who writes
    what whether or not this rank's pieces are empty; then a save and a load on every rank.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    state = {"tiny": distribute_tensor(torch.tensor([42.0]), mesh, [Shard(0)]), "w": values(3, rank)["w"]}
    with CheckpointStore(url) as store:
        store.prepare(state)
        info = store.save(state, 3, rank=rank, world_size=world, checkpoint_id=checkpoint_id(3, "71ce")).wait(60)
        target = {"tiny": distribute_tensor(torch.zeros(1), mesh, [Shard(0)]), "w": torch.zeros(4096)}
        step = store.load(target, rank=rank)
        report = {
            "committed": info.id,
            "loaded": step,
            "local_numel": target["tiny"].to_local().numel(),
            "tiny": target["tiny"].full_tensor().tolist(),
            "w": float(target["w"][0]),
        }
    _write(out, tag, report)


def corrupt(out: Path, url: str, parts: list[list[Any]], tag: str) -> None:
    """Rank 0 flips one byte in the middle of each (checkpoint id, rank) part's tensor file."""
    if dist.get_rank() != 0:
        return
    world = dist.get_world_size()
    root = Path(url.removeprefix("file://"))
    for checkpoint, rank in parts:
        shard = root / checkpoint / f"rank-{rank:05d}-of-{world:05d}.safetensors"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))


# -- training a GPT as users do ---------------------------------------------------------------------

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


class _Sampler:
    """A stateful sampler with its own generator (as a data loader's sampler holds one): per rank."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _per_rank_state(rank: int) -> dict[str, Any]:
    """A data-parallel replica's state: the model and optimizer alike on every rank; a generator, a tensor
    and a data loader's position that are each rank's own."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "gen": _Sampler(100 + rank),
        "ema": torch.full((4096,), float(rank)),  # as large as the model's weight: the split would move it
        "loader": {"position": 10 * rank},
    }


def _digest(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "gen": hashlib.sha256(state["gen"].generator.get_state().numpy().tobytes()).hexdigest(),
        "ema": float(state["ema"].sum()),
        "loader": state["loader"]["position"],
        "weight": float(state["model"].weight.detach().double().sum()),
    }


def per_rank_entries(out: Path, url: str, tag: str) -> None:
    """A replicated guard (``replicated=True``) keeps each rank's per-rank entries: after `Guard.resume`,
    and after a plain `CheckpointStore.load`, every rank has its own sampler's generator, tensor and loader
    position back, and the model is the replicated one."""
    rank = dist.get_rank()
    state = _per_rank_state(rank)
    nvml = FakeNvml.from_scenario({"gpus": 1, "events": []})
    settings: dict[str, Any] = {"checkpoint_every_steps": 2, "checkpoint_every_s": 0, "replicated": True}
    at: dict[int, dict[str, Any]] = {}
    with gpuguard.Guard(url, state, nvml=nvml, devices="all", **settings) as guard:
        for step in range(guard.resume(), 5):
            data = torch.randn(4, 64, generator=state["gen"].generator)  # each rank draws its own batch
            state["model"](data).sum().backward()
            for parameter in state["model"].parameters():  # data parallelism: the replicas stay alike (as DDP)
                dist.all_reduce(parameter.grad)
            state["optimizer"].step()
            state["optimizer"].zero_grad()
            state["ema"].add_(1.0)
            state["loader"]["position"] += 4
            at[step] = _digest(state)
            guard.step(step)
    with CheckpointStore(url) as store:
        latest = store.latest()
    assert latest is not None
    layout = json.loads((Path(url) / latest.id / "MANIFEST.json").read_text())["layout"]

    def spoil() -> None:
        torch.randn(64, generator=state["gen"].generator)
        state["ema"].fill_(-1.0)
        state["loader"]["position"] = -1
        with torch.no_grad():
            state["model"].weight.add_(1.0)

    spoil()
    with gpuguard.Guard(url, state, nvml=nvml, devices="all", **settings) as guard:
        resumed_at = guard.resume()
    resumed = _digest(state)
    spoil()
    view = {k: v for k, v in state.items() if k != "loader"}  # a plain dict is the guard's to load in place
    with CheckpointStore(url) as store:
        store.load(view, rank=rank, strict=False)
    loaded = {k: v for k, v in _digest(state).items() if k != "loader"}
    saved = at[latest.step]
    _write(
        out,
        tag,
        {"layout": layout, "step": latest.step, "saved": saved, "resumed": resumed, "resumed_at": resumed_at}
        | {"loaded": loaded, "saved_no_loader": {k: v for k, v in saved.items() if k != "loader"}},
    )


def _write(out: Path, tag: str, report: dict[str, Any]) -> None:
    (out / f"{tag}-rank{dist.get_rank()}.json").write_text(json.dumps(report))


ACTIONS = {
    "corrupt": corrupt,
    "guarded": guarded,
    "reference": reference,
    "save": save,
    "load": load,
    "save_steps": save_steps,
    "resume": resume,
    "nan_saved": nan_saved,
    "nan_resume": nan_resume,
    "wait_then_load": wait_then_load,
    "reuse": reuse,
    "committer_dies": committer_dies,
    "retry_after_crash": retry_after_crash,
    "slow_committer": slow_committer,
    "prepare_small": prepare_small,
    "abandon": abandon,
    "per_rank_entries": per_rank_entries,
}


def worker(rank: int, world: int, port: int, plan: list[dict[str, Any]], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    folder = Path(out)
    try:
        for action in plan:
            started = time.perf_counter()
            args = {k: v for k, v in action.items() if k != "action"}
            ACTIONS[action["action"]](folder, **args)
            dist.barrier()
            (folder / f"took-{action['action']}-{args.get('tag')}-rank{rank}.txt").write_text(
                f"{time.perf_counter() - started:.2f}"
            )
    except BaseException:
        (folder / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    dist.destroy_process_group()
