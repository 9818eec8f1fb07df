"""NVML calls per poll cycle, cost of a cycle per GPU, and detection latency from a fault to the verdict.

    python benchmarks/nvml_poll.py [--gpus 8] [--nvlinks 18] [--cycles 2000] [--repeats 5] [--json]

Calls are counted on a fake HGX-like node (8 GPUs, 18 NVLinks each) through a counting wrapper around the
NVML module, for the monitor's poll cycles and for its threads running on a real-time clock.

Poll cost is measured on the fake NVML (the recorded H200) and, where a driver is present, on the
real NVML too, through the same `NvmlSource.read` the monitor's thread runs. Latency is measured
with the fake on a real-time clock: a fault is injected at a known scenario time and the clock is
read when a subscriber sees the GPU turn FAILING, for two paths: an XID event (event thread) and a
double-bit ECC counter (poll thread: uniform over the poll interval, half of it on average).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import threading
import time
from collections import Counter
from typing import Any

from gpuguard import HealthChange, HealthConfig, HealthMonitor, HealthState, NvmlUnavailableError
from gpuguard.fakenvml import FakeNvml
from gpuguard.health.nvml_source import NvmlSource


class CountingNvml:
    """Stands in for an NVML module and counts every ``nvml*`` function call made through it."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._nvml, name)
        if not (name.startswith("nvml") and callable(attr)) or isinstance(attr, type):
            return attr

        def counted(*args: Any) -> Any:
            with self._lock:
                self.counts[name] += 1
            return attr(*args)

        return counted

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


def nvml_calls(gpus: int, nvlinks: int, cycles: int, threaded_s: float) -> dict[str, Any]:
    """NVML calls per cycle and per second on a fake node: the figure the issue bounds at 3 per GPU per cycle."""
    scenario = {"gpus": gpus, "nvlink_links": nvlinks, "events": []}
    counting = CountingNvml(FakeNvml.from_scenario(scenario))
    monitor = HealthMonitor(counting, HealthConfig(), devices="all")
    monitor.start(threads=False)
    at_start = counting.total()
    first = dict(counting.counts)
    for _ in range(cycles):
        monitor.poll()
    steady = counting.total() - at_start
    by_call = {k: v - first.get(k, 0) for k, v in counting.counts.items() if v - first.get(k, 0)}
    monitor.stop()

    # The threads, on a real-time clock: poll thread every second, event thread waiting 1 s at a time.
    live = CountingNvml(FakeNvml.from_scenario(scenario, realtime=True))
    with HealthMonitor(live, HealthConfig(poll_interval_s=1.0, event_wait_s=1.0), devices="all"):
        begin = live.total()
        time.sleep(threaded_s)
        during = live.total() - begin
    per_gpu_cycle = steady / cycles / gpus
    return {
        "gpus": gpus,
        "nvlinks_per_gpu": nvlinks,
        "calls_at_start": at_start,
        "calls_per_cycle": round(steady / cycles, 2),
        "calls_per_gpu_per_cycle": round(per_gpu_cycle, 2),
        "calls_by_function_per_cycle": {k: round(v / cycles, 2) for k, v in sorted(by_call.items())},
        "threaded_calls_per_s": round(during / threaded_s, 1),
        "threaded_window_s": threaded_s,
        "within_3_per_gpu_per_cycle": per_gpu_cycle <= 3.0,
    }


def poll_cost(nvml: Any, cycles: int) -> dict[str, Any]:
    source = NvmlSource(nvml)
    devices = source.open()
    per_gpu: list[float] = []
    for _ in range(cycles):
        for device in devices:
            start = time.perf_counter()
            source.read(device, 0.0)
            per_gpu.append((time.perf_counter() - start) * 1e6)
    source.close()
    per_gpu.sort()
    return {
        "gpus": len(devices),
        "fields_per_batch": len(devices[0].fields) if devices else 0,
        "median_us": round(statistics.median(per_gpu), 1),
        "p99_us": round(per_gpu[int(len(per_gpu) * 0.99)], 1),
        "samples": len(per_gpu),
    }


def _failing_recorder(fake: FakeNvml, detected: list[float], seen: threading.Event) -> Any:
    def on_change(change: HealthChange) -> None:
        if change.current.state is HealthState.FAILING and not detected:
            detected.append(fake.clock())
            seen.set()

    return on_change


def detection_latency(kind: str, repeats: int, poll_interval_s: float) -> dict[str, Any]:
    latencies = []
    rng = random.Random(0)
    for _ in range(repeats):
        # A random phase against the poll loop, so the poll path's latency is sampled fairly.
        inject_at = 0.1 + rng.random() * poll_interval_s
        # XID 119 (GSP timeout) fails the GPU and moves no counter, so only the event path can see it
        # (an XID 48 brings its double-bit ECC count, which the poll path would race the event to).
        event = (
            {"at": inject_at, "gpu": 0, "xid": 119}
            if kind == "xid_event"
            else {"at": inject_at, "gpu": 0, "field": "ecc_dbe_volatile", "set": 1}
        )
        fake = FakeNvml.from_scenario({"gpus": 1, "events": [event]}, realtime=True)
        seen = threading.Event()
        detected: list[float] = []
        on_change = _failing_recorder(fake, detected, seen)

        config = HealthConfig(poll_interval_s=poll_interval_s, event_wait_s=0.5)
        with HealthMonitor(fake, config, devices="all") as monitor:
            monitor.subscribe(on_change)
            if not seen.wait(10):
                raise RuntimeError(f"{kind}: fault not detected within 10 s")
        latencies.append((detected[0] - inject_at) * 1000)
    return {
        "path": kind,
        "poll_interval_s": poll_interval_s,
        "median_ms": round(statistics.median(latencies), 2),
        "max_ms": round(max(latencies), 2),
        "repeats": repeats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="fake GPUs to poll")
    parser.add_argument("--nvlinks", type=int, default=18, help="NVLinks per fake GPU when counting calls")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the threaded monitor is counted")
    parser.add_argument("--cycles", type=int, default=2000, help="poll cycles to time")
    parser.add_argument("--repeats", type=int, default=5, help="latency measurements per path")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    logging.getLogger("gpuguard").setLevel(logging.ERROR)  # the injected faults would log warnings

    results: dict[str, Any] = {"poll": {}, "latency": []}
    results["calls"] = nvml_calls(args.gpus, args.nvlinks, min(args.cycles, 300), args.seconds)
    results["poll"]["fake_h200"] = poll_cost(FakeNvml.replay(gpus=args.gpus), args.cycles)
    try:
        results["poll"]["real_nvml"] = poll_cost(None, args.cycles)
    except NvmlUnavailableError as exc:
        results["poll"]["real_nvml"] = {"skipped": str(exc)}
    for kind in ("xid_event", "dbe_counter"):
        results["latency"].append(detection_latency(kind, args.repeats, poll_interval_s=1.0))

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    c = results["calls"]
    print(f"NVML calls, fake node of {c['gpus']} GPUs x {c['nvlinks_per_gpu']} NVLinks:")
    print(
        f"  {c['calls_per_cycle']} per poll cycle = {c['calls_per_gpu_per_cycle']} per GPU per cycle "
        f"({', '.join(f'{k} {v:g}' for k, v in c['calls_by_function_per_cycle'].items())}); "
        f"{c['calls_at_start']} at start"
    )
    print(f"  threads running ({c['threaded_window_s']:g} s): {c['threaded_calls_per_s']} calls/s")
    print("Poll cycle, per GPU (one batched nvmlDeviceGetFieldValues + 2 calls):")
    for name, r in results["poll"].items():
        if "skipped" in r:
            print(f"  {name:<10} skipped: {r['skipped']}")
        else:
            print(
                f"  {name:<10} {r['gpus']} GPU(s), {r['fields_per_batch']} fields: "
                f"median {r['median_us']} us, p99 {r['p99_us']} us over {r['samples']} reads"
            )
    print("Detection latency, injected fault -> FAILING seen by a subscriber:")
    for r in results["latency"]:
        print(f"  {r['path']:<12} poll {r['poll_interval_s']}s: median {r['median_ms']} ms, max {r['max_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
