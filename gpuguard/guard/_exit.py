"""Closing guards that a program left open when it ends."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpuguard.guard.guard import Guard

log = logging.getLogger("gpuguard")

_open_guards: weakref.WeakSet[Guard] = weakref.WeakSet()
_hook: list[bool] = []  # installed once per process


def close_at_exit(guard: Guard) -> None:
    """A script that ends without ``with``/`close` must still commit its last periodic save.

    ``threading._register_atexit`` runs before ``concurrent.futures`` joins its workers (its callbacks
    run in reverse order of registration, and the executors registered theirs at import), so the
    store's writers still accept work; ``atexit`` would run too late ("cannot schedule new futures
    after interpreter shutdown").
    """
    _open_guards.add(guard)
    if _hook:
        return
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(_close_open_guards)
        else:  # pragma: no cover - every CPython since 3.9 has it
            import atexit

            atexit.register(_close_open_guards)
        _hook.append(True)
    except RuntimeError:  # already shutting down
        pass


def _close_open_guards() -> None:
    for guard in list(_open_guards):
        if not guard.running:
            continue
        pending = [p for p in guard.periodic if not p.done()]
        log.warning(
            "gpuguard: the program is ending with the guard still open (use `with gpuguard.Guard(...)` or call "
            "close()); %s",
            f"waiting for {len(pending)} periodic checkpoint(s) in flight" if pending else "closing it",
        )
        try:
            guard.close()
        except Exception as exc:
            log.error("gpuguard: closing the guard at exit failed: %s", exc)
            continue
        log.warning("gpuguard: at exit, %s", guard.resume_point_text())
