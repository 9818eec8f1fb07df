"""The other workers' time to leave on their own once one of them has asked to be moved (exit 75 or 76).

Why it is needed: torchrun's agent ends the whole worker group at the first worker that fails, and an
evacuated worker "fails" with 75 or 76. Its peers are then at the same agreed step, their shards
durable, with only their last lines to run (a report, a metrics push, an experiment tracker's final
write, ``destroy_process_group``) — and the agent's SIGTERM cuts them, since their guards have already
restored the default handlers.

Where torch 2.13 does it, and so where gpuguard-run waits (it composes torchrun and copies none of it):

- ``SimpleElasticAgent._invoke_run`` (torch/distributed/elastic/agent/server/api.py) sleeps
  ``monitor_interval`` (0.1 s), calls ``self._monitor_workers(group)``, and on ``FAILED`` with no
  restarts left calls ``_stop_workers``; on ``HEALTHY`` it just loops again.
- ``LocalElasticAgent._monitor_workers`` (local_elastic_agent.py) calls ``self._pcontext.wait(0)``,
  i.e. ``SubprocessContext._poll`` (torch/distributed/elastic/multiprocessing/api.py), which closes the
  context — ``os.killpg(SIGTERM)`` to every running worker, SIGKILL 30 s later — in the same call that
  first sees ANY worker failed ("if ALL procs are finished or ANY have failed: self.close()").

So the only place to give a grace period is before ``_monitor_workers`` reaches ``_poll``: this agent
peeks at its workers' exits with ``waitid(WNOWAIT)`` — which leaves each exit for torch's own
``Popen.poll`` to collect — and, while a worker has left with 75/76 and others still run, reports the
group ``HEALTHY`` so that torch's loop waits. When every worker has left, or the grace is over, it hands
over to torch's ``_monitor_workers`` unchanged: the exits reach gpuguard-run as torch reports them,
and a worker still running is stopped by torch's own close, after gpuguard-run has named it.

``launch_agent`` (torch/distributed/launcher/api.py) builds its agent from the module-level name
``LocalElasticAgent`` and takes no agent factory, so :func:`installed` points that one name at this
subclass for the duration of a launch, after checking it is the class it expects.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.elastic.agent.server.api import RunResult, Worker, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

DEFAULT_LEAVE_GRACE_S = 10.0
# gpuguard-run needs this long after the grace to stop the workers left and exit with its own code
# before the kubelet's SIGKILL.
KILL_MARGIN_S = 2.0


@dataclass(frozen=True)
class LeaveGrace:
    """How long the other workers may take to leave once one has left with one of ``codes``.

    Attributes:
        seconds: the grace period, from the agent's first sight of such an exit.
        codes: the exit codes that start it (the guard's reschedule and restart codes).
        pod_kill_at: when the kubelet will SIGKILL the pod (``time.monotonic()``), if known: the pod
            is being stopped and its termination grace period is known. The grace never runs past it
            less ``KILL_MARGIN_S``.
    """

    seconds: float
    codes: frozenset[int]
    pod_kill_at: Callable[[], float | None] = field(default=lambda: None)

    def deadline(self, started: float) -> float:
        end = started + self.seconds
        kill_at = self.pod_kill_at()
        if kill_at is not None:
            end = min(end, kill_at - KILL_MARGIN_S)
        return end


def parse_grace_s(raw: str) -> float:
    """``--leave-grace-s`` / ``GPUGUARD_LEAVE_GRACE_S``: seconds, 0 or more (0: no grace, torchrun's behaviour)."""
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"leave grace {raw!r}: must be a number of seconds, 0 or more")
    return value


def exit_status(pid: int) -> int | None:
    """A child's exit, as ``Popen.returncode`` would show it (negative: killed by that signal), without
    collecting it; None while it runs."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # already collected by torch: it left, its code is torch's to report
        return 0
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _name(worker: Worker) -> str:
    return f"rank {worker.global_rank} (local rank {worker.local_rank}, pid {worker.id})"


class GraceAgent(LocalElasticAgent):
    """torchrun's local agent, but a worker's 75/76 gives its peers ``grace`` to leave before they are stopped."""

    def __init__(self, *args: Any, grace: LeaveGrace, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._grace = grace
        self._first_leaver: tuple[frozenset[int], float, float] | None = None  # (workers' pids, since, until)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        if self._grace.seconds > 0 and self._waiting(worker_group):
            return RunResult(state=WorkerState.HEALTHY)
        return super()._monitor_workers(worker_group)  # type: ignore[no-any-return]

    def _waiting(self, group: WorkerGroup) -> bool:
        """Whether to keep waiting: a worker left with a grace code and others still run, within the grace."""
        exits = {worker.local_rank: exit_status(int(worker.id)) for worker in group.workers}
        running = [w for w in group.workers if exits[w.local_rank] is None]
        leavers = [w for w in group.workers if exits[w.local_rank] in self._grace.codes]
        if not running or not leavers:
            return False
        pids = frozenset(int(w.id) for w in group.workers)
        now = time.monotonic()
        if self._first_leaver is None or self._first_leaver[0] != pids:  # a new group after a restart
            self._first_leaver = (pids, now, self._grace.deadline(now))
            print(
                f"gpuguard-run: {_name(leavers[0])} left with exit {exits[leavers[0].local_rank]}; the other "
                f"{len(running)} worker(s) have up to {max(0.0, self._first_leaver[2] - now):.1f} s to leave on "
                "their own (--leave-grace-s)",
                file=sys.stderr,
                flush=True,
            )
        _, since, until = self._first_leaver
        if now < until:
            return True
        for worker in running:
            print(
                f"gpuguard-run: {_name(worker)} did not leave within {now - since:.1f} s; torchrun stops it now "
                "(SIGTERM, then SIGKILL after 30 s)",
                file=sys.stderr,
                flush=True,
            )
        return False


@contextlib.contextmanager
def installed(grace: LeaveGrace) -> Iterator[None]:
    """torchrun's launches inside this block use :class:`GraceAgent` (see the module's docstring for why a name)."""
    import torch.distributed.launcher.api as launcher

    found = getattr(launcher, "LocalElasticAgent", None)
    if found is not LocalElasticAgent:
        raise RuntimeError(
            "gpuguard-run: torch.distributed.launcher.api.LocalElasticAgent is not torch's own class "
            f"({found!r}); cannot give workers a grace period to leave"
        )
    setattr(launcher, "LocalElasticAgent", functools.partial(GraceAgent, grace=grace))  # noqa: B010
    try:
        yield
    finally:
        setattr(launcher, "LocalElasticAgent", LocalElasticAgent)  # noqa: B010
