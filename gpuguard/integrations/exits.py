"""Workers tell ``gpuguard-run`` why they left, through files in ``GPUGUARD_RUN_DIR``.

torchrun's agent records only the exit codes of the workers that failed first: when one worker is
SIGKILLed, the agent stops the others (SIGTERM, then SIGKILL after 30 s) and its error lists the dead
worker's -9 alone. The survivors' exit 75 — a checkpoint committed, reschedule the job — would be lost,
and the launcher would exit 1. So a worker leaving with a code the launcher must honour writes it here
first, and ``gpuguard-run`` (which sets the variable to a fresh folder) reads it back.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Final

ENV: Final = "GPUGUARD_RUN_DIR"


def record_exit(rank: int, code: int, message: str, **details: Any) -> None:
    """Say why this worker leaves (nothing when not launched by ``gpuguard-run``); never raises."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    doc = {"rank": rank, "exit_code": code, "message": message, **details}
    path = Path(folder) / f"exit-rank-{rank}.json"
    with contextlib.suppress(OSError):
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(doc))
        os.replace(partial, path)


def read_exits(folder: str | Path, *, clear: bool = False) -> list[dict[str, Any]]:
    """What the workers recorded, by rank; unreadable files are skipped. ``clear`` removes them (read once)."""
    found = []
    for path in sorted(Path(folder).glob("exit-rank-*.json")):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if isinstance(doc, dict) and isinstance(doc.get("exit_code"), int):
                found.append(doc)
        if clear:
            path.unlink(missing_ok=True)
    return found
