"""Time from SIGTERM to a committed emergency checkpoint, in one process.

    python benchmarks/preemption.py [--sizes-mib 16 256] [--step-ms 20 200] [--repeats 3] [--json]

A guarded loop (no periodic checkpoints) whose steps take ``--step-ms``; a timer thread sends this
process SIGTERM at a random point of a step, as the kubelet would. The figure is the guard's own
``signal_to_durable_s``: from the signal handler to the committed manifest, which includes the rest of
the step in progress, the snapshot and the write. Checkpoints go to a temporary local folder, removed
after each run. With several ranks, add up to ``sync_every`` steps to reach the agreed step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from gpuguard import Evacuation, Guard
from gpuguard.fakenvml import FakeNvml


def one(size_mib: int, step_s: float) -> dict[str, float]:
    state = {"w": torch.randn(size_mib * 2**18)}  # float32
    folder = tempfile.mkdtemp(prefix="gpuguard-bench-")
    guard = Guard(checkpoint_dir=folder, state=state, nvml=FakeNvml.replay(), devices="all", checkpoint_every_s=0)
    timer = threading.Timer(1.0 + random.random() * step_s, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        with guard:
            timer.start()
            for step in range(10**9):
                time.sleep(step_s)  # the training step
                guard.step(step)
    except Evacuation:
        pass
    finally:
        timer.cancel()
        shutil.rmtree(folder, ignore_errors=True)
    report = guard.last_evacuation
    if report is None or report.signal_to_durable_s is None:
        raise RuntimeError(f"no committed checkpoint after SIGTERM: {report}")
    return {"to_committed_s": report.signal_to_durable_s, "stall_s": report.stall_s, "durable_s": report.durable_s}


def measure(size_mib: int, step_ms: float, repeats: int) -> dict[str, Any]:
    runs = [one(size_mib, step_ms / 1000) for _ in range(repeats)]
    to_committed = [r["to_committed_s"] for r in runs]
    return {
        "size_mib": size_mib,
        "step_ms": step_ms,
        "median_s": round(statistics.median(to_committed), 4),
        "max_s": round(max(to_committed), 4),
        "median_stall_s": round(statistics.median(r["stall_s"] for r in runs), 4),
        "median_durable_s": round(statistics.median(r["durable_s"] for r in runs), 4),
        "repeats": repeats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--step-ms", type=float, nargs="+", default=[20.0, 200.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.getLogger("gpuguard").setLevel(logging.ERROR)
    results = [measure(size, step, args.repeats) for size in args.sizes_mib for step in args.step_ms]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(
            f"SIGTERM -> committed checkpoint, {r['size_mib']} MiB state, {r['step_ms']:g} ms steps: "
            f"median {r['median_s']:.3f} s, max {r['max_s']:.3f} s (stall {r['median_stall_s']:.3f} s, "
            f"write {r['median_durable_s']:.3f} s; {r['repeats']} runs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
