"""What the training loop loses to periodic checkpoints: gpuguard (overlap on and off), DCP ``async_save``
and ``torch.save``, against the same loop without checkpoints, in one run.

    python benchmarks/loop_slowdown.py [--state-gib 1] [--every 10] [--checkpoints 3] [--repeats 2] [--warmup-runs 1]
                                       [--device cpu|cuda] [--json]

The model is an ``nn.Sequential`` of ``Linear`` layers trained with AdamW, sized so that parameters and
the two moments are ``--state-gib`` in all. Every mode trains the same model for ``(checkpoints + 1) *
every - 1`` timed steps (after two untimed warm-up steps) and checkpoints at steps ``every, 2*every, ...``,
so the last checkpoint has ``every - 1`` steps to finish its background write inside the timed loop. The
modes run interleaved, repeat by repeat, so drift on a shared machine hits every mode alike:

- ``none``: the loop alone (the reference);
- ``gpuguard``: ``Guard(checkpoint_every_steps=every, overlap_snapshot=False)``: the snapshot is copied
  before ``guard.step`` returns, the write runs in the background;
- ``gpuguard_overlap``: the same with ``overlap_snapshot=True``: parameters and optimizer state are copied
  while the next forward and backward run; only the next ``optimizer.step()`` waits for the copy;
- ``dcp_async``: ``torch.distributed.checkpoint.async_save`` of the model's and optimizer's state dicts
  (its default staging), waiting for the previous one before the next, as DCP's documentation asks;
- ``torch_save``: ``torch.save`` of the same state dicts to a file, then fsync (synchronous).

Reported per mode: the loop's seconds, the extra seconds per checkpoint against ``none``
((T_mode - T_none) / checkpoints, medians of the repeats), and the slowdown that extra time is at a
checkpoint every ``--interval-s`` seconds of training (60 by default): extra / interval. That mapping
holds while each checkpoint's background write finishes within the interval (``kept_up`` says whether
it finished within ``every`` steps here, a much shorter interval), because then the cost of one
checkpoint does not depend on how far apart they are. The slowdown at the run's own, shorter interval
(``every`` steps) is reported too. Each mode's last checkpoint is loaded back (untimed): a benchmark of
checkpoints nobody could restore measures nothing.

On a shared machine the load drifts between runs by more than a checkpoint costs, so a second estimate
comes from each run alone (``in_run_*``): the time its steps took above the run's own median step, less
the same figure of the ``none`` runs (their skew without checkpoints), per checkpoint. It holds while
the checkpoints disturb fewer than half of the steps (the median stays a clean step).

Two figures do not depend on the load: ``call_s``, the seconds the checkpoint call itself held the
training thread at a due step (gpuguard's snapshot, DCP's staging, all of ``torch.save``; with overlap on,
the copy's wait falls in the next ``optimizer.step()`` instead, and only the in-run figures see it), and
``cpu_s_per_checkpoint``, the CPU seconds the process spent beyond the ``none`` runs', per checkpoint: what
a checkpoint takes from the host's cores, all of it from training when training uses every core. With
``--threads 1`` on a 2-core machine the loop leaves a core free for the background work, as a GPU job's
host does; with every core training, the loop pays for the background's CPU as well as for the stall.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MODES = ("none", "gpuguard", "gpuguard_overlap", "dcp_async", "torch_save")


class Loop:
    """One model and optimizer, trained by every mode in turn (building 1 GiB of state once)."""

    def __init__(self, state_gib: float, width: int, batch: int, device: str) -> None:
        per_layer = width * width + width
        self.layers = max(1, round(state_gib * 2**30 / (3 * 4 * per_layer)))  # params + two AdamW moments, fp32
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(self.layers)]).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.x = torch.randn(batch, width, device=device)
        self.state_bytes = 3 * 4 * per_layer * self.layers
        self.train_step()  # AdamW creates its moments in its first step

    def train_step(self) -> float:
        loss = self.model(self.x).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.item())  # a real loop reads its loss: on a GPU this waits for the step

    def state_dicts(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}


def run_mode(mode: str, loop: Loop, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Train ``(checkpoints + 1) * every - 1`` timed steps in ``mode``; the loop's time and what it saved."""
    timed = (args.checkpoints + 1) * args.every - 1
    for _ in range(2):  # warm-up, untimed
        loop.train_step()
    saver = _SAVERS[mode](loop, args, folder)
    saver.begin()
    kept_up: list[bool] = []
    steps: list[float] = []
    calls: list[float] = []  # the checkpoint calls' own seconds on the training thread, at the due steps
    cpu_started = _cpu_s()
    started = time.perf_counter()
    for step in range(1, timed + 1):
        begun = time.perf_counter()
        loop.train_step()
        called = time.perf_counter()
        kept_up.extend(saver.after_step(step))
        ended = time.perf_counter()
        if saver.due(step):
            calls.append(ended - called)
        steps.append(ended - begun)
    seconds = time.perf_counter() - started
    # Time above the run's own median step: what the checkpoints added, measured against the load of the
    # same minutes (a shared machine's load drifts between runs far more than a checkpoint costs).
    excess = sum(steps) - len(steps) * statistics.median(steps)
    durable = saver.finish()
    cpu_s = _cpu_s() - cpu_started  # the process's CPU over the timed loop and the last save's finish
    restored = saver.restore_check() if mode != "none" else True
    shutil.rmtree(folder, ignore_errors=True)
    gc.collect()
    return {
        "seconds": seconds,
        "excess_s": excess,
        "call_s": statistics.median(calls) if calls else 0.0,
        "cpu_s": cpu_s,
        "steps": timed,
        "kept_up": all(kept_up),
        "durable_s": durable,
        "restored": restored,
    }


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads (a background write's cost to the host)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Saver:
    def __init__(self, loop: Loop, args: argparse.Namespace, folder: Path) -> None:
        self.loop, self.args, self.folder = loop, args, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.durable: list[float] = []

    def due(self, step: int) -> bool:
        return step % self.args.every == 0 and step <= self.args.checkpoints * self.args.every

    def begin(self) -> None:
        pass

    def after_step(self, step: int) -> list[bool]:
        return []

    def finish(self) -> float:
        return statistics.median(self.durable) if self.durable else 0.0

    def restore_check(self) -> bool:
        return True


class _NoCheckpoints(_Saver):
    pass


class _Gpuguard(_Saver):
    overlap = False

    def begin(self) -> None:
        from gpuguard import Guard

        self.guard = Guard(
            checkpoint_dir=f"file://{self.folder}",
            state={"model": self.loop.model, "optimizer": self.loop.optimizer},
            checkpoint_every_steps=self.args.every,
            checkpoint_every_s=None,
            keep=1,
            overlap_snapshot=self.overlap,
        ).start()
        self.guard.step(0)  # plans the staging buffer (allocated in the background), as a job's first step does
        self.pending: list[Any] = []

    def after_step(self, step: int) -> list[bool]:
        self.guard.step(step)  # saves at every multiple of `every`: the timed steps hold `checkpoints` of them
        if not self.due(step):
            return []
        earlier = list(self.pending)
        self.pending = [p for p in self.guard.periodic if p.step == step] + earlier
        return [p.done() for p in earlier[:1]]  # the previous checkpoint finished within the interval

    def finish(self) -> float:
        self.guard.close()
        self.durable = [p.timings.durable_s for p in self.pending if p.timings.durable_s is not None]
        return super().finish()

    def restore_check(self) -> bool:
        from gpuguard import CheckpointStore

        with CheckpointStore(f"file://{self.folder}") as store:
            report = store.verify()
            latest = store.latest()
        return bool(report.ok) and latest is not None and latest.step == self.args.checkpoints * self.args.every


class _GpuguardOverlap(_Gpuguard):
    overlap = True


class _DcpAsync(_Saver):
    def begin(self) -> None:
        self.future: Any = None
        self.started = 0.0
        self.last: Path | None = None

    def after_step(self, step: int) -> list[bool]:
        import torch.distributed.checkpoint as dcp

        if not self.due(step):
            return []
        kept = [self.future.done()] if self.future is not None else []
        self._settle()
        target = self.folder / f"step-{step}"
        self.started = time.perf_counter()
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            self.future = dcp.async_save(self.loop.state_dicts(), checkpoint_id=str(target))
        self.future.add_done_callback(lambda _, t=self.started: self.durable.append(time.perf_counter() - t))
        if self.last is not None:
            shutil.rmtree(self.last, ignore_errors=True)  # the previous one is complete: disk holds two at most
        self.last = target
        return kept

    def _settle(self) -> None:
        if self.future is not None:
            self.future.result()  # DCP asks for the previous async_save to finish before the next

    def finish(self) -> float:
        self._settle()
        return super().finish()

    def restore_check(self) -> bool:
        import torch.distributed.checkpoint as dcp

        assert self.last is not None
        model = {k: torch.zeros_like(v) for k, v in self.loop.model.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": model}, checkpoint_id=str(self.last))
        return all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in model.values())


class _TorchSave(_Saver):
    def after_step(self, step: int) -> list[bool]:
        if not self.due(step):
            return []
        started = time.perf_counter()
        path = self.folder / "checkpoint.pt"
        with open(path, "wb") as f:
            torch.save(self.loop.state_dicts(), f)
            f.flush()
            os.fsync(f.fileno())
        self.durable.append(time.perf_counter() - started)
        return [True]

    def restore_check(self) -> bool:
        saved = torch.load(self.folder / "checkpoint.pt", weights_only=True)
        return set(saved["model"]) == set(self.loop.model.state_dict())


_SAVERS: dict[str, type[_Saver]] = {
    "none": _NoCheckpoints,
    "gpuguard": _Gpuguard,
    "gpuguard_overlap": _GpuguardOverlap,
    "dcp_async": _DcpAsync,
    "torch_save": _TorchSave,
}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every mode, interleaved repeat by repeat; the summary (see the module's docstring)."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    loop = Loop(args.state_gib, args.width, args.batch, args.device)
    root = Path(tempfile.mkdtemp(prefix="gpuguard-loop-", dir=args.dir))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    try:
        # One untimed run of every mode first: a machine's first minute with a new 1 GiB state (page faults,
        # allocator growth, each saver's imports and buffers) ran every mode up to 2x slower than the next
        # (none: 34.7 s, then 15.1 s, on an idle 2-core machine), which no median of two repeats survives.
        for _ in range(args.warmup_runs):
            for mode in args.modes:
                print(f"warm-up: {mode}", file=sys.stderr, flush=True)
                run_mode(mode, loop, args, root / mode)
        for repeat in range(args.repeats):
            for mode in args.modes:
                print(f"repeat {repeat + 1}/{args.repeats}: {mode}", file=sys.stderr, flush=True)
                runs[mode].append(run_mode(mode, loop, args, root / mode))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(r["seconds"] for r in runs["none"])
    base_excess = statistics.median(r["excess_s"] for r in runs["none"])
    base_cpu = statistics.median(r["cpu_s"] for r in runs["none"])
    steps = runs["none"][0]["steps"]
    step_s = base / steps
    own_interval_s = step_s * args.every
    summary: dict[str, Any] = {
        "command": "python benchmarks/loop_slowdown.py " + " ".join(sys.argv[1:]),
        "device": args.device,
        "state_gib": round(loop.state_bytes / 2**30, 3),
        "layers": loop.layers,
        "width": args.width,
        "step_s": round(step_s, 4),
        "every_steps": args.every,
        "checkpoints_per_run": args.checkpoints,
        "own_interval_s": round(own_interval_s, 2),
        "interval_s": args.interval_s,
        "repeats": args.repeats,
        "warmup_runs": args.warmup_runs,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "none_seconds": [round(r["seconds"], 3) for r in runs["none"]],
        "modes": {},
    }
    for mode in args.modes:
        if mode == "none":
            continue
        seconds = statistics.median(r["seconds"] for r in runs[mode])
        extra = (seconds - base) / args.checkpoints
        in_run = (statistics.median(r["excess_s"] for r in runs[mode]) - base_excess) / args.checkpoints
        summary["modes"][mode] = {
            "seconds": [round(r["seconds"], 3) for r in runs[mode]],
            "extra_s_per_checkpoint": round(extra, 4),
            "slowdown_at_interval": round(extra / args.interval_s, 5),
            "slowdown_at_own_interval": round(extra / own_interval_s, 5),
            "in_run_extra_s_per_checkpoint": round(in_run, 4),
            "in_run_slowdown_at_interval": round(in_run / args.interval_s, 5),
            "call_s": round(statistics.median(r["call_s"] for r in runs[mode]), 4),
            "cpu_s_per_checkpoint": round(
                (statistics.median(r["cpu_s"] for r in runs[mode]) - base_cpu) / args.checkpoints, 3
            ),
            "durable_s": round(statistics.median(r["durable_s"] for r in runs[mode]), 3),
            "kept_up": all(r["kept_up"] for r in runs[mode]),
            "restored": all(r["restored"] for r in runs[mode]),
        }
    return summary


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--state-gib", type=float, default=1.0, help="parameters + AdamW moments, fp32")
    parser.add_argument("--width", type=int, default=2048, help="the Linear layers' width")
    parser.add_argument("--batch", type=int, default=16, help="rows per step (sets the step's compute)")
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints per timed run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; medians reported")
    parser.add_argument("--warmup-runs", type=int, default=1, help="untimed runs of every mode before the repeats")
    parser.add_argument("--interval-s", type=float, default=60.0, help="the interval the slowdown is stated at")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    parser.add_argument("--dir", default=None, help="where checkpoints go (a temporary folder under it)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if "none" not in args.modes:
        args.modes = ["none", *args.modes]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.getLogger("gpuguard").setLevel(logging.ERROR)
    summary = measure(args)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{summary['state_gib']} GiB state ({summary['layers']} x Linear({args.width})) + AdamW on {args.device}; "
        f"step {summary['step_s'] * 1000:.0f} ms; a checkpoint every {args.every} steps "
        f"({summary['own_interval_s']:.1f} s), {args.checkpoints} per run; medians of {args.repeats}; "
        f"load average {summary['load_average']}"
    )
    at = f"at {args.interval_s:g} s"
    print(
        f"{'mode':<18} {'extra s/ckpt':>12} {at:>10} {'at own':>8} {'in-run s/ckpt':>13} {at:>10} "
        f"{'call s':>7} {'cpu s/ckpt':>10} {'durable s':>10}"
    )
    for mode, m in summary["modes"].items():
        print(
            f"{mode:<18} {m['extra_s_per_checkpoint']:>12.3f} {m['slowdown_at_interval'] * 100:>9.2f}% "
            f"{m['slowdown_at_own_interval'] * 100:>7.2f}% {m['in_run_extra_s_per_checkpoint']:>13.3f} "
            f"{m['in_run_slowdown_at_interval'] * 100:>9.2f}% "
            f"{m['call_s']:>7.3f} {m['cpu_s_per_checkpoint']:>10.2f} {m['durable_s']:>10.2f}"
            + ("" if m["kept_up"] else "  (a write outlasted the interval)")
            + ("" if m["restored"] else "  (the last checkpoint did NOT load back)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
