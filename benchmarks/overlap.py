"""The level after a fast snapshot: overlapping its copy with the next forward and backward.

    python benchmarks/overlap.py [--width 2048] [--layers 6] [--steps 60] [--every 10] [--json]

A training loop saves a periodic checkpoint every ``--every`` steps, in three modes, interleaved:
no checkpoint, a snapshot taken before ``save`` returns, and a snapshot overlapped with the next
forward/backward (``overlap_with=[optimizer]``: only the next ``optimizer.step()`` waits). The stall
of a checkpoint is the extra time of the two steps around it against the loop without checkpoints.
On a GPU the deferred copy runs on the copy engines; on a CPU it competes with the training for the
same cores, so there the gain is bounded by the spare cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from gpuguard import CheckpointStore


def run(mode: str, args: argparse.Namespace, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]
    model = torch.nn.Sequential(*layers).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.width, device=device)
    state = {"model": model, "optimizer": optimizer}
    folder = tempfile.mkdtemp(prefix="gpuguard-overlap-")
    store = CheckpointStore(f"file://{folder}", keep=1)
    times: list[float] = []
    pending = []
    for step in range(args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            store.prepare(state)
        elif mode != "none" and step % args.every == 0:
            overlap = [optimizer] if mode == "overlap" else []
            pending.append(store.save(state, step=step, reason="periodic", overlap_with=overlap))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    for p in pending:
        p.wait()
    store.close()
    steady = [t for i, t in enumerate(times) if i > 1 and i % args.every not in (0, 1)]
    around = [times[i] + times[i + 1] for i in range(args.every, args.steps - 1, args.every)]
    median = statistics.median(steady)
    return {
        "step_ms": median * 1000,
        "checkpoint_steps_ms": statistics.median(around) * 1000,
        "median_s": median,
        "stall_ms": (statistics.median(around) - 2 * median) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=61)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.getLogger("gpuguard").setLevel(logging.ERROR)
    results: dict[str, list[dict[str, float]]] = {"none": [], "snapshot": [], "overlap": []}
    for _ in range(args.repeats):
        for mode, runs in results.items():
            runs.append(run(mode, args, args.device))
    summary: dict[str, Any] = {}
    base = statistics.median(r["checkpoint_steps_ms"] for r in results["none"])
    for mode, runs in results.items():
        around = statistics.median(r["checkpoint_steps_ms"] for r in runs)
        summary[mode] = {
            "step_ms": round(statistics.median(r["step_ms"] for r in runs), 2),
            "two_steps_around_a_checkpoint_ms": round(around, 2),
            "stall_ms": round(around - base, 2),
        }
    state_mib = args.layers * (args.width * args.width + args.width) * 4 * 3 / 2**20
    summary["state_mib"] = round(state_mib, 1)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{state_mib:.0f} MiB of parameters + AdamW state on {args.device}; a checkpoint every {args.every} steps")
    for mode in results:
        r = summary[mode]
        print(
            f"  {mode:<9} step {r['step_ms']:8.2f} ms; the two steps around a checkpoint "
            f"{r['two_steps_around_a_checkpoint_ms']:8.2f} ms; stall {r['stall_ms']:7.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
