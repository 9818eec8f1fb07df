"""A torchrun worker that only leaves, for gpuguard-run's leave grace (no torch, no guard: fast).

Rank 0 waits until rank 1 is ready, then exits with ``--code`` (75 or 76), as an evacuated rank does.
Rank 1 stands for a peer that still has its last lines to run:

- ``--peer go``: it waits for the file ``go`` (the test creates it once gpuguard-run has said it is
  waiting), writes ``rank-1.json`` and exits with ``--code``;
- ``--peer stay``: it never leaves on its own; a SIGTERM (torchrun's) is recorded and ends it, except
  that with ``--rank0-on-sigterm`` the first one (forwarded from the kubelet) is recorded and ignored,
  as a guard's handler does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType


def wait_for(path: Path) -> None:
    while not path.exists():  # the test's hang guard (pytest-timeout) bounds this, not a deadline here
        time.sleep(0.02)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--code", type=int, default=75)
    p.add_argument("--peer", choices=["go", "stay"], default="go")
    p.add_argument("--rank0-on-sigterm", action="store_true", help="rank 0 leaves when signalled, not at once")
    args = p.parse_args()
    rank = int(os.environ["RANK"])
    if rank == 0:
        if args.rank0_on_sigterm:
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(args.code))
        wait_for(args.dir / "ready-1")
        if args.rank0_on_sigterm:
            (args.dir / "ready-0").write_text(str(os.getpid()))
            while True:
                signal.pause()
        return args.code

    terms: list[float] = []

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        terms.append(time.monotonic())
        (args.dir / "rank-1.sigterm").write_text(str(len(terms)))
        if args.peer == "go" or len(terms) > int(args.rank0_on_sigterm):
            sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    (args.dir / "ready-1").write_text(str(os.getpid()))
    if args.peer == "stay":
        while True:
            signal.pause()
    wait_for(args.dir / "go")
    (args.dir / "rank-1.json").write_text(json.dumps({"rank": 1, "exit_code": args.code, "pid": os.getpid()}))
    return args.code


if __name__ == "__main__":
    sys.exit(main())
