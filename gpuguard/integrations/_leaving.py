"""Leaving a framework's loop with the evacuation's exit code, whatever its teardown does.

A framework that catches the `gpuguard.Evacuation` to clean up (Lightning's ``on_exception`` hooks and
strategy teardown, a Trainer's ``finally`` blocks) runs code on a GPU that may have failed. When that
code raises, Python would end the process with exit code 1 and a traceback: the checkpoint is committed,
but the Job counts exit 1 against ``backoffLimit`` and reschedules nothing. `keep_exit_code` installs a
``sys.excepthook`` that spots an uncaught exception raised *while an Evacuation was being handled* (the
Evacuation is in its ``__context__``/``__cause__`` chain), logs it, and ends the process with the
evacuation's code once the interpreter has run its exit handlers (``atexit``).

Only that chain triggers it: an exception with no Evacuation behind it exits as Python decides.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from types import TracebackType

from gpuguard.guard._evacuation import Evacuation

log = logging.getLogger("gpuguard")

_installed: list[bool] = []
_exit_code: list[int] = []  # set by the hook: the code the process must end with


def keep_exit_code() -> None:
    """Install the hook (once per process; main interpreter only). Safe to call on every evacuation."""
    if _installed:
        return
    _installed.append(True)
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        evacuation = evacuation_behind(error)
        if evacuation is not None and not isinstance(error, SystemExit):
            log.error(
                "gpuguard: %s raised while leaving after the evacuation at step %d (the emergency checkpoint "
                "was handled before it); the process exits %d, not 1",
                kind.__name__,
                evacuation.step,
                int(evacuation.code or 0),
            )
            _exit_code[:] = [int(evacuation.code or 0)]
        previous(kind, error, tb)

    sys.excepthook = hook
    # Registered now, so it runs after the exit handlers registered later (atexit runs them last-in,
    # first-out): torch.distributed's, the loggers', the guard's own close.
    atexit.register(_exit_with_code)


def evacuation_behind(error: BaseException | None) -> Evacuation | None:
    """The `Evacuation` ``error`` is, or was raised while handling (its context/cause chain)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, Evacuation):
            return error
        error = error.__cause__ or error.__context__
    return None


def _exit_with_code() -> None:
    if not _exit_code or threading.current_thread() is not threading.main_thread():
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream: nothing left to lose
            stream.flush()
    logging.shutdown()
    os._exit(_exit_code[0])


def wait_for_parent_to_leave(timeout_s: float) -> bool:
    """Block until this process's parent has exited (it is re-parented), at most ``timeout_s``.

    Lightning's own DDP launcher (``Trainer(devices=N)`` without torchrun) runs rank 0 as the parent
    of the other ranks, and rank 0 SIGKILLs everything once it sees a child exit non-zero. A child
    that leaves with 75 before rank 0 has committed the manifest and left would turn rank 0's exit
    75 into a SIGKILL (137). The children wait for the parent instead.
    """
    import time

    parent = os.getppid()
    deadline = time.monotonic() + timeout_s
    while os.getppid() == parent:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
