"""Leases: every writer's in-flight save is visible to every pruner, in any process.

Before it writes anything, a save writes ``.leases/<checkpoint id>.<rank>-<token>.json`` under the
root; the committing rank removes the checkpoint's leases after the manifest is written (an aborted
save removes its own). A pruner leaves a folder without a manifest alone while any of its leases is
unexpired, and collects it once they all have expired (its writer crashed), whatever its step.

Two orders make it safe. The lease lives outside the folder and is written before it, so a pruner
never sees a save's folder without its lease. The manifest is written before the leases go, and a
pruner reads the leases before it checks for a manifest again, so a save that commits while a
pruner looks is never taken for a leftover.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Final

from gpuguard.checkpoint._storage import Storage

FOLDER: Final = ".leases"


@dataclass(frozen=True)
class Lease:
    """One writer's claim on a checkpoint folder."""

    file: str
    rank: int
    attempt: str
    owner: str
    expires_at: float  # seconds since the epoch: leases are compared across machines

    def to_json(self) -> bytes:
        return json.dumps(
            {"rank": self.rank, "attempt": self.attempt, "owner": self.owner, "expires_at": self.expires_at}
        ).encode()


def take(storage: Storage, name: str, *, rank: int, attempt: str, lease_s: float) -> Lease:
    """Write a new lease on checkpoint ``name``: the first write of every save."""
    lease = Lease(
        file=f"{name}.{rank:05d}-{secrets.token_hex(6)}.json",
        rank=rank,
        attempt=attempt,
        owner=f"{socket.gethostname()}:{os.getpid()}",
        expires_at=time.time() + lease_s,
    )
    storage.put_atomic(storage.path(FOLDER, lease.file), lease.to_json())
    return lease


def held(storage: Storage, lease: Lease) -> bool:
    """Whether ``lease`` is still in place (nobody has released or collected it)."""
    try:
        storage.cat(storage.path(FOLDER, lease.file))
    except FileNotFoundError:
        return False
    return True


def leased(storage: Storage, now: float | None = None) -> set[str]:
    """The checkpoint ids with an unexpired lease; expired leases are removed on the way."""
    now = time.time() if now is None else now
    found = set()
    for file in storage.list_files(FOLDER):
        name = file.split(".", 1)[0]
        try:
            body: Any = json.loads(storage.cat(storage.path(FOLDER, file)))
            expires = float(body["expires_at"])
        except FileNotFoundError:
            continue  # released while we looked
        except (ValueError, KeyError, TypeError):
            found.add(name)  # written by something else; do not guess that it is stale
            continue
        if expires > now:
            found.add(name)
        else:
            storage.delete(storage.path(FOLDER, file))
    return found


def release(storage: Storage, name: str, only: Lease | None = None, *, deadline_s: float | None = None) -> None:
    """Remove ``only`` or, after a commit, every lease on checkpoint ``name``."""
    files = [only.file] if only else [f for f in storage.list_files(FOLDER) if f.startswith(name + ".")]
    for file in files:
        storage.delete(storage.path(FOLDER, file), deadline_s=deadline_s)
