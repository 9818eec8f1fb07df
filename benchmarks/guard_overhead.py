"""What the guard costs a training loop, and how fast it decides.

    python benchmarks/guard_overhead.py [--steps 400] [--repeats 5] [--device cpu|cuda] [--json]

1. Step time of a real training step with and without the guard, interleaved, as a ratio. On CPU the
   guard watches the fake NVML (the recorded H200); with ``--device cuda``, the real GPU through real NVML.
2. Microseconds per ``guard.step()`` call in a tight loop: one process, and a one-rank gloo process
   group (the distributed path: an async all_reduce every ``sync_every`` steps).
3. Detection latency: from the moment a fault becomes visible to the fake NVML to the guard's decision,
   for an XID event (event thread) and a double-bit ECC counter (poll thread, 1 s interval).
4. Agreement latency on 2 and 4 gloo ranks: one rank decides (``request_evacuation``) at step ``d``,
   for every phase of ``d`` against the sync points; steps from ``d`` to the step every rank
   evacuates at (median and max; the guarantee is at most ``sync_every``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from gpuguard import Guard, HealthConfig
from gpuguard.fakenvml import FakeNvml


def make_training(width: int = 512, device: str = "cpu") -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(64 if device == "cpu" else 4096, width, device=device)

    def step() -> None:
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"model": model, "optimizer": optimizer}, step


_counter = iter(range(2**62))  # guard.step() wants increasing step numbers across repeats


def time_steps(step: Any, n: int, guard: Guard | None) -> float:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
        if guard is not None:
            guard.step(next(_counter))
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def step_overhead(steps: int, repeats: int, width: int, device: str = "cpu") -> dict[str, Any]:
    state, step = make_training(width, device)
    time_steps(step, 50, None)  # warm up
    folder = tempfile.mkdtemp(prefix="gpuguard-bench-")
    without, with_guard = [], []
    if device == "cuda":  # the job's own GPU, through the driver's NVML
        guard = Guard(checkpoint_dir=f"file://{folder}", state=state, devices="job").start()
    else:
        guard = Guard(checkpoint_dir=f"file://{folder}", state=state, nvml=FakeNvml.replay(), devices="all").start()
    try:
        # The first guard.step() plans the staging buffer on the training thread (state_dict() must not run
        # on another thread while forward or backward computes); the buffer is allocated in the background.
        step()
        started = time.perf_counter()
        guard.step(next(_counter))
        first_step = time.perf_counter() - started
        for _ in range(repeats):
            without.append(time_steps(step, steps, None))
            with_guard.append(time_steps(step, steps, guard))
    finally:
        guard.close()
        shutil.rmtree(folder, ignore_errors=True)
    base, guarded = statistics.median(without), statistics.median(with_guard)
    return {
        "step_ms_without": round(base * 1000, 4),
        "step_ms_with": round(guarded * 1000, 4),
        "ratio": round(guarded / base, 4),
        "first_guard_step_ms": round(first_step * 1000, 3),
        "device": device,
        "steps": steps,
        "repeats": repeats,
    }


def per_call(n: int, distributed: bool) -> float:
    folder = tempfile.mkdtemp(prefix="gpuguard-bench-")
    if distributed:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
    guard = Guard(checkpoint_dir=f"file://{folder}", state={"w": torch.ones(4)}, nvml=FakeNvml.replay(), devices="all")
    guard.start()
    try:
        guard.step(0)  # the one slow path that prepares the staging buffer
        time.sleep(0.2)
        start = time.perf_counter()
        for i in range(1, n + 1):
            guard.step(i)
        return (time.perf_counter() - start) / n * 1e6
    finally:
        guard.close()
        shutil.rmtree(folder, ignore_errors=True)
        if distributed:
            dist.destroy_process_group()


def detection_latency(kind: str, repeats: int) -> dict[str, Any]:
    latencies = []
    for _ in range(repeats):
        event = (
            {"at": 1.0, "gpu": 0, "xid": 48}
            if kind == "xid_event"
            else {"at": 1.0, "gpu": 0, "field": "ecc_dbe_volatile", "set": 1}
        )
        nvml = FakeNvml.from_scenario({"gpus": 1, "events": [event]})
        folder = tempfile.mkdtemp(prefix="gpuguard-bench-")
        guard = Guard(
            checkpoint_dir=f"file://{folder}",
            state={"w": torch.ones(4)},
            nvml=nvml,
            devices="all",
            health=HealthConfig(poll_interval_s=1.0, event_wait_s=1.0),
        )
        guard.start()
        try:
            time.sleep(0.3 + (len(latencies) % 5) * 0.2)  # a different phase against the poll loop each time
            injected = time.perf_counter()
            nvml.clock.set(1.0)
            deadline = injected + 5
            while guard.decided_wall is None and time.perf_counter() < deadline:
                time.sleep(0.0005)
            if guard.decided_wall is None:
                raise RuntimeError(f"{kind}: no decision within 5 s")
            latencies.append((guard.decided_wall - injected) * 1000)
        finally:
            guard.close()
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "path": kind,
        "median_ms": round(statistics.median(latencies), 2),
        "max_ms": round(max(latencies), 2),
        "repeats": repeats,
    }


def _latency_worker(rank: int, world: int, sync_every: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logging.getLogger("gpuguard").setLevel(logging.CRITICAL)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    try:
        for trial in range(2 * sync_every):  # every phase of the decision against the sync points, twice
            decider = world - 1 - trial % world  # mostly not rank 0: the decision must travel
            decided_at = 3 * sync_every + trial % sync_every
            guard = Guard(
                checkpoint_dir=f"file://{out}-trial-{trial}",  # shared by the ranks: rank 0 commits their shards
                state={"w": torch.ones(4)},
                nvml=FakeNvml.replay(),
                devices="all",
                sync_every=sync_every,
                checkpoint_every_s=0,
            )
            evacuated_at = -1
            started = 0.0
            try:
                with guard:
                    for step in range(10 * sync_every):
                        if rank == decider and step == decided_at:
                            started = time.perf_counter()
                            guard.request_evacuation("benchmark")
                        guard.step(step)
            except SystemExit as exc:  # gpuguard.Evacuation
                evacuated_at = int(getattr(exc, "step", -1))
            rows.append({"decider": decider, "decided_at": decided_at, "evacuated_at": evacuated_at, "t": started})
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(rows, f)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # other jobs share this machine: ask the kernel for a free port
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agreement_latency(world: int, sync_every: int, port: int | None = None) -> dict[str, Any]:
    import torch.multiprocessing as mp

    port = port or _free_port()
    out = os.path.join(tempfile.mkdtemp(prefix="gpuguard-bench-"), "latency")
    mp.spawn(_latency_worker, args=(world, sync_every, port, out), nprocs=world, join=True)  # type: ignore[no-untyped-call]
    per_rank = []
    for rank in range(world):
        with open(f"{out}.{rank}") as f:
            per_rank.append(json.load(f))
    latencies = []
    for trial in zip(*per_rank, strict=True):
        steps = {row["evacuated_at"] for row in trial}
        if len(steps) != 1 or -1 in steps:
            raise RuntimeError(f"ranks evacuated at different steps or not at all: {trial}")
        latencies.append(steps.pop() - trial[0]["decided_at"])
    return {
        "world_size": world,
        "sync_every": sync_every,
        "median_steps": statistics.median(latencies),
        "max_steps": max(latencies),
        "min_steps": min(latencies),
        "trials": len(latencies),
        "within_sync_every": max(latencies) <= sync_every,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=1536, help="model width; 1536 makes a step of ~15 ms here")
    parser.add_argument("--sync-every", type=int, default=10, help="for the agreement latency")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.getLogger("gpuguard").setLevel(logging.ERROR)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    results = {
        "training_step": step_overhead(args.steps, args.repeats, args.width, args.device),
        "us_per_guard_step": {
            "single_process": round(per_call(args.calls, distributed=False), 3),
            "gloo_one_rank": round(per_call(args.calls // 4, distributed=True), 3),
        },
        "detection_latency": [
            detection_latency("xid_event", args.repeats),
            detection_latency("dbe_counter", args.repeats),
        ],
        "agreement_latency": [agreement_latency(w, args.sync_every) for w in (2, 4)],
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    t = results["training_step"]
    print(
        f"training step: {t['step_ms_without']:.3f} ms without the guard, {t['step_ms_with']:.3f} ms with it "
        f"(ratio {t['ratio']:.4f}; median of {t['repeats']} x {t['steps']} steps, interleaved); the first "
        f"guard.step(), which plans the staging buffer on the training thread: {t['first_guard_step_ms']:.2f} ms once"
    )
    u = results["us_per_guard_step"]
    print(
        f"guard.step(): {u['single_process']:.2f} us in one process, {u['gloo_one_rank']:.2f} us with a gloo "
        "process group (an async all_reduce every 10 steps)"
    )
    for r in results["detection_latency"]:
        print(f"detection, fault -> decision, {r['path']}: median {r['median_ms']} ms, max {r['max_ms']} ms")
    for a in results["agreement_latency"]:
        print(
            f"agreement, decision -> every rank's evacuation, {a['world_size']} gloo ranks, sync_every="
            f"{a['sync_every']}: median {a['median_steps']} steps, max {a['max_steps']} "
            f"(min {a['min_steps']}, {a['trials']} trials; within sync_every: {a['within_sync_every']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
