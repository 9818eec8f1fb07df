"""A rank lost without warning: time to detect, to a committed checkpoint, steps replayed — and goodput.

    python benchmarks/sudden_loss.py [--ranks 4] [--trials 5] [--ballast-mib 64] [--layout ddp|hsdp] [--json]

Each trial launches ``--ranks`` gloo processes under gpuguard-run (`gpuguard.demo.sudden_worker`: DDP
with ``replicated=True``, or FSDP2 on a 2 x N/2 HSDP mesh with ``--layout hsdp``) and SIGKILLs a random
rank at a random step and moment (forward, the all-reduce in backward, between steps, during a periodic
save, inside the optimizer step). From the survivors' reports: seconds from the kill to every survivor
knowing, to the committed checkpoint, and to the survivors' exit; steps the resume computes again. One
relaunch measures restart and restore. Figures are medians and maxima over the trials. ``--ballast-mib``
adds replicated state that never changes (sharded like the model under HSDP), so the survivors' save
writes that much more.

Then the per-step cost of mirroring a rank's small state (RNGs and a progress dict) to the launcher's
store, in this process against a local TCPStore; and the goodput model's table at 128 x 8 GPUs with
the storage bandwidth charged, for periodic checkpoints alone, gpuguard, and gpuguard with
just-in-time saves (with the detection time measured here).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gpuguard.demo.sudden import PHASES, Kill, run_trial, summarize  # noqa: E402
from gpuguard.goodput import GoodputInputs, compare  # noqa: E402


def trials(ranks: int, count: int, steps: int, ballast_mib: float, seed: int, layout: str) -> list[dict[str, Any]]:
    chooser = random.Random(seed)
    results = []
    for number in range(count):
        phase = PHASES[number % len(PHASES)]
        step = chooser.choice([4, 8]) if phase == "periodic" else chooser.randint(2, steps - 3)
        kill = Kill(chooser.randrange(ranks), step, phase)
        folder = Path(tempfile.mkdtemp(prefix="gpuguard-sudden-"))
        try:
            trial = run_trial(
                folder,
                ranks,
                kill,
                steps=steps,
                layout=layout,
                periodic_every=4,
                resume=number == 0,
                ballast_mib=ballast_mib,
            )
            results.append(trial.accounting())
            print(f"[sudden_loss] trial {number}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def mirror_cost(calls: int) -> dict[str, float]:
    """µs per ``guard.step`` for capturing and mirroring one rank's per-rank state (RNGs, a progress dict)."""
    import datetime as dt

    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    from gpuguard.guard._state import checkpointable
    from gpuguard.peers._channel import SideChannel
    from gpuguard.peers._records import StepRecords, capture

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=dt.timedelta(seconds=10))
    channel = SideChannel(TCPStore("127.0.0.1", port, is_master=False), "bench", kind="agent")
    records = StepRecords(channel, 0)
    view = checkpointable({"progress": {"epoch": 3, "batch": 1234, "seen": 5_000_000}})
    samples = []
    for step in range(calls):
        started = time.perf_counter()
        records.keep(capture(0, step, view))
        samples.append(time.perf_counter() - started)
    del server
    samples.sort()
    return {
        "median_us": round(statistics.median(samples) * 1e6, 1),
        "p90_us": round(samples[int(0.9 * len(samples))] * 1e6, 1),
        "record_bytes": len(records.mine(calls - 1).to_bytes()),  # type: ignore[union-attr]
    }


def _step_cost_worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    import logging
    import os

    import torch
    import torch.distributed as dist

    from gpuguard import Guard

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)  # two processes on a few cores: no oversubscribed thread pools
    # As under torchrun: the store lives in another process (the agent's, here the benchmark's), and every
    # worker, rank 0 too, is a client of it.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GPUGUARD_FAKE_NVML="h200", TORCHELASTIC_USE_AGENT_STORE="True"
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for sudden in (False, True, False, True):  # interleaved: the machine's load moves
        model = torch.nn.Linear(64, 64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        state = {"model": model, "optimizer": optimizer, "progress": {"epoch": 0, "batch": 0}}
        folder = tempfile.mkdtemp(prefix="gpuguard-bench-")
        samples = []
        with Guard(checkpoint_dir=folder, state=state, checkpoint_every_s=0, sudden_loss=sudden, sync_every=10**6) as g:
            for step in range(steps):
                model(torch.ones(4, 64)).sum().backward()
                started = time.perf_counter()
                optimizer.step()  # with sudden_loss, its pre-hook mirrors the provisional state
                state["progress"]["batch"] = step
                g.step(step)  # with sudden_loss, mirrors this rank's state of the step
                samples.append(time.perf_counter() - started)
                optimizer.zero_grad()
        shutil.rmtree(folder, ignore_errors=True)
        results.setdefault(str(sudden), []).extend(samples[steps // 10 :])
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def step_cost(steps: int) -> dict[str, float]:
    """Median µs of ``optimizer.step()`` + ``guard.step()`` on 2 gloo ranks with sudden-loss protection off and
    on (a 64 x 64 model, AdamW, a progress dict; the store in another process, as torchrun's agent hosts it):
    the difference is what mirroring costs each step (the provisional record in the optimizer's pre-hook,
    the step's record in ``guard.step``)."""
    import datetime as dt

    import torch.multiprocessing as mp
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=dt.timedelta(seconds=60))
    out = tempfile.mktemp(prefix="gpuguard-bench-", suffix=".json")
    mp.spawn(_step_cost_worker, args=(2, port, steps, out), nprocs=2, join=True)  # type: ignore[no-untyped-call]
    del agent
    found = json.loads(Path(out).read_text())
    Path(out).unlink()
    off, on = (statistics.median(found[k]) * 1e6 for k in ("False", "True"))
    return {"off_us": round(off, 1), "on_us": round(on, 1), "added_us": round(on - off, 1)}


def goodput(detect_s: float | None) -> dict[str, Any]:
    base = compare(GoodputInputs(nodes=128, gpus_per_node=8), check=True, failures=100_000).to_dict()
    out = {"defaults": base}
    if detect_s is not None:
        measured = GoodputInputs(nodes=128, gpus_per_node=8, jit_detect_s=detect_s)
        out["measured_detection"] = compare(measured, check=True, failures=100_000).to_dict()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ballast-mib", type=float, default=64.0)
    p.add_argument("--mirror-calls", type=int, default=2000)
    p.add_argument("--cost-steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("ddp", "hsdp"), default="ddp", help="hsdp: FSDP2 on a 2 x (ranks/2) mesh")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.layout == "hsdp" and (args.ranks < 4 or args.ranks % 2):
        p.error(f"--ranks {args.ranks}: an HSDP mesh of 2 replicas needs an even number of ranks, at least 4")
    runs = trials(args.ranks, args.trials, args.steps, args.ballast_mib, args.seed, args.layout)
    saved = [r for r in runs if r["result"] == "saved"]
    summary = {
        key: summarize([r[key] for r in saved])
        for key in ("detect_s", "committed_s", "survivors_left_s", "steps_replayed")
    }
    first = runs[0] if runs else {}
    doc = {
        "ranks": args.ranks,
        "layout": args.layout,
        "trials": len(runs),
        "saved": len(saved),
        "ballast_mib": args.ballast_mib,
        "summary": summary,
        "restart_s": first.get("restart_s"),
        "restore_s": first.get("restore_s"),
        "launcher_exits": sorted({r["launcher_exit"] for r in runs}),
        "mirror_per_step": mirror_cost(args.mirror_calls),
        "step_cost": step_cost(args.cost_steps),
        "runs": runs,
        "goodput": goodput(summary["detect_s"]["median"]),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"sudden loss: {args.ranks} gloo ranks ({args.layout}), {len(runs)} trials ({len(saved)} saved), "
        f"ballast {args.ballast_mib} MiB"
    )
    print(f"{'':<34}{'median':>10}{'max':>10}")
    for key, label in (
        ("detect_s", "kill -> every survivor knows (s)"),
        ("committed_s", "kill -> checkpoint committed (s)"),
        ("survivors_left_s", "kill -> survivors exited (s)"),
        ("steps_replayed", "steps replayed"),
    ):
        print(f"{label:<34}{summary[key]['median']!s:>10}{summary[key]['max']!s:>10}")
    print(f"launcher exit codes: {doc['launcher_exits']}; restart {doc['restart_s']} s, restore {doc['restore_s']} s")
    m = doc["mirror_per_step"]
    print(f"mirroring per step: {m['median_us']} µs median, {m['p90_us']} µs p90, {m['record_bytes']} bytes")
    c = doc["step_cost"]
    print(
        f"optimizer.step() + guard.step(), 2 gloo ranks: {c['off_us']} µs without, {c['on_us']} µs with "
        f"(+{c['added_us']})"
    )
    for label, g in doc["goodput"].items():
        print(
            f"\ngoodput at 128 x 8 GPUs ({label.replace('_', ' ')}), storage {g['assumptions']['storage_bandwidth']}:"
        )
        names = ("periodic", "gpuguard", "gpuguard_jit")
        print(f"{'':<30}" + "".join(f"{g[n]['name']:>26}" for n in names))
        for key, fmt in (("goodput", "{:.2%}"), ("best_interval_s", "{:.0f} s"), ("best_goodput", "{:.2%}")):
            print(f"{key:<30}" + "".join(f"{fmt.format(g[n][key]):>26}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
