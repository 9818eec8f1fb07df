"""``gpuguard demo``: the full cycle on CPU with a fake GPU (see `gpuguard.demo`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="detect a failing GPU, checkpoint, exit 75, resume elsewhere, compare with an uninterrupted run",
        description="Runs on CPU with the fake NVML; exits 0 only when the resumed run is bitwise identical.",
    )
    p.add_argument("--dir", type=Path, help="where to keep checkpoints and reports (default: a temporary folder)")
    p.add_argument("--steps", type=int, help="training steps (default: 200; 30 with --sudden)")
    p.add_argument("--fault-step", type=int, default=120, help="the step at which the GPU reports XID 48")
    p.add_argument(
        "--sudden",
        action="store_true",
        help="instead: SIGKILL one of several ranks mid-step without warning; the survivors save the last completed "
        "step, gpuguard-run exits 75, a relaunch resumes bitwise identical",
    )
    p.add_argument("--ranks", type=int, default=3, help="with --sudden: ranks (gloo processes on this machine)")
    p.add_argument("--kill-rank", type=int, default=1, help="with --sudden: the rank that dies")
    p.add_argument("--kill-step", type=int, help="with --sudden: the step it dies in (default: past the middle)")
    p.add_argument(
        "--kill-phase",
        default="backward",
        choices=("forward", "backward", "between", "periodic", "optimizer"),
        help="with --sudden: where in the step it dies",
    )
    p.add_argument("--json", action="store_true", help="print only a JSON summary")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.sudden:
        return run_sudden(args)
    args.steps = args.steps or 200
    from gpuguard.demo import run_demo

    if not 0 < args.fault_step < args.steps:
        from gpuguard.errors import ConfigError

        raise ConfigError("--fault-step", args.fault_step, f"must be between 0 and --steps ({args.steps})")
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    result = run_demo(args.dir, steps=args.steps, fault_step=args.fault_step, say=say)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    return 0 if result.identical and result.steps_lost == 0 else 1


def run_sudden(args: argparse.Namespace) -> int:
    from gpuguard.demo.sudden import Kill, run_sudden_demo
    from gpuguard.errors import ConfigError

    steps = args.steps or 30
    if args.ranks < 2:
        raise ConfigError("--ranks", args.ranks, "must be 2 or more: a survivor saves the lost rank's state")
    if not 0 <= args.kill_rank < args.ranks:
        raise ConfigError("--kill-rank", args.kill_rank, f"must be from 0 to --ranks - 1 = {args.ranks - 1}")
    step = args.kill_step if args.kill_step is not None else steps // 2 + 2
    if not 1 <= step < steps - 1:
        raise ConfigError("--kill-step", step, f"must be from 1 to --steps - 2 = {steps - 2}")
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    kill = Kill(args.kill_rank, step, args.kill_phase)
    trial = run_sudden_demo(args.dir, nproc=args.ranks, steps=steps, kill=kill, say=say)
    if args.json:
        print(json.dumps(trial.accounting(), indent=2))
    saved = trial.outcome.get("result") == "saved"
    return 0 if saved and trial.identical and trial.first.code == 75 else 1
