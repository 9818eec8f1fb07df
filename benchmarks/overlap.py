"""The level after a fast snapshot: overlapping its copy with the next forward and backward.

    python benchmarks/overlap.py [--width 2048] [--layers 6] [--steps 60] [--every 10] [--json]

A training loop saves a periodic checkpoint every ``--every`` steps, in three modes, interleaved:
no checkpoint, a snapshot taken before ``save`` returns, and a snapshot overlapped with the next
forward/backward (``overlap_with=[optimizer]``: only the next ``optimizer.step()`` waits). Reported:
how long ``save()`` blocked, how long the next optimizer step waited for the deferred copy (the
training thread's stall is their sum), and the extra time of the two steps around a checkpoint against
the loop without checkpoints (which also counts the background write competing for the cores).
On a GPU the deferred copy runs on the copy engines; on a CPU it competes with the training for the
same cores, so there the gain is bounded by the spare cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
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
    returned: list[float] = []
    waited: list[float] = []
    for step in range(args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            store.prepare(state)
        elif mode != "none" and step % args.every == 1 and step > 1:
            waited.append(store.last_step_wait_s)  # the optimizer step just taken, after a save
        if mode != "none" and step > 0 and step % args.every == 0:
            store.last_step_wait_s = 0.0
            pending.append(
                store.save(state, step=step, reason="periodic", overlap_with=[optimizer] if mode == "overlap" else [])
            )
            returned.append(pending[-1].timings.stall_s)
            pending[-1].add_done_callback(lambda _: store.prune())  # disk holds one or two states, not all
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    for p in pending:
        p.wait()
    store.close()
    shutil.rmtree(folder, ignore_errors=True)  # keep=1 bounds it while running; nothing is left after
    around = [times[i] + times[i + 1] for i in range(args.every, args.steps - 1, args.every)]
    steady = [t for i, t in enumerate(times) if i > 1 and i % args.every not in (0, 1)]
    return {
        "step_ms": statistics.median(steady) * 1000,
        "around_ms": statistics.median(around) * 1000,
        "returned_ms": statistics.median(returned) * 1000 if returned else 0.0,
        "waited_ms": statistics.median(waited) * 1000 if waited else 0.0,
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
    runs: dict[str, list[dict[str, float]]] = {"none": [], "snapshot": [], "overlap": []}
    for _ in range(args.repeats):
        for mode, results in runs.items():  # interleaved, so drift hits every mode alike
            results.append(run(mode, args, args.device))

    def median(mode: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[mode]), 2)

    base = median("none", "around_ms")
    summary: dict[str, Any] = {
        "state_mib": round(args.layers * (args.width * args.width + args.width) * 4 * 3 / 2**20, 1),
        "device": args.device,
        **{
            mode: {
                "step_ms": median(mode, "step_ms"),
                "save_returned_ms": median(mode, "returned_ms"),
                "next_step_waited_ms": median(mode, "waited_ms"),
                "extra_ms_around_a_checkpoint": round(median(mode, "around_ms") - base, 2),
            }
            for mode in runs
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{summary['state_mib']:.0f} MiB of parameters + AdamW state on {args.device}; "
        f"a checkpoint every {args.every} steps; medians of {args.repeats} runs"
    )
    for mode in ("snapshot", "overlap"):
        r = summary[mode]
        print(
            f"  {mode:<9} save() blocked {r['save_returned_ms']:7.2f} ms + the next optimizer step waited "
            f"{r['next_step_waited_ms']:6.2f} ms; the two steps around a checkpoint took "
            f"{r['extra_ms_around_a_checkpoint']:7.2f} ms more than without (step {r['step_ms']:.1f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
