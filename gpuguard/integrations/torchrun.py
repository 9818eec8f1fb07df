"""``gpuguard-run``: torchrun, plus a health check before and exit codes the cluster understands after.

It composes ``torch.distributed.run`` (same arguments) rather than copying it:

1. preflight: the node's GPUs are read once; a FAILING or LOST one means the job should not start
   here: the node is marked first (`gpuguard.k8s.gang.settle`), then the wrapper exits 75 so the pod
   is rescheduled elsewhere (exit 1, counted, when the mark cannot be confirmed);
2. the workers run under torchrun with local restarts off;
3. a worker's exit 75 makes the wrapper exit 75 — no local restart on a bad GPU; a worker's 76
   restarts the workers in place, up to ``--max-restarts`` times (a fresh process on the same GPU
   is what a restart-class fault needs), and exits 76 once they are spent;
4. SIGTERM (the kubelet stopping the pod) is forwarded to the workers, whose guards take an agreed
   emergency checkpoint and exit 75; the wrapper waits for them and exits with their code. (torchrun's
   own handling would terminate the workers, SIGKILL them after ``--shutdown-timeout``, and raise a
   traceback without their exit codes, so SIGTERM is taken out of its ``--signals-to-handle``.)
5. once a worker has left with 75 or 76, the others get ``--leave-grace-s`` (10 s) to leave on their
   own before torchrun's agent signals them — their last lines (a report, a metrics push,
   ``destroy_process_group``) run — never past the pod's termination grace period when the pod is
   being stopped; one still running then is named, and stopped by torchrun (``_leave_grace``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger("gpuguard.run")

EXIT_FAILED = 1
LEAVE_GRACE_ENV = "GPUGUARD_LEAVE_GRACE_S"


def preflight(reschedule_code: int) -> int | None:
    """The exit code to leave with before launching, or None to launch."""
    from gpuguard.health.model import HealthState
    from gpuguard.health.monitor import HealthMonitor

    monitor = HealthMonitor(devices="all")
    snapshot = monitor.start(threads=False)
    monitor.stop()
    if not snapshot.available:
        # Said on stderr, not only logged: the job is about to train with nothing watching its GPUs.
        if os.environ.get("GPUGUARD_HEALTH_FAIL_MODE", "open").strip().lower() == "closed":
            print(f"gpuguard-run: GPU health cannot be read ({snapshot.error}); fail_mode=closed", file=sys.stderr)
            return reschedule_code
        print(
            f"gpuguard-run: GPU health cannot be read ({snapshot.error}); launching UNMONITORED (fail_mode=open)",
            file=sys.stderr,
        )
        return None
    bad = [d for d in snapshot.devices if d.state in (HealthState.FAILING, HealthState.LOST)]
    for device in bad:
        reason = device.reasons[0].message if device.reasons else ""
        print(f"gpuguard-run: GPU {device.index} ({device.uuid}) is {device.state.value}: {reason}", file=sys.stderr)
    if not bad:
        return None
    from gpuguard.k8s.gang import settle

    return settle(reschedule_code, bad=bad)


def _children() -> list[int]:
    """This process's children: torchrun starts each worker with ``Popen(start_new_session=True)``,
    so a signal to the wrapper reaches none of them unless forwarded (Linux ``/proc``)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(entry.name))
    return found


class Forwarder:
    """Forwards preemption signals to the workers and remembers that the job is being stopped."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = list(signals)
        self.received: signal.Signals | None = None
        self.received_at: float | None = None  # time.monotonic()

    def install(self) -> None:
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        if self.received_at is None:
            self.received_at = time.monotonic()
        workers = _children()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):  # a worker that ended meanwhile
                os.kill(pid, signum)
        if not workers:
            # Nothing has started training yet: nothing to save. Leave as the signal asks.
            raise SystemExit(128 + signum)
        print(
            f"gpuguard-run: {self.received.name} forwarded to {len(workers)} worker(s); waiting for their checkpoint",
            file=sys.stderr,
        )


def _preemption_signals() -> list[signal.Signals]:
    """The workers' guards read the same variable: the wrapper forwards what they catch."""
    from gpuguard.guard.config import parse_signal_names

    names = parse_signal_names(os.environ.get("GPUGUARD_PREEMPTION_SIGNALS", "SIGTERM"))
    return [signal.Signals[name] for name in names]


HELP = """\
torchrun (torch.distributed.run, same arguments), with what gpuguard adds:

  preflight    the node's GPUs are read once before anything starts; a FAILING or LOST GPU (or, with
               GPUGUARD_HEALTH_FAIL_MODE=closed, GPUs whose health cannot be read) makes gpuguard-run
               exit 75 at once, so that the pod is scheduled elsewhere
  exit codes   a worker's 75 (reschedule: its guard took an agreed emergency checkpoint on a bad GPU)
               makes gpuguard-run exit 75, with no local restart; a worker's 76 (restart in place)
               restarts the workers up to --max-restarts times, then exits 76. torchrun's own restarts
               on other failures are off; any other failure exits 1
  leave grace  once a worker has exited 75 or 76, the others get --leave-grace-s to finish and leave on
               their own before torchrun signals them; one still running then is named, then stopped
  signals      SIGTERM (and GPUGUARD_PREEMPTION_SIGNALS) is forwarded to the workers, whose guards
               checkpoint an agreed step and exit 75; gpuguard-run exits with their code (128 + the
               signal's number when the workers, without a guard, die of it), never a traceback

gpuguard's own options are at the end; GPUGUARD_FAKE_NVML=h200 (or a scenario file) puts a whole job
through a fault on a machine without GPUs. torchrun's description and options follow.

Torch Distributed Elastic Training Launcher"""


def _grace_s(raw: str) -> float:
    from gpuguard.integrations._leave_grace import parse_grace_s

    try:
        return parse_grace_s(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (--leave-grace-s or {LEAVE_GRACE_ENV})") from None


def build_parser() -> argparse.ArgumentParser:
    """torchrun's own parser, with gpuguard-run's options added in a group of their own."""
    from torch.distributed.run import get_args_parser

    from gpuguard.cli._help import DefaultsFormatter
    from gpuguard.integrations._leave_grace import DEFAULT_LEAVE_GRACE_S

    parser = get_args_parser()
    parser.prog = "gpuguard-run"
    parser.formatter_class = DefaultsFormatter
    parser.description = HELP
    ours = parser.add_argument_group("gpuguard-run")
    ours.add_argument(
        "--leave-grace-s",
        "--leave_grace_s",
        type=_grace_s,
        default=os.environ.get(LEAVE_GRACE_ENV, f"{DEFAULT_LEAVE_GRACE_S:g}"),
        metavar="SECONDS",
        help=(
            "once a worker exits 75 or 76, how long the others may take to leave on their own before "
            "torchrun signals them (never past the pod's termination grace period, GPUGUARD_TERMINATION_GRACE_S, "
            f"once the pod is being stopped); 0: at once. Default: {LEAVE_GRACE_ENV} or {DEFAULT_LEAVE_GRACE_S:g}"
        ),
    )
    return parser


def _termination_grace_s() -> float | None:
    """The pod's ``terminationGracePeriodSeconds``, as ``gpuguard k8s manifests`` passes it (the guard checks it)."""
    raw = os.environ.get("GPUGUARD_TERMINATION_GRACE_S", "").strip()
    try:
        value = float(raw) if raw else math.nan
    except ValueError:
        value = math.nan
    return value if math.isfinite(value) and value > 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    from gpuguard.integrations._leave_grace import LeaveGrace, installed

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    reschedule, restart = 75, 76
    code = preflight(reschedule)
    if code is not None:
        return code
    restarts_left = int(args.max_restarts)
    args.max_restarts = 0  # the agent would restart on any failure; gpuguard restarts only on 76
    forwarder = Forwarder(_preemption_signals())
    ours = {s.name for s in forwarder.signals}
    args.signals_to_handle = ",".join(
        s for s in (n.strip() for n in str(args.signals_to_handle).split(",")) if s and s not in ours
    )
    forwarder.install()
    termination_grace_s = _termination_grace_s()

    def pod_kill_at() -> float | None:
        if forwarder.received_at is None or termination_grace_s is None:
            return None
        return forwarder.received_at + termination_grace_s

    grace = LeaveGrace(float(args.leave_grace_s), frozenset((reschedule, restart)), pod_kill_at)
    while True:
        try:
            with installed(grace):
                run(args)  # type: ignore[no-untyped-call]
            return 0
        except ChildFailedError as exc:
            codes = {failure.exitcode for failure in exc.failures.values()}
            if forwarder.received is not None and reschedule not in codes:
                # Workers without a guard die by the signal: say so in one line, exit as the signal would.
                ended = f"workers ended by {forwarder.received.name}: exits {sorted(codes)}"
                print(f"gpuguard-run: {ended}", file=sys.stderr)
                return 128 + int(forwarder.received)
            if reschedule in codes:
                print(f"gpuguard-run: a worker asked to be rescheduled (exit {reschedule})", file=sys.stderr)
                from gpuguard.k8s.gang import settle

                # a health evacuation counts in the budget (77 once spent); a preemption does not
                return reschedule if forwarder.received is not None else settle(reschedule)
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
