"""Demoted checkpoints: committed and verified, but found bad after a restore, and never resumed from again.

A checkpoint is immutable, so a demotion is a separate small file beside it: ``demoted/<id>.json`` under
the root, holding why (the reason, the step, the ranks, the numbers) and when. It is written through
`Storage.put_atomic` (the storage's deadline and retries), so it outlives the process that wrote it: a
restart, a new pod or another tool sees it, and `CheckpointStore.latest`, `CheckpointStore.load` (without
an explicit id) and `Guard.resume` pass over the checkpoint. A person who decides the checkpoint was fine
after all deletes its marker.

Markers are never deleted by gpuguard: pruning deletes a demoted checkpoint's folder once it is older than
those kept, and leaves its marker (a few hundred bytes), for a node-local tier may still hold a copy of the
same id.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

from gpuguard.checkpoint._manifest import CHECKPOINT_DIR
from gpuguard.checkpoint._storage import Storage

log = logging.getLogger("gpuguard.checkpoint")

FOLDER: Final = "demoted"
SUFFIX: Final = ".json"


def demoted_ids(storage: Storage) -> set[str]:
    """The ids of the demoted checkpoints (one listing; the markers are not read)."""
    names = storage.list_files(FOLDER)
    return {n[: -len(SUFFIX)] for n in names if n.endswith(SUFFIX) and CHECKPOINT_DIR.match(n[: -len(SUFFIX)])}


def read_demoted(storage: Storage) -> dict[str, dict[str, Any]]:
    """Every demoted id with its marker (a marker that cannot be parsed still demotes: ``{"unreadable": ...}``)."""
    found: dict[str, dict[str, Any]] = {}
    for checkpoint_id in sorted(demoted_ids(storage)):
        try:
            record = json.loads(storage.cat(storage.path(FOLDER, checkpoint_id + SUFFIX)))
        except FileNotFoundError:
            continue  # removed since the listing: no longer demoted
        except ValueError as exc:
            record = {"unreadable": str(exc)}
        found[checkpoint_id] = record if isinstance(record, dict) else {"unreadable": repr(record)}
    return found


def demote(storage: Storage, checkpoint_id: str, reason: str, details: Mapping[str, Any]) -> None:
    """Write ``checkpoint_id``'s marker (replacing one already there). Raises `StorageError` when it fails."""
    record = {"id": checkpoint_id, "reason": reason, "demoted_at": time.time(), **dict(details)}
    storage.put_atomic(storage.path(FOLDER, checkpoint_id + SUFFIX), json.dumps(record, default=str).encode())
