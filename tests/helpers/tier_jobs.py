"""What real gloo ranks do in the local-tier tests: train under a `Guard` with a node-local tier, lose or
corrupt part of it, resume.

Each rank's model holds ``100 x step + rank`` in every weight after ``step``, so a rank that resumes another
step, or another rank's part, shows it. Each rank gets its own ``local_dir`` (``<root>/node<rank>``), as if
every rank ran on its own node: nothing of one rank's local tier is visible to another.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import gpuguard
from gpuguard.fakenvml import FakeNvml
from helpers.snapshot_reads import Counted, LiveReads, live_pointers


def settings(root: str, replicated: bool = False) -> dict[str, Any]:
    return {
        "replicated": replicated,
        "nvml": FakeNvml.from_scenario({"gpus": 1, "events": []}),
        "devices": "all",
        "sync_every": 2,
        "checkpoint_every_steps": 2,
        "checkpoint_every_s": 0,
        "keep": 10,
        "local_dir": f"{root}/node{dist.get_rank()}",
        "object_store_every": 3,
        "sudden_loss": False,
    }


def model() -> torch.nn.Linear:
    return torch.nn.Linear(4, 4)


def train(out: Path, root: str, steps: int, tag: str, poison_at: int | None = None, replicated: bool = False) -> None:
    """Periodic checkpoints at 2, 4, 6, ...: every one in each rank's local tier, 2, 8, 14, ... in object storage.
    With ``replicated`` (data parallel: every rank holds the same state) the weights hold ``100 x step``."""
    rank = 0 if replicated else dist.get_rank()
    net = model()
    with gpuguard.Guard(f"file://{root}/object", {"model": net}, **settings(root, replicated)) as guard:
        for step in range(guard.resume(), steps):
            with torch.no_grad():
                net.weight.fill_(float(100 * step + rank))
                if step == poison_at and rank == dist.get_world_size() - 1:
                    net.weight[0, 0] = float("nan")  # a diverged step: perfect checksums, NaN values
            guard.step(step)
    _write(out, tag, {})


def lose(out: Path, root: str, ranks: list[int], tag: str) -> None:
    """The pod moved: these ranks' local tiers are gone."""
    if dist.get_rank() in ranks:
        shutil.rmtree(f"{root}/node{dist.get_rank()}")
    _write(out, tag, {})


def corrupt(out: Path, root: str, step: int, rank: int, tag: str, tier: str = "local") -> None:
    """Flip one byte in the middle of ``rank``'s copy of ``step`` (its tensor file) in ``tier``."""
    if dist.get_rank() == rank:
        if tier == "local":
            pattern = f"node{rank}/job-*/world-*/rank-{rank}/step-{step:012d}-*/*.safetensors"
        else:
            pattern = f"object/step-{step:012d}-*/rank-{rank:05d}-of-*.safetensors"
        shards = list(Path(root).glob(pattern))
        assert len(shards) == 1, shards
        data = bytearray(shards[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        shards[0].write_bytes(bytes(data))
    _write(out, tag, {})


def resume(out: Path, root: str, tag: str, replicated: bool = False) -> None:
    """``Guard.resume()`` on every rank: the step, this rank's weight, the tier it read, what it logged."""
    captured = _Captured()
    logging.getLogger("gpuguard").addHandler(captured)
    net = model()
    report: dict[str, Any] = {}
    with gpuguard.Guard(f"file://{root}/object", {"model": net}, **settings(root, replicated)) as guard:
        report["next"] = guard.resume()
        report["tier"] = guard.restored_tier
    report["w"] = float(net.weight.detach()[0, 1])
    logging.getLogger("gpuguard").removeHandler(captured)
    report["log"] = captured.lines
    _write(out, tag, report)


def unusable(out: Path, root: str, tag: str) -> None:
    """The last rank's local_dir cannot be created (a file is in the way): the tier is off on every rank, and
    every periodic checkpoint goes to object storage on every rank (a rank deciding alone would hang the job)."""
    rank = dist.get_rank()
    Path(root).mkdir(parents=True, exist_ok=True)
    if rank == dist.get_world_size() - 1:
        Path(f"{root}/node{rank}").write_text("not a folder")
    dist.barrier()
    captured = _Captured()
    logging.getLogger("gpuguard").addHandler(captured)
    net = model()
    with gpuguard.Guard(f"file://{root}/object", {"model": net}, **settings(root)) as guard:
        report: dict[str, Any] = {"local_on": guard.local is not None}
        for step in range(guard.resume(), 7):
            guard.step(step)
    logging.getLogger("gpuguard").removeHandler(captured)
    report["log"] = [line for line in captured.lines if "local tier" in line]
    report["object"] = [info.step for info in gpuguard.CheckpointStore(f"file://{root}/object").list()]
    _write(out, tag, report)


def one_snapshot(out: Path, root: str, tag: str, replicated: bool = False) -> None:
    """Every periodic save (2, 4, 6) to both tiers, counted on each rank: ``state_dict()`` calls and the staging
    copies that read the live state, by thread. The loop writes NaN into the live tensors as soon as each
    ``guard.step()`` returns; then each rank loads step 6 back from each tier (object storage: a collective)."""
    rank = 0 if replicated else dist.get_rank()
    net, counted = model(), Counted()
    state = {"model": net, "counted": counted}
    calls = 0
    with LiveReads(live_pointers(state)) as live:
        options = settings(root, replicated) | {"object_store_every": 1, "overlap_snapshot": False}
        with gpuguard.Guard(f"file://{root}/object", state, **options) as guard:
            for step in range(guard.resume(), 7):
                with torch.no_grad():
                    net.weight.fill_(float(100 * step + rank))
                    counted.value.fill_(float(step))
                before = counted.calls
                guard.step(step)
                calls += counted.calls - before if step in (2, 4, 6) else 0
                with torch.no_grad():
                    net.weight.fill_(float("nan"))
                    counted.value.fill_(float("nan"))
    report: dict[str, Any] = {"calls": calls, "reads": sorted(set(live.per_tensor().values()))}
    report |= {"threads": sorted(live.threads()), "tier_copies": live.other["gpuguard-ckpt-tier-copy"]}
    (local,) = Path(f"{root}/node{dist.get_rank()}").glob(f"job-*/world-{dist.get_world_size()}/rank-{dist.get_rank()}")
    for tier, store, options in (
        ("object", gpuguard.CheckpointStore(f"file://{root}/object"), {"rank": dist.get_rank()}),
        ("local", gpuguard.CheckpointStore(str(local)), {"no_dist": True, "world_size": 1}),
    ):
        loaded = {"model": model(), "counted": Counted()}
        step = store.load(loaded, **options)
        report[tier] = [step, float(loaded["model"].weight.detach()[0, 1]), float(loaded["counted"].value[3])]
    _write(out, tag, report)


def _fsdp() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    fully_shard(net, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2)


def _fsdp_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    torch.manual_seed(100 + step)  # the same batch for the same step, in every run
    net(torch.randn(4, 8)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _pieces(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's pieces of the parameters and of the optimizer's moments."""
    out = {f"p.{n}": p.to_local().detach().clone() for n, p in net.named_parameters()}
    for i, p in enumerate(net.parameters()):
        for k, v in optimizer.state[p].items():
            out[f"o.{i}.{k}"] = (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
    return out


def sharded(out: Path, root: str, tag: str) -> None:
    """FSDP2 (DTensors) with the local tier: every rank keeps its own pieces and restores them from its tier
    exactly (training on from there gives bitwise the uninterrupted run); a state of another layout does not
    take the local pieces (it loads the same job's object-storage checkpoint, resharded)."""
    captured = _Captured()
    logging.getLogger("gpuguard").addHandler(captured)
    net, optimizer = _fsdp()
    kept: dict[int, dict[str, torch.Tensor]] = {}
    with gpuguard.Guard(f"file://{root}/object", {"model": net, "optimizer": optimizer}, **settings(root)) as guard:
        report: dict[str, Any] = {"local_on": guard.local is not None}
        for step in range(guard.resume(), 6):  # periodic at 2 (both tiers) and 4 (local)
            _fsdp_step(net, optimizer, step)
            kept[step] = _pieces(net, optimizer)
            if step == 2:  # the whole parameters (a collective), for the object-storage copy read back resharded
                full = {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()}
            guard.step(step)
    net, optimizer = _fsdp()
    with gpuguard.Guard(f"file://{root}/object", {"model": net, "optimizer": optimizer}, **settings(root)) as guard:
        report["next"], report["tier"] = guard.resume(), guard.restored_tier
        got = _pieces(net, optimizer)
        report["restored_equal"] = sorted(got) == sorted(kept[4]) and all(torch.equal(got[k], kept[4][k]) for k in got)
        _fsdp_step(net, optimizer, 5)
        got = _pieces(net, optimizer)
        report["trained_on_equal"] = all(torch.equal(got[k], kept[5][k]) for k in got)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))  # another layout: no DTensors
    with gpuguard.Guard(f"file://{root}/object", {"model": plain}, **settings(root)) as guard:
        report["plain_next"], report["plain_tier"] = guard.resume(), guard.restored_tier
    report["plain_equal"] = all(torch.equal(p.detach(), full[n]) for n, p in plain.named_parameters())
    logging.getLogger("gpuguard").removeHandler(captured)
    report["log"] = [line for line in captured.lines if "tier" in line]
    report["object"] = [info.step for info in gpuguard.CheckpointStore(f"file://{root}/object").list()]
    _write(out, tag, report)


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _write(out: Path, tag: str, report: dict[str, Any]) -> None:
    (out / f"{tag}-rank{dist.get_rank()}.json").write_text(json.dumps(report))


ACTIONS = {
    "one_snapshot": one_snapshot,
    "train": train,
    "lose": lose,
    "corrupt": corrupt,
    "resume": resume,
    "sharded": sharded,
    "unusable": unusable,
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
            (folder / f"took-{args['tag']}-rank{rank}.txt").write_text(f"{time.perf_counter() - started:.2f}")
    except BaseException:
        (folder / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    dist.destroy_process_group()
