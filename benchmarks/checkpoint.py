"""Checkpoint cost: gpuguard against torch.save, torch.distributed.checkpoint and the hardware floors.

    python benchmarks/checkpoint.py --size-mib 1024 [--device cpu|cuda] [--url DIR] [--repeats 5] [--json]
    python benchmarks/checkpoint.py --sharded [--size-mib 256] [--json]   # see checkpoint_sharded.py

The state is what the H200 baseline used: an nn.Sequential of bias-free Linear layers in fp32 plus
AdamW's two moments after one step, sized to ``--size-mib`` in all. Every method saves the same state
in the same run, to the same storage, interleaved repeat by repeat (so drift hits all alike), and each
is measured for:

- stall: how long the training thread is blocked (until the call returns and the state may change);
- durable: until the bytes are on stable storage (fsync'd, or committed on an object store);
- resume: reading it back into the live model and optimizer (warm page cache: this machine's other
  users rule out dropping it);
- resume in a new process (with ``--fresh-resume``, on by default): what a restarted job pays, a new
  process with a freshly built model and an optimizer that has no state yet, loading the same files
  (gpuguard and ``torch.load`` only; the time of the load alone).

The floors, in the same run: a memory copy of the same bytes into a preallocated buffer (one bulk
``copy_``; on CUDA, into pinned memory on a side stream), which no snapshot can beat, and a raw write
of the bytes already in host memory, with fsync, by one thread and by eight. Reported: medians of the
repeats, every repeat's figures, and gpuguard's ratios to each. Disk use is one method's files at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from gpuguard import CheckpointStore
from gpuguard.checkpoint._storage import PWRITE_BYTES  # the raw write issues calls of the same size


def status(message: str) -> None:
    print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)


def build_state(size_mib: int, device: str, *, stepped: bool = True) -> dict[str, Any]:
    """The model and AdamW; with ``stepped`` False the optimizer has no state yet (a restarted job's)."""
    width = 1024 if size_mib < 3072 else 4096
    layer_bytes = width * width * 4
    layers = max(1, round(size_mib * 2**20 / 3 / layer_bytes))  # parameters + two AdamW moments
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if stepped:
        model(torch.randn(2, width, device=device)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"model": model, "optimizer": optimizer}


# A restarted job: a new process builds its model and optimizer, then loads. Only the load is timed.
_FRESH_RESUME = """
import json, sys, time
sys.path.insert(0, {here!r})
import torch
from checkpoint import build_state, sync
method, path, size_mib, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
state = build_state(size_mib, device, stepped=False)
sync(device)
start = time.perf_counter()
if method == "gpuguard":
    from gpuguard import CheckpointStore
    with CheckpointStore(path) as store:
        store.load(state)
else:
    loaded = torch.load(path, map_location=device, weights_only=True)
    state["model"].load_state_dict(loaded["model"])
    state["optimizer"].load_state_dict(loaded["optimizer"])
sync(device)
print(json.dumps({{"resume_s": time.perf_counter() - start}}))
"""


def fresh_resume(method: str, path: str, size_mib: int, device: str) -> float:
    """Seconds a new process takes to load ``path`` into a freshly built state (its start-up not counted)."""
    import subprocess

    script = _FRESH_RESUME.format(here=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", script, method, path, str(size_mib), device],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["resume_s"])


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


Result = dict[str, float]
NAN = float("nan")


def _restore(state: dict[str, Any], loaded: dict[str, Any]) -> None:
    state["model"].load_state_dict(loaded["model"])
    state["optimizer"].load_state_dict(loaded["optimizer"])


class GpuguardRunner:
    """One long-lived store, prepared once, as a training job holds it: saves reuse its staging buffer."""

    def __init__(
        self, state: dict[str, Any], root: str, device: str, io_threads: int, fresh_size_mib: int | None = None
    ) -> None:
        self.state, self.device, self.step, self.root = state, device, 0, f"{root}/gpuguard"
        self.store = CheckpointStore(f"file://{self.root}", keep=1, io_threads=io_threads)
        self.prepare_s = self.store.prepare(state)
        self.fresh_size_mib = fresh_size_mib

    def __call__(self, folder: str) -> Result:
        self.step += 1
        sync(self.device)
        start = time.perf_counter()
        pending = self.store.save(self.state, step=self.step, reason="periodic")
        stall = time.perf_counter() - start
        pending.wait()
        durable = time.perf_counter() - start
        sync(self.device)
        start = time.perf_counter()
        self.store.load(self.state)  # checks every tensor's CRC-32C, then copies into the live objects
        sync(self.device)
        resume = time.perf_counter() - start
        result = {"stall_s": stall, "durable_s": durable, "resume_s": resume, "prepare_s": self.prepare_s}
        if self.fresh_size_mib is not None:
            result["resume_fresh_s"] = fresh_resume("gpuguard", f"file://{self.root}", self.fresh_size_mib, self.device)
        shutil.rmtree(os.path.join(self.root, pending.id), ignore_errors=True)  # one checkpoint on disk at a time
        return result


def run_torch_save(state: dict[str, Any], folder: str, device: str, fresh_size_mib: int | None = None) -> Result:
    path = os.path.join(folder, "torch_save.pt")
    sync(device)
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": state["model"].state_dict(), "optimizer": state["optimizer"].state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    _restore(state, torch.load(path, map_location=device, weights_only=True))
    sync(device)
    result = {"stall_s": elapsed, "durable_s": elapsed, "resume_s": time.perf_counter() - start}
    if fresh_size_mib is not None:
        result["resume_fresh_s"] = fresh_resume("torch", path, fresh_size_mib, device)
    return result


def _dcp_state(state: dict[str, Any]) -> dict[str, Any]:
    return {"model": state["model"].state_dict(), "optimizer": state["optimizer"].state_dict()}


def _dcp_resume(state: dict[str, Any], path: str, device: str) -> float:
    import torch.distributed.checkpoint as dcp

    sd = _dcp_state(state)
    start = time.perf_counter()
    dcp.load(sd, checkpoint_id=path)  # in place, into the live tensors
    sync(device)
    return time.perf_counter() - start


def run_dcp(state: dict[str, Any], folder: str, device: str, *, asynchronous: bool) -> Result:
    import torch.distributed.checkpoint as dcp

    # One process without a process group is what this compares; DCP says so on every call.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    path = os.path.join(folder, "dcp")
    sd = _dcp_state(state)
    sync(device)
    start = time.perf_counter()
    if asynchronous:
        future = dcp.async_save(sd, checkpoint_id=path)
        stall = time.perf_counter() - start
        future.result()
    else:
        dcp.save(sd, checkpoint_id=path)
        stall = time.perf_counter() - start
    fsync_tree(path)  # DCP fsyncs its files; this makes sure for the comparison
    durable = time.perf_counter() - start
    return {"stall_s": stall, "durable_s": durable, "resume_s": _dcp_resume(state, path, device)}


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


class MemoryCopy:
    """The floor for a snapshot: the same bytes, already contiguous, copied into a preallocated buffer.

    On the host, one bulk ``copy_`` (torch's own threads); from a GPU, one device-to-host copy into
    pinned memory on a side stream, waited on.
    """

    def __init__(self, state: dict[str, Any], device: str) -> None:
        self.device = device
        tensors = [p.detach() for p in state["model"].parameters()]
        for per_param in state["optimizer"].state.values():
            tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
        self.source = torch.cat([t.reshape(-1) for t in tensors])  # on the state's device
        self.target = torch.empty(self.source.shape, dtype=self.source.dtype, pin_memory=device == "cuda")
        self.target.zero_()  # fault the pages in now, as gpuguard's prepare() does for its buffer

    def __call__(self, folder: str) -> Result:
        sync(self.device)
        start = time.perf_counter()
        if self.device == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.target.copy_(self.source, non_blocking=True)
            stream.synchronize()
        else:
            self.target.copy_(self.source)
        elapsed = time.perf_counter() - start
        return {"stall_s": elapsed, "durable_s": NAN, "resume_s": NAN}


def run_raw_write(chunks: list[memoryview], folder: str, threads: int) -> Result:
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
            while view:  # in calls of at most 1 MiB, which fill the page cache fastest (see PWRITE_BYTES)
                n = os.pwrite(fd, view[:PWRITE_BYTES], at)
                view, at = view[n:], at + n

    _in_threads(write, len(chunks), threads)
    os.fsync(fd)
    os.close(fd)
    durable = time.perf_counter() - start
    # Read back into the same preallocated host memory: the floor for a resume.
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)

    def read(indices: range) -> None:
        for i in indices:
            view, at = chunks[i], offsets[i]
            while view:
                n = os.preadv(fd, [view], at)
                if n <= 0:
                    raise OSError(f"{path}: short read at {at}")
                view, at = view[n:], at + n

    _in_threads(read, len(chunks), threads)
    os.close(fd)
    return {"stall_s": NAN, "durable_s": durable, "resume_s": time.perf_counter() - start}


def _in_threads(work: Callable[[range], None], n: int, threads: int) -> None:
    if threads == 1:
        work(range(n))
        return
    workers = [threading.Thread(target=work, args=(range(i, n, threads),)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def measure(
    size_mib: int,
    device: str = "cpu",
    repeats: int = 5,
    url: str | None = None,
    io_threads: int = 8,
    settle_s: float | None = None,
    fresh_resume: bool = True,
) -> dict[str, Any]:
    """Every method, interleaved ``repeats`` times; medians, ratios and every repeat's figures."""
    root = url.removeprefix("file://") if url else tempfile.mkdtemp(prefix="gpuguard-bench-")
    os.makedirs(root, exist_ok=True)
    status(f"building a {size_mib} MiB state on {device}")
    state = build_state(size_mib, device)
    total = state_bytes(state)
    chunks, _hosts = _host_bytes(state)
    status("preparing gpuguard's staging buffer")
    fresh = size_mib if fresh_resume else None
    gpuguard = GpuguardRunner(state, root, device, io_threads, fresh)
    floor = MemoryCopy(state, device)
    settle = settle_s if settle_s is not None else max(0.5, total / 2**28)
    methods: dict[str, Callable[[str], Result]] = {
        "memory copy": floor,
        "gpuguard": gpuguard,
        "torch.save": lambda folder: run_torch_save(state, folder, device, fresh),
        "dcp.save": lambda folder: run_dcp(state, folder, device, asynchronous=False),
        "dcp.async_save": lambda folder: run_dcp(state, folder, device, asynchronous=True),
        "raw write (1 thread)": lambda folder: run_raw_write(chunks, folder, 1),
        "raw write (8 threads)": lambda folder: run_raw_write(chunks, folder, 8),
    }
    runs: dict[str, list[Result]] = {name: [] for name in methods}
    try:
        for rep in range(repeats):
            for name, method in methods.items():  # interleaved, so drift hits every method alike
                status(f"repeat {rep + 1}/{repeats}: {name}")
                folder = tempfile.mkdtemp(dir=root)
                os.sync()  # start every method with no other dirty data waiting to be flushed
                time.sleep(settle)
                try:
                    runs[name].append(method(folder))
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        status("")
        gpuguard.store.close()
        if not url:
            shutil.rmtree(root, ignore_errors=True)

    def median(name: str, key: str) -> float:
        values = [r[key] for r in runs[name] if key in r and not math.isnan(r[key])]
        return round(statistics.median(values), 4) if values else NAN

    keys = ("stall_s", "durable_s", "resume_s", "resume_fresh_s")
    results: dict[str, dict[str, float]] = {name: {key: median(name, key) for key in keys} for name in methods}
    results["gpuguard"]["prepare_s"] = median("gpuguard", "prepare_s")
    g = results["gpuguard"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if math.isfinite(b) and b > 0 else NAN

    ratios = {
        "stall_vs_memory_copy": ratio(g["stall_s"], results["memory copy"]["stall_s"]),
        "stall_vs_dcp_async_save": ratio(g["stall_s"], results["dcp.async_save"]["stall_s"]),
        "stall_vs_torch_save": ratio(g["stall_s"], results["torch.save"]["stall_s"]),
        "durable_vs_raw_write": ratio(g["durable_s"], results["raw write (1 thread)"]["durable_s"]),
        "durable_vs_parallel_raw_write": ratio(g["durable_s"], results["raw write (8 threads)"]["durable_s"]),
        "resume_vs_torch_load": ratio(g["resume_s"], results["torch.save"]["resume_s"]),
        "resume_vs_parallel_raw_read": ratio(g["resume_s"], results["raw write (8 threads)"]["resume_s"]),
        "new_process_resume_vs_torch_load": ratio(g["resume_fresh_s"], results["torch.save"]["resume_fresh_s"]),
    }
    return {
        "benchmark": "checkpoint",
        "command": f"python benchmarks/checkpoint.py --size-mib {size_mib} --device {device} --repeats {repeats}"
        + ("" if fresh_resume else " --no-fresh-resume"),
        "machine": machine(),
        "size_mib": round(total / 2**20, 1),
        "device": device,
        "repeats": repeats,
        "io_threads": io_threads,
        "settle_s": settle,
        "results": results,
        "ratios": ratios,
        "goals": {
            "stall_vs_memory_copy": 1.5,
            "stall_vs_dcp_async_save": 0.5,
            "durable_vs_parallel_raw_write": 1.15,
            "resume_vs_torch_load": 1.0,
            "resume_vs_parallel_raw_read": 2.0,
        },
        "runs": {name: [{k: round(v, 4) for k, v in r.items()} for r in rs] for name, rs in runs.items()},
    }


def render(summary: dict[str, Any]) -> str:
    results, ratios, goals = summary["results"], summary["ratios"], summary["goals"]

    def cell(value: float, digits: int = 3) -> str:
        return "-" if math.isnan(value) else f"{value:.{digits}f}"

    lines = [
        f"{summary['size_mib']} MiB of fp32 model + AdamW state on {summary['device']}, "
        f"median of {summary['repeats']} interleaved repeats",
        f"{'method':<24}{'stall (s)':>12}{'durable (s)':>14}{'resume (s)':>13}{'new process (s)':>17}",
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<24}{cell(r['stall_s'], 4):>12}{cell(r['durable_s']):>14}{cell(r['resume_s']):>13}"
            f"{cell(r.get('resume_fresh_s', NAN)):>17}"
        )
    lines.append(f"gpuguard staging buffer prepared ahead in {results['gpuguard']['prepare_s']:.3f} s")
    for key, value in ratios.items():
        goal = goals.get(key)
        verdict = "" if goal is None else f"  (goal <= {goal}: {'met' if value <= goal else 'NOT met'})"
        lines.append(f"gpuguard {key.replace('_', ' '):<34}{cell(value):>8}{verdict}")
    return "\n".join(lines)


def main() -> int:
    if "--sharded" in sys.argv[1:]:  # FSDP2 / DTensor state on 2 and 4 gloo processes (issue 13)
        from checkpoint_sharded import main as sharded

        return sharded(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="state size: fp32 parameters + AdamW moments")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--url", help="a local folder for every method (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--io-threads", type=int, default=8, help="gpuguard's concurrent writers per shard")
    parser.add_argument(
        "--settle-s",
        type=float,
        help="pause before each run so the disk has flushed the last one (default: 1 s per 256 MiB); "
        "virtual disks that cache writes make the run after a big write pay for it otherwise",
    )
    parser.add_argument(
        "--no-fresh-resume",
        dest="fresh_resume",
        action="store_false",
        help="skip the resume in a new process (two processes per repeat; measured by default)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    summary = measure(
        args.size_mib, args.device, args.repeats, args.url, args.io_threads, args.settle_s, args.fresh_resume
    )
    print(json.dumps(summary, indent=2) if args.json else render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
