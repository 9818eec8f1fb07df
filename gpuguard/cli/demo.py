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
    p.add_argument("--steps", type=int, default=200, help="training steps")
    p.add_argument("--fault-step", type=int, default=120, help="the step at which the GPU reports XID 48")
    p.add_argument("--json", action="store_true", help="print only a JSON summary")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gpuguard.demo import run_demo

    if not 0 < args.fault_step < args.steps:
        from gpuguard.errors import ConfigError

        raise ConfigError("--fault-step", args.fault_step, f"must be between 0 and --steps ({args.steps})")
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    result = run_demo(args.dir, steps=args.steps, fault_step=args.fault_step, say=say)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    return 0 if result.identical and result.steps_lost == 0 else 1
