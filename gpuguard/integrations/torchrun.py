"""``gpuguard-run``: torchrun, plus a health check before and exit codes the cluster understands after.

It composes ``torch.distributed.run`` (same arguments) rather than copying it:

1. preflight: the node's GPUs are read once; a FAILING or LOST one means the job should not start
   here, and the wrapper exits 75 at once so the pod is rescheduled;
2. the workers run under torchrun with local restarts off;
3. a worker's exit 75 makes the wrapper exit 75 — no local restart on a bad GPU; a worker's 76
   restarts the workers in place, up to ``--max-restarts`` times (a fresh process on the same GPU
   is what a restart-class fault needs), and exits 76 once they are spent.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("gpuguard.run")

EXIT_FAILED = 1


def preflight(reschedule_code: int) -> int | None:
    """The exit code to leave with before launching, or None to launch."""
    from gpuguard.health.model import HealthState
    from gpuguard.health.monitor import HealthMonitor

    monitor = HealthMonitor(devices="all")
    snapshot = monitor.start(threads=False)
    monitor.stop()
    if not snapshot.available:
        log.warning("gpuguard-run: %s; launching without a preflight check", snapshot.error)
        return None
    bad = [d for d in snapshot.devices if d.state in (HealthState.FAILING, HealthState.LOST)]
    for device in bad:
        reason = device.reasons[0].message if device.reasons else ""
        print(f"gpuguard-run: GPU {device.index} ({device.uuid}) is {device.state.value}: {reason}", file=sys.stderr)
    return reschedule_code if bad else None


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = parse_args(list(argv) if argv is not None else None)  # type: ignore[no-untyped-call]
    reschedule, restart = 75, 76
    code = preflight(reschedule)
    if code is not None:
        return code
    restarts_left = int(args.max_restarts)
    args.max_restarts = 0  # the agent would restart on any failure; gpuguard restarts only on 76
    while True:
        try:
            run(args)  # type: ignore[no-untyped-call]
            return 0
        except ChildFailedError as exc:
            codes = {failure.exitcode for failure in exc.failures.values()}
            if reschedule in codes:
                print(f"gpuguard-run: a worker asked to be rescheduled (exit {reschedule})", file=sys.stderr)
                return reschedule
            if restart in codes and restarts_left > 0:
                restarts_left -= 1
                print(
                    f"gpuguard-run: a worker asked for a restart in place (exit {restart}); restarting", file=sys.stderr
                )
                continue
            if restart in codes:
                return restart
            print(exc, file=sys.stderr)
            return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
