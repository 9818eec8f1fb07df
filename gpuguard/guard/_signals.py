"""Preemption signals: SIGTERM (node drain, eviction, preemption, spot reclaim) and friends.

The handler only records the signal: the training thread acts on it at its next ``step()``, where
every rank can agree on one step to checkpoint. It chains to the handler installed before it, so a
user's own handler still runs, and the old handlers come back on `PreemptionSignals.restore`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("gpuguard")

_said: set[str] = set()  # once per process


class PreemptionSignals:
    """Installs handlers for the named signals that call ``on_signal(signum)`` and chain on."""

    def __init__(self, names: list[str], on_signal: Callable[[int], None]) -> None:
        self.names = names
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def install(self) -> list[str]:
        """Install the handlers; returns the names installed (none off the main thread)."""
        if not self.names:
            return []
        if threading.current_thread() is not threading.main_thread():
            # CPython lets only the main thread set signal handlers (signal.signal raises ValueError).
            if "not-main" not in _said:
                _said.add("not-main")
                log.warning(
                    "gpuguard: the guard started off the main thread, so it cannot catch %s; a preemption "
                    "will end this process without an emergency checkpoint (start the guard on the main thread)",
                    ", ".join(self.names),
                )
            return []
        for name in self.names:
            signum = int(getattr(signal, name))
            self._previous[signum] = signal.signal(signum, self._handle)
        return list(self.names)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._on_signal(signum)
        previous = self._previous.get(signum)
        # Chain to a handler the user installed; SIG_DFL would end the process before the checkpoint,
        # and Python's default SIGINT handler would raise KeyboardInterrupt mid-step.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def restore(self) -> None:
        """Put the previous handlers back (where ours is still the one installed)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
