"""Leases: every writer's in-flight save is visible to every pruner, in any process, for as long as it runs.

Before it writes anything, a save writes ``.leases/<checkpoint id>.<rank>-<token>.json`` under the
root, and a heartbeat thread rewrites it every ``lease_s / 8`` with a new expiry ``lease_s`` ahead, for
as long as the save runs: a slow link or a long commit wait never lets it lapse. The committing rank
removes the checkpoint's leases after the manifest is written (an aborted save removes its own). A
pruner leaves a folder without a manifest alone while any of its leases is live, and collects it once
they are all gone: expired (their writer stopped renewing: it crashed, or lost the storage), or held by
a writer known to be dead (a process on the same machine and in the same PID namespace as the pruner
that no longer runs: a worker torchrun restarted, a crash loop in one container), whatever its step.

Three orders make it safe. The lease lives outside the folder and is written before it, so a pruner
never sees a save's folder without its lease. The manifest is written before the leases go, and a
pruner reads the leases before it checks for a manifest again, so a save that commits while a pruner
looks is never taken for a leftover. And a writer commits only while its lease is valid by its own
clock with a margin of ``lease_s / 4`` (a renewal counts only if it completed inside that margin, and a
lapse is final): a pruner, which needs the lease expired by its clock, never collects a save that may
still commit, as long as the clocks agree within that margin (NTP keeps them within milliseconds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from gpuguard.checkpoint._storage import Storage
from gpuguard.errors import StorageError

log = logging.getLogger("gpuguard.checkpoint")

FOLDER: Final = ".leases"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _started(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc/<pid>/stat field 22), or None if there is none."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # after "pid (comm)", the 22nd field is the 20th left
    except (IndexError, ValueError):
        return None


def this_process() -> dict[str, Any]:
    """Who writes a lease: enough for a pruner on the same machine to tell whether the writer still runs."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": _pid_namespace(),
        "started": _started(pid),
    }


def writer_is_dead(process: Any) -> bool:
    """True only when a lease's writer provably no longer runs: it ran under this kernel (same boot) and
    in this PID namespace, and its PID is gone or now names a process started at another time.

    Anything else (another machine, another container, a lease written by an older gpuguard) is
    unknown, and then only its expiry frees the folder.
    """
    if not isinstance(process, dict) or process.get("boot_id") is None or process.get("started") is None:
        return False
    me = this_process()
    if process.get("boot_id") != me["boot_id"] or process.get("pid_namespace") != me["pid_namespace"]:
        return False
    try:
        pid = int(process["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return bool(_started(pid) != process["started"])


@dataclass(frozen=True)
class Lease:
    """One writer's claim on a checkpoint folder."""

    file: str
    rank: int
    attempt: str
    owner: str
    expires_at: float  # seconds since the epoch when taken: leases are compared across machines
    process: dict[str, Any] = field(default_factory=dict, compare=False)
    heartbeat: Heartbeat | None = field(default=None, compare=False, repr=False)

    def to_json(self, expires_at: float | None = None) -> bytes:
        return json.dumps(
            {
                "rank": self.rank,
                "attempt": self.attempt,
                "owner": self.owner,
                "expires_at": self.expires_at if expires_at is None else expires_at,
                "process": self.process,
            }
        ).encode()


class Heartbeat:
    """Renews a lease every ``lease_s / 8`` on its own thread while its save runs.

    The lease is valid until its last counted expiry minus ``lease_s / 4``: six renewals in a row may
    fail (or the thread be starved that long) before it lapses. A renewal counts only if it completed
    within that validity; once the lease has lapsed the save can no longer commit, and no later
    renewal revives it.
    """

    def __init__(self, storage: Storage, lease_s: float, expires_at: float) -> None:
        self.storage = storage
        self.lease: Lease  # set by `take`, which builds the lease around its heartbeat
        self.lease_s = lease_s
        self.margin = lease_s / 4
        self.valid_until = expires_at
        self.lapsed = False
        self.renewals = 0
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gpuguard-lease-heartbeat", daemon=True)

    def start(self) -> None:
        with _beating_lock:
            _beating.setdefault(self.lease.file.split(".", 1)[0], set()).add(self)
        self._thread.start()

    def valid(self) -> bool:
        with self._lock:
            return not self.lapsed and time.time() < self.valid_until - self.margin

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
        with _beating_lock:
            _beating.get(self.lease.file.split(".", 1)[0], set()).discard(self)

    def _run(self) -> None:
        while not self._stopped.wait(self.lease_s / 8):
            self.renew()

    def renew(self) -> None:
        started = time.time()
        with self._lock:
            left = self.valid_until - self.margin - started
            if self.lapsed or self._stopped.is_set():
                return
            if left <= 0:
                self.lapsed = True
                log.warning("the lease of %s lapsed: the save can no longer commit", self.lease.file)
                self._stopped.set()
                return
        path = self.storage.path(FOLDER, self.lease.file)
        try:
            self.storage.put_atomic(
                path,
                self.lease.to_json(expires_at=started + self.lease_s),
                deadline_s=min(left, self.storage.retry.deadline_s),
            )
        except StorageError as exc:
            log.warning("could not renew the lease %s (%s); retrying in %.1fs", self.lease.file, exc, self.margin)
            return
        with self._lock:
            if self._stopped.is_set():  # released meanwhile: do not leave a renewed lease behind
                with contextlib.suppress(StorageError):
                    self.storage.delete(path, deadline_s=self.margin)
                return
            if time.time() < self.valid_until - self.margin:
                self.valid_until = started + self.lease_s
                self.renewals += 1
            else:  # landed too late to count: a pruner may have judged the old expiry meanwhile
                self.lapsed = True
                self._stopped.set()


_beating: dict[str, set[Heartbeat]] = {}  # by checkpoint id: what `release` stops before removing leases
_beating_lock = threading.Lock()


def take(storage: Storage, name: str, *, rank: int, attempt: str, lease_s: float) -> Lease:
    """Write a new lease on checkpoint ``name`` (the first write of every save) and start renewing it."""
    expires = time.time() + lease_s
    heartbeat = Heartbeat(storage, lease_s, expires)
    lease = Lease(
        file=f"{name}.{rank:05d}-{secrets.token_hex(6)}.json",
        rank=rank,
        attempt=attempt,
        owner=f"{socket.gethostname()}:{os.getpid()}",
        expires_at=expires,
        process=this_process(),
        heartbeat=heartbeat,
    )
    heartbeat.lease = lease
    storage.put_atomic(storage.path(FOLDER, lease.file), lease.to_json())
    heartbeat.start()
    return lease


def stop(lease: Lease | None) -> None:
    """Stop renewing ``lease`` (its file stays until released, or until it expires)."""
    if lease is not None and lease.heartbeat is not None:
        lease.heartbeat.stop()


def held(storage: Storage, lease: Lease) -> bool:
    """Whether ``lease`` is still valid: renewed in time, and in place (nobody released or collected it)."""
    if lease.heartbeat is not None and not lease.heartbeat.valid():
        return False
    try:
        storage.cat(storage.path(FOLDER, lease.file))
    except FileNotFoundError:
        return False
    return True


def sweep(storage: Storage, now: float | None = None) -> tuple[set[str], set[str]]:
    """(ids with a live lease, ids with a lease that expired or whose writer is known dead); the leases
    of the second kind are removed on the way."""
    now = time.time() if now is None else now
    live, gone = set(), set()
    for file in storage.list_files(FOLDER):
        name = file.split(".", 1)[0]
        try:
            body: Any = json.loads(storage.cat(storage.path(FOLDER, file)))
            expires = float(body["expires_at"])
        except FileNotFoundError:
            continue  # released while we looked
        except (ValueError, KeyError, TypeError):
            live.add(name)  # written by something else; do not guess that it is stale
            continue
        if expires > now and not writer_is_dead(body.get("process")):
            live.add(name)
            continue
        if expires > now:
            log.info("lease %s: its writer no longer runs; its save is a leftover", file)
        storage.delete(storage.path(FOLDER, file))
        gone.add(name)
    return live, gone - live


def leased(storage: Storage, now: float | None = None) -> set[str]:
    """The checkpoint ids with a live lease; expired leases and those of dead writers are removed on the way."""
    return sweep(storage, now)[0]


def release(storage: Storage, name: str, only: Lease | None = None, *, deadline_s: float | None = None) -> None:
    """Remove ``only`` or, after a commit, every lease on checkpoint ``name`` (their renewals stop first)."""
    if only is not None:
        stop(only)
    else:
        with _beating_lock:
            beating = list(_beating.get(name, ()))
        for heartbeat in beating:
            heartbeat.stop()
    files = [only.file] if only else [f for f in storage.list_files(FOLDER) if f.startswith(name + ".")]
    for file in files:
        storage.delete(storage.path(FOLDER, file), deadline_s=deadline_s)
