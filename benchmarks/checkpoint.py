"""Checkpoint cost: gpuguard against torch.save, torch.distributed.checkpoint.async_save and a raw write.

    python benchmarks/checkpoint.py --size-mib 1024 [--device cpu|cuda] [--url URL] [--repeats 3] [--json]
    python benchmarks/checkpoint.py --sharded [--size-mib 256] [--json]   # see checkpoint_sharded.py

The state is what the H200 baseline used: an nn.Sequential of bias-free Linear layers in fp32 plus
AdamW's two moments after one step, sized to ``--size-mib`` in all. Every method saves the same state
in the same run, to the same storage, and each is measured for:

- stall: how long the training thread is blocked (until the call returns and the state may change);
- durable: until the bytes are on stable storage (fsync'd, or committed on an object store).

The raw write is the floor: the state's bytes, already in host memory, written with fsync, by one
thread and by 8 threads. gpuguard's ratios: stall / torch.save's stall, durable / the raw write's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from gpuguard import CheckpointStore


def status(message: str) -> None:
    print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)


def build_state(size_mib: int, device: str) -> dict[str, Any]:
    width = 1024 if size_mib < 3072 else 4096
    layer_bytes = width * width * 4
    layers = max(1, round(size_mib * 2**20 / 3 / layer_bytes))  # parameters + two AdamW moments
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device=device)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"model": model, "optimizer": optimizer}


def state_bytes(state: dict[str, Any]) -> int:
    total = sum(p.numel() * p.element_size() for p in state["model"].parameters())
    for per_param in state["optimizer"].state.values():
        total += sum(t.numel() * t.element_size() for t in per_param.values() if isinstance(t, torch.Tensor))
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fsync_tree(path: str) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


class GpuguardRunner:
    """One long-lived store, prepared once, as a training job holds it: saves reuse its staging buffer."""

    def __init__(self, state: dict[str, Any], root: str, device: str, io_threads: int) -> None:
        self.state, self.device, self.step = state, device, 0
        self.store = CheckpointStore(f"file://{root}/gpuguard", keep=1, io_threads=io_threads)
        self.prepare_s = self.store.prepare(state)

    def __call__(self, folder: str) -> dict[str, float]:
        self.step += 1
        sync(self.device)
        start = time.perf_counter()
        pending = self.store.save(self.state, step=self.step, reason="periodic")
        stall = time.perf_counter() - start
        pending.wait()
        durable = time.perf_counter() - start
        self.store.prune()
        return {"stall_s": stall, "durable_s": durable, "prepare_s": self.prepare_s}


def run_torch_save(state: dict[str, Any], folder: str, device: str) -> dict[str, float]:
    path = os.path.join(folder, "torch_save.pt")
    sync(device)
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": state["model"].state_dict(), "optimizer": state["optimizer"].state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    return {"stall_s": elapsed, "durable_s": elapsed}


def run_dcp_async(state: dict[str, Any], folder: str, device: str) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    sd = {"model": state["model"].state_dict(), "optimizer": state["optimizer"].state_dict()}
    sync(device)
    start = time.perf_counter()
    future = dcp.async_save(sd, checkpoint_id=os.path.join(folder, "dcp"))
    stall = time.perf_counter() - start
    future.result()
    fsync_tree(os.path.join(folder, "dcp"))  # DCP fsyncs its files; this makes sure for the comparison
    return {"stall_s": stall, "durable_s": time.perf_counter() - start}


def _host_bytes(state: dict[str, Any]) -> tuple[list[memoryview], list[torch.Tensor]]:
    """The state's bytes in host memory (the raw write starts from there, like a staged snapshot)."""
    import ctypes

    tensors = [p.detach() for p in state["model"].parameters()]
    for per_param in state["optimizer"].state.values():
        tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    views, hosts = [], []  # the host tensors own the memory the views point into
    for t in tensors:
        host = t.to("cpu").contiguous()
        raw = (ctypes.c_char * (host.numel() * host.element_size())).from_address(host.data_ptr())
        views.append(memoryview(raw).cast("B"))
        hosts.append(host)
    return views, hosts


def run_raw_write(chunks: list[memoryview], folder: str, threads: int) -> dict[str, float]:
    path = os.path.join(folder, f"raw_{threads}.bin")
    offsets, offset = [], 0
    for chunk in chunks:
        offsets.append(offset)
        offset += len(chunk)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(indices: range) -> None:
        for i in indices:
            view, at = chunks[i], offsets[i]
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n

    if threads == 1:
        write(range(len(chunks)))
    else:
        workers = [threading.Thread(target=write, args=(range(i, len(chunks), threads),)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    return {"stall_s": float("nan"), "durable_s": elapsed}


def main() -> int:
    if "--sharded" in sys.argv[1:]:  # FSDP2 / DTensor state on 2 and 4 gloo processes (issue 13)
        from checkpoint_sharded import main as sharded

        return sharded(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="state size: fp32 parameters + AdamW moments")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--url", help="a local folder for every method (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--io-threads", type=int, default=8, help="gpuguard's concurrent writers per shard")
    parser.add_argument(
        "--settle-s",
        type=float,
        help="pause before each run so the disk has flushed the last one (default: 1 s per 256 MiB); "
        "virtual disks that cache writes make the run after a big write pay for it otherwise",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    root = args.url.removeprefix("file://") if args.url else tempfile.mkdtemp(prefix="gpuguard-bench-")
    os.makedirs(root, exist_ok=True)
    status(f"building a {args.size_mib} MiB state on {args.device}")
    state = build_state(args.size_mib, args.device)
    total = state_bytes(state)
    chunks, _hosts = _host_bytes(state)

    status("preparing gpuguard's staging buffer")
    gpuguard = GpuguardRunner(state, root, args.device, args.io_threads)
    settle = args.settle_s if args.settle_s is not None else max(0.5, total / 2**28)
    methods: dict[str, Callable[[str], dict[str, float]]] = {
        "gpuguard": gpuguard,
        "torch.save": lambda folder: run_torch_save(state, folder, args.device),
        "dcp.async_save": lambda folder: run_dcp_async(state, folder, args.device),
        "raw write (1 thread)": lambda folder: run_raw_write(chunks, folder, 1),
        "raw write (8 threads)": lambda folder: run_raw_write(chunks, folder, 8),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    for rep in range(args.repeats):
        for name, method in methods.items():  # interleaved, so drift hits every method alike
            status(f"repeat {rep + 1}/{args.repeats}: {name}")
            folder = tempfile.mkdtemp(dir=root)
            os.sync()  # start every method with no other dirty data waiting to be flushed
            time.sleep(settle)
            try:
                runs[name].append(method(folder))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    status("")
    print(file=sys.stderr, end="")

    def median(name: str, key: str) -> float:
        values = [r[key] for r in runs[name] if r.get(key) == r.get(key)]
        return statistics.median(values) if values else float("nan")

    results = {
        name: {"stall_s": round(median(name, "stall_s"), 4), "durable_s": round(median(name, "durable_s"), 4)}
        for name in methods
    }
    results["gpuguard"]["prepare_s"] = round(median("gpuguard", "prepare_s"), 4)
    ratios = {
        "stall_vs_torch_save": round(results["gpuguard"]["stall_s"] / results["torch.save"]["stall_s"], 4),
        "durable_vs_raw_write": round(
            results["gpuguard"]["durable_s"] / results["raw write (1 thread)"]["durable_s"], 3
        ),
        "durable_vs_parallel_raw_write": round(
            results["gpuguard"]["durable_s"] / results["raw write (8 threads)"]["durable_s"], 3
        ),
    }
    summary = {
        "size_mib": round(total / 2**20, 1),
        "device": args.device,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "io_threads": args.io_threads,
        "settle_s": settle,
        "results": results,
        "ratios": ratios,
    }
    gpuguard.store.close()
    if not args.url:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['size_mib']} MiB of fp32 model + AdamW state on {args.device}, median of {args.repeats} runs")
    print(f"{'method':<24}{'stall (s)':>12}{'durable (s)':>14}")
    for name, r in results.items():
        stall = "-" if r["stall_s"] != r["stall_s"] else f"{r['stall_s']:.4f}"
        print(f"{name:<24}{stall:>12}{r['durable_s']:>14.3f}")
    print(f"gpuguard staging buffer prepared ahead in {results['gpuguard']['prepare_s']:.3f} s")
    print(f"gpuguard stall / torch.save stall:            {ratios['stall_vs_torch_save']:.4f}  (goal <= 0.1)")
    print(f"gpuguard durable / raw write (1 thread):      {ratios['durable_vs_raw_write']:.3f}  (goal <= 1.15)")
    print(f"gpuguard durable / raw write (8 threads):     {ratios['durable_vs_parallel_raw_write']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
