"""Sharded checkpoints (FSDP2 on CPU, gloo): gpuguard against torch.distributed.checkpoint, same run.

    python benchmarks/checkpoint.py --sharded [--size-mib 256] [--json]
    python benchmarks/checkpoint_sharded.py [--size-mib 256] [--json]

An nn.Sequential of bias-free Linear layers, each sharded with ``fully_shard`` over every rank, and
AdamW's two moments after one step (``--size-mib`` in all). With 2 and then 4 processes:

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
import os
import shutil
import socket
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


def build_state(size_mib: int, world_size: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = max(1, round(size_mib * 2**20 / 3 / (WIDTH * WIDTH * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, WIDTH)).sum().backward()
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


def worker(rank: int, world_size: int, port: int, task: str, root: str, size_mib: int, source: int) -> None:
    import torch.distributed.checkpoint as dcp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    base = Path(root)
    result: dict[str, Any] = {"rank": rank}
    try:
        state = build_state(size_mib, world_size)
        share = sum(p.to_local().numel() * 4 for p in state["model"].parameters()) * 3
        result["share_bytes"] = share
        if task == "save":
            url = f"file://{base}/gpuguard-{world_size}"
            with CheckpointStore(url, keep=5) as store:
                store.prepare(state)  # as a guard does at start: the staging buffer exists before the save
                name = f"step-{1:012d}-{world_size:08x}"
                dist.barrier()
                start = time.perf_counter()
                pending = store.save(state, 1, rank=rank, world_size=world_size, checkpoint_id=name)
                result["gpuguard_stall_s"] = time.perf_counter() - start
                pending.wait(600)
                dist.barrier()  # rank 0's wait returns at the commit, after every rank's files are durable
                result["gpuguard_durable_s"] = time.perf_counter() - start
                result["gpuguard_bytes_written"] = (
                    (base / f"gpuguard-{world_size}" / name)
                    .joinpath(f"rank-{rank:05d}-of-{world_size:05d}.safetensors")
                    .stat()
                    .st_size
                )
            folder = base / f"dcp-{world_size}"
            result["dcp_save_s"] = _timed(lambda: dcp.save(_dcp_state(state), checkpoint_id=str(folder)))
            result["dcp_bytes_written"] = _tree_bytes(folder, rank)
            dist.barrier()
            start = time.perf_counter()
            future = dcp.async_save(_dcp_state(state), checkpoint_id=str(folder) + "-async")
            result["dcp_async_stall_s"] = time.perf_counter() - start
            future.result()
            _fsync_tree(Path(str(folder) + "-async"))
            dist.barrier()
            result["dcp_async_durable_s"] = time.perf_counter() - start
        else:
            with CheckpointStore(f"file://{base}/gpuguard-{source}") as store:
                result["gpuguard_load_s"] = _timed(lambda: store.load(state, rank=rank))
                result["gpuguard_bytes_read"] = store.last_load_bytes_read
            sd = _dcp_state(state)
            result["dcp_load_s"] = _timed(lambda: dcp.load(sd, checkpoint_id=str(base / f"dcp-{source}-async")))
        (base / f"{task}-{world_size}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(size_mib: int) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="gpuguard-sharded-bench-")
    try:
        plan = [("save", 2, 0), ("save", 4, 0), ("load", 2, 4), ("load", 4, 2)]
        for task, world_size, source in plan:
            print(f"{task} on {world_size} ranks", file=sys.stderr, flush=True)
            mp.spawn(worker, args=(world_size, _port(), task, root, size_mib, source), nprocs=world_size)
        out: dict[str, Any] = {"size_mib": size_mib, "torch": torch.__version__, "runs": []}
        for task, world_size, source in plan:
            ranks = [
                json.loads((Path(root) / f"{task}-{world_size}-rank{r}.json").read_text()) for r in range(world_size)
            ]
            out["runs"].append({"task": task, "world_size": world_size, "from_world_size": source, "ranks": ranks})
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def print_table(summary: dict[str, Any]) -> None:
    mib = 2**20
    print(
        f"FSDP2 state of {summary['size_mib']} MiB (fp32 Linear + AdamW), CPU, gloo, one disk, torch {summary['torch']}"
    )
    for run in summary["runs"]:
        ranks = run["ranks"]
        if run["task"] == "save":
            print(
                f"save on {run['world_size']}: gpuguard stall {max(r['gpuguard_stall_s'] for r in ranks):.3f} s, "
                f"durable {max(r['gpuguard_durable_s'] for r in ranks):.3f} s | DCP save "
                f"{max(r['dcp_save_s'] for r in ranks):.3f} s, async_save stall "
                f"{max(r['dcp_async_stall_s'] for r in ranks):.3f} s, durable "
                f"{max(r['dcp_async_durable_s'] for r in ranks):.3f} s"
            )
            for r in ranks:
                print(
                    f"   rank {r['rank']}: share {r['share_bytes'] / mib:.1f} MiB, gpuguard wrote "
                    f"{r['gpuguard_bytes_written'] / mib:.1f} MiB, DCP wrote {r['dcp_bytes_written'] / mib:.1f} MiB"
                )
        else:
            print(
                f"resume {run['from_world_size']} -> {run['world_size']}: gpuguard load "
                f"{max(r['gpuguard_load_s'] for r in ranks):.3f} s | "
                f"DCP load {max(r['dcp_load_s'] for r in ranks):.3f} s"
            )
            for r in ranks:
                print(
                    f"   rank {r['rank']}: share {r['share_bytes'] / mib:.1f} MiB, gpuguard read "
                    f"{r['gpuguard_bytes_read'] / mib:.1f} MiB ({r['gpuguard_bytes_read'] / r['share_bytes']:.3f}x)"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sharded", action="store_true", help="(accepted for benchmarks/checkpoint.py's spelling)")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    summary = run(args.size_mib)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
