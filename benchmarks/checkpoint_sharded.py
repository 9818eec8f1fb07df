"""Sharded checkpoints (FSDP2 on CPU, gloo): gpuguard against torch.distributed.checkpoint, same run.

    python benchmarks/checkpoint.py --sharded [--size-mib 256] [--repeats 3] [--model gpt|linear] [--json]
    python benchmarks/checkpoint_sharded.py [--size-mib 256] [--repeats 3] [--model gpt|linear] [--json]

A GPT-like model (``--model gpt``, the default: tied embeddings over an odd vocabulary, blocks of layer
norms, attention and a 4x MLP, so chunks of every size from a few hundred bytes to megabytes) or an
nn.Sequential of bias-free 1024x1024 Linear layers (``--model linear``), each block sharded with
``fully_shard`` over every rank, and AdamW's two moments after one step (``--size-mib`` in all). With 2
and then 4 processes:

- save: the training thread's stall (until ``save`` returns), time to durable (until the manifest is
  committed; the slowest rank), and bytes written per rank; then DCP's ``save`` and ``async_save``
  of the same state dict, to the same disk;
- resume on another world size (the 4-rank checkpoint on 2 ranks, the 2-rank one on 4): time and
  bytes read per rank by gpuguard (its ranged reads), and DCP's ``load`` time of the same state.

Each rank's share of the state is total / ranks; bytes read on a reshard should be close to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpuguard import CheckpointStore

WIDTH = 1024


class Block(torch.nn.Module):
    """A GPT block's parameters: layer norms, attention (qkv, projection) and the MLP (4x)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc, self.out = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v)
        return x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class Gpt(torch.nn.Module):
    """A GPT-like model with tied embeddings and an odd vocabulary (as GPT-2's 50257): chunks of every size
    from a few hundred bytes (layer norms) to megabytes, cut at rows that no block boundary lines up with."""

    def __init__(self, width: int, layers: int, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()


def build_state(size_mib: int, world_size: int, model_kind: str = "gpt") -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world_size,))
    model: torch.nn.Module
    if model_kind == "gpt":
        # GPT-2's width, 768: a block is 27 MiB of fp32 parameters (MLP matrices 9 MiB each), the
        # embedding 24 MiB; rows of 3 KiB, so no shard boundary falls on a 4 KiB page. With AdamW's two
        # moments, about size_mib in all.
        layers = max(1, round((size_mib * 2**20 / 3 - 8191 * 768 * 4) / (12 * 768 * 768 * 4)))
        model = Gpt(768, layers, 8191)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        batch = torch.randint(0, 8191, (2, 16))
    else:
        layers = max(1, round(size_mib * 2**20 / 3 / (WIDTH * WIDTH * 4)))
        model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        batch = torch.randn(2, WIDTH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(batch).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"model": model, "optimizer": optimizer}


def _dcp_state(state: dict[str, Any]) -> dict[str, Any]:
    return {"model": state["model"].state_dict(), "optimizer": state["optimizer"].state_dict()}


def _tree_bytes(folder: Path, rank: int) -> int:
    """Bytes DCP wrote for ``rank`` (its data files are named __<rank>_<n>.distcp)."""
    return sum(p.stat().st_size for p in folder.glob(f"__{rank}_*.distcp"))


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _timed(fn: Any) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()  # the slowest rank decides
    return time.perf_counter() - start


def _settle(seconds: float) -> None:
    """Start each measurement with no dirty data from the last one waiting to be flushed."""
    dist.barrier()
    os.sync()
    time.sleep(seconds)
    dist.barrier()


def _save_round(
    rank: int, world_size: int, state: dict[str, Any], base: Path, store: CheckpointStore, rep: int, settle: float
) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    out: dict[str, float] = {}
    name = f"step-{rep:012d}-{world_size:08x}"
    _settle(settle)
    start = time.perf_counter()
    pending = store.save(state, rep, rank=rank, world_size=world_size, checkpoint_id=name)
    out["gpuguard_stall_s"] = time.perf_counter() - start
    pending.wait(600)
    dist.barrier()  # rank 0's wait returns at the commit, after every rank's files are durable
    out["gpuguard_durable_s"] = time.perf_counter() - start
    shard = base / f"gpuguard-{world_size}" / name / f"rank-{rank:05d}-of-{world_size:05d}.safetensors"
    out["gpuguard_bytes_written"] = shard.stat().st_size
    folder = base / f"dcp-{world_size}-{rep}"
    _settle(settle)
    out["dcp_save_s"] = _timed(lambda: dcp.save(_dcp_state(state), checkpoint_id=str(folder)))
    out["dcp_bytes_written"] = _tree_bytes(folder, rank)
    _settle(settle)
    start = time.perf_counter()
    future = dcp.async_save(_dcp_state(state), checkpoint_id=str(base / f"dcp-{world_size}-async"))
    out["dcp_async_stall_s"] = time.perf_counter() - start
    future.result()
    _fsync_tree(base / f"dcp-{world_size}-async")
    dist.barrier()
    out["dcp_async_durable_s"] = time.perf_counter() - start
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)  # bound the disk used: only the last async save is loaded
    return out


def worker(
    rank: int,
    world_size: int,
    port: int,
    task: str,
    root: str,
    size_mib: int,
    source: int,
    repeats: int,
    model_kind: str = "gpt",
) -> None:
    import torch.distributed.checkpoint as dcp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    base = Path(root)
    result: dict[str, Any] = {"rank": rank, "rounds": []}
    settle = max(0.5, size_mib / 256)
    try:
        state = build_state(size_mib, world_size, model_kind)
        share = sum(p.to_local().numel() * 4 for p in state["model"].parameters()) * 3
        result["share_bytes"] = share
        if task == "save":
            with CheckpointStore(f"file://{base}/gpuguard-{world_size}", keep=1) as store:
                # As a guard does at its first step: the walk (and the agreement on who writes which chunk) on
                # the training thread, the allocation in the background; the staging buffer exists before the save.
                started = time.perf_counter()
                store.prepare(state, background=True)
                result["prepare_s"] = time.perf_counter() - started
                for rep in range(1, repeats + 1):
                    result["rounds"].append(_save_round(rank, world_size, state, base, store, rep, settle))
        else:
            for _ in range(repeats):
                out: dict[str, float] = {}
                _settle(settle)
                with CheckpointStore(f"file://{base}/gpuguard-{source}") as store:
                    out["gpuguard_load_s"] = _timed(lambda: store.load(state, rank=rank))
                    out["gpuguard_bytes_read"] = store.last_load_bytes_read
                sd = _dcp_state(state)
                _settle(settle)
                target = str(base / f"dcp-{source}-async")
                out["dcp_load_s"] = _timed(lambda sd=sd, target=target: dcp.load(sd, checkpoint_id=target))
                result["rounds"].append(out)
        (base / f"{task}-{world_size}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(size_mib: int, repeats: int, model_kind: str = "gpt") -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="gpuguard-sharded-bench-")
    try:
        plan = [("save", 2, 0), ("save", 4, 0), ("load", 2, 4), ("load", 4, 2)]
        for task, world_size, source in plan:
            print(f"{task} on {world_size} ranks", file=sys.stderr, flush=True)
            args = (world_size, _port(), task, root, size_mib, source, repeats, model_kind)
            mp.spawn(worker, args=args, nprocs=world_size)
        out: dict[str, Any] = {"size_mib": size_mib, "repeats": repeats, "model": model_kind}
        out |= {"torch": torch.__version__, "runs": []}
        for task, world_size, source in plan:
            ranks = [
                json.loads((Path(root) / f"{task}-{world_size}-rank{r}.json").read_text()) for r in range(world_size)
            ]
            out["runs"].append({"task": task, "world_size": world_size, "from_world_size": source, "ranks": ranks})
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _median_of_worst(ranks: list[dict[str, Any]], key: str) -> float:
    """Per round the slowest rank (what the job waits for), then the median over rounds."""
    worst = [max(r["rounds"][i][key] for r in ranks) for i in range(len(ranks[0]["rounds"]))]
    return statistics.median(worst)


def print_table(summary: dict[str, Any]) -> None:
    mib = 2**20
    print(
        f"FSDP2 state of {summary['size_mib']} MiB ({summary.get('model', 'linear')} model in fp32 + AdamW), CPU, "
        "gloo, one local disk, "
        f"torch {summary['torch']}; slowest rank, median of {summary['repeats']}"
    )
    print(f"{'run':<14}{'method':<22}{'stall (s)':>10}{'durable (s)':>12}   per rank")
    for run in summary["runs"]:
        ranks, ws = run["ranks"], run["world_size"]
        if run["task"] == "save":
            label = f"save on {ws}"
            written = ", ".join(f"{r['rounds'][-1]['gpuguard_bytes_written'] / mib:.1f}" for r in ranks)
            dcp_written = ", ".join(f"{r['rounds'][-1]['dcp_bytes_written'] / mib:.1f}" for r in ranks)
            share = ranks[0]["share_bytes"] / mib
            prepare = max(r.get("prepare_s", float("nan")) for r in ranks)
            print(f"{label:<14}{'prepare (once)':<22}{prepare:>10.3f}{'-':>12}   on the training thread")
            label = ""
            rows = [
                (
                    "gpuguard",
                    _median_of_worst(ranks, "gpuguard_stall_s"),
                    _median_of_worst(ranks, "gpuguard_durable_s"),
                    f"wrote {written} MiB (share {share:.1f})",
                ),
                (
                    "dcp.save",
                    _median_of_worst(ranks, "dcp_save_s"),
                    _median_of_worst(ranks, "dcp_save_s"),
                    f"wrote {dcp_written} MiB",
                ),
                (
                    "dcp.async_save",
                    _median_of_worst(ranks, "dcp_async_stall_s"),
                    _median_of_worst(ranks, "dcp_async_durable_s"),
                    "",
                ),
            ]
        else:
            label = f"resume {run['from_world_size']}->{ws}"
            read = ", ".join(f"{r['rounds'][-1]['gpuguard_bytes_read'] / mib:.1f}" for r in ranks)
            ratio = max(r["rounds"][-1]["gpuguard_bytes_read"] / r["share_bytes"] for r in ranks)
            rows = [
                (
                    "gpuguard load",
                    float("nan"),
                    _median_of_worst(ranks, "gpuguard_load_s"),
                    f"read {read} MiB (<= {ratio:.3f}x share)",
                ),
                ("dcp.load", float("nan"), _median_of_worst(ranks, "dcp_load_s"), ""),
            ]
        for method, stall, durable, note in rows:
            stall_text = "-" if math.isnan(stall) else f"{stall:.3f}"
            print(f"{label:<14}{method:<22}{stall_text:>10}{durable:>12.3f}   {note}")
            label = ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sharded", action="store_true", help="(accepted for benchmarks/checkpoint.py's spelling)")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--model",
        choices=["gpt", "linear"],
        default="gpt",
        help="gpt: a GPT-like model, chunks of every size; linear: 1024x1024 layers (default: gpt)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    summary = run(args.size_mib, args.repeats, args.model)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
