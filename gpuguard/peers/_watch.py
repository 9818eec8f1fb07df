"""Noticing a dead peer: heartbeats on the side channel, a ring of watchers, one alarm for all.

Every rank's ``gpuguard-peers`` thread writes its heartbeat (a sequence number, its last completed
step, its GPU's health) every ``heartbeat_s`` and watches one neighbour, the next live rank in the
ring: a neighbour whose heartbeat has not changed for ``timeout_s`` by the watcher's own clock is
dead, and so is one on this host whose process is gone (at once, from /proc). The first rank to see
a death sets the alarm; every rank reads that one key each beat. So a death is known to every rank
within ``timeout_s + 2 x heartbeat_s`` (3 s + 1 s by default; under 0.5 s on one host), and the
store serves three small operations per rank per beat whatever the job's size. Several ranks dead at
once: any set of dead ranks short of all has one whose ring predecessor lives, so one alarm is raised;
after it, every rank watches every other, and `dead` collects them all.

A rank that is alive but was declared dead (a stall longer than ``timeout_s``) sees the alarm like the
others and joins the survivors if it can; its cost is a checkpoint and a restart, never a wrong one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpuguard.errors import SideChannelError
from gpuguard.peers._channel import SideChannel
from gpuguard.peers._procfs import listening_ports, process_alive, process_start

log = logging.getLogger("gpuguard.peers")


@dataclass(frozen=True)
class Registration:
    """Where a rank runs: its host and process (for the same-host check) and the ports it listens on."""

    rank: int
    host: str
    pid: int
    start: int | None
    listeners: tuple[int, ...]

    @classmethod
    def parse(cls, data: bytes) -> Registration:
        doc = json.loads(data)
        return cls(int(doc["rank"]), str(doc["host"]), int(doc["pid"]), doc["start"], tuple(doc["listeners"]))


@dataclass(frozen=True)
class Alarm:
    """The first death seen: who, by whom, why, and when (wall clock, seconds since the epoch)."""

    lost: int
    by: int
    why: str
    at: float

    def to_json(self) -> bytes:
        return json.dumps({"lost": self.lost, "by": self.by, "why": self.why, "at": self.at}).encode()

    @classmethod
    def parse(cls, data: bytes) -> Alarm:
        doc = json.loads(data)
        return cls(int(doc["lost"]), int(doc["by"]), str(doc["why"]), float(doc["at"]))


class PeerWatch:
    """This rank's heartbeat and its watch over the others.

    Args:
        channel: the side channel.
        rank, world_size: this rank and the job's size.
        heartbeat_s: seconds between beats.
        timeout_s: a heartbeat unchanged this long means the rank is dead.
        keep_ports: the side channel's ports (never among the job's listeners).
        health: this rank's GPU health in a few words, sent with each beat (read on this thread).

    Example:
        >>> import torch.distributed as dist
        >>> from gpuguard.peers._channel import SideChannel
        >>> watch = PeerWatch(SideChannel(dist.HashStore(), "doc", kind="agent"), 0, 1, heartbeat_s=0.5, timeout_s=3)
        >>> watch.alarm is None
        True
    """

    def __init__(
        self,
        channel: SideChannel,
        rank: int,
        world_size: int,
        *,
        heartbeat_s: float,
        timeout_s: float,
        keep_ports: set[int] | None = None,
        health: Callable[[], str] | None = None,
    ) -> None:
        self.channel = channel
        self.rank = rank
        self.world_size = world_size
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.keep_ports = set(keep_ports or ())
        self.health = health or (lambda: "")
        self.step = -1  # the last step this rank completed, written by the training thread
        self.alarm: Alarm | None = None
        self.dead: dict[int, str] = {}  # rank -> why, once confirmed
        self.left: set[int] = set()  # ranks that closed their guard normally
        self.last_heard: dict[int, dict[str, Any]] = {}  # rank -> its last heartbeat
        self.listeners: tuple[int, ...] = ()
        self._alarmed = threading.Event()
        self._subscribers: list[Callable[[Alarm], None]] = []
        self._registrations: dict[int, Registration] = {}
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (sequence, when it last changed)
        self._seq = 0
        self._failing_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Register, beat once, and start watching (call once the process groups exist)."""
        self.listeners = tuple(listening_ports(self.keep_ports))
        me = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": process_start(os.getpid()),
            "listeners": list(self.listeners),
        }
        self.channel.set(f"reg/{self.rank}", json.dumps(me).encode())
        self._beat()
        self._thread = threading.Thread(target=self._run, name="gpuguard-peers", daemon=True)
        self._thread.start()

    def stop(self, *, goodbye: bool = True) -> None:
        """Stop beating. ``goodbye``: say first that this rank leaves normally (its guard closed), so that no
        peer takes it for lost; a rank leaving on an error of its own says nothing, and its peers save."""
        if goodbye and self._thread is not None and not self._stop.is_set():
            try:
                self.channel.set(f"bye/{self.rank}", b"1")
            except SideChannelError as exc:  # the others may take this rank for lost: said, nothing else to do
                log.warning("gpuguard: could not say goodbye on the side channel: %s", exc)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2 * self.heartbeat_s + 1)

    def subscribe(self, callback: Callable[[Alarm], None]) -> None:
        """``callback(alarm)`` once, on the watch thread (or at once if the alarm is already up)."""
        with self._lock:
            self._subscribers.append(callback)
            alarm = self.alarm
        if alarm is not None:
            callback(alarm)

    def wait_for_alarm(self, timeout_s: float) -> Alarm | None:
        self._alarmed.wait(timeout_s)
        return self.alarm

    # -- what the survivors read ----------------------------------------------------------------

    def registration(self, rank: int) -> Registration | None:
        if rank not in self._registrations:
            data = self.channel.get(f"reg/{rank}")
            if data is not None:
                self._registrations[rank] = Registration.parse(data)
        return self._registrations.get(rank)

    def peer_listeners(self) -> set[int]:
        """The ports the other ranks listen on (gloo's among them), from their registrations."""
        ports: set[int] = set()
        for rank in range(self.world_size):
            if rank != self.rank:
                try:
                    found = self.registration(rank)
                except SideChannelError:
                    continue
                if found is not None:
                    ports.update(found.listeners)
        return ports - self.keep_ports

    def raise_alarm(self, lost: int, why: str) -> Alarm:
        """Say that ``lost`` is dead (idempotent: the first alarm written stands)."""
        self.dead.setdefault(lost, why)
        mine = Alarm(lost, self.rank, why, time.time())
        try:
            standing = Alarm.parse(self.channel.first("alarm", mine.to_json()))
        except SideChannelError as exc:  # the others find out by their own watch; this rank acts now
            log.error("gpuguard: could not post the alarm on the side channel: %s", exc)
            standing = mine
        self._sound(standing)
        return standing

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
                if self.alarm is None:
                    posted = self.channel.get("alarm")
                    if posted is not None:
                        self._sound(Alarm.parse(posted))
                watched = self._watched()
                for rank in watched:
                    self._check(rank)
                self._failing_since = None
            except SideChannelError as exc:
                self._channel_failed(exc)
            except Exception as exc:  # never into the training thread; said with its traceback
                log.error("gpuguard: the peer watch failed: %s", exc, exc_info=exc)

    def _beat(self) -> None:
        self._seq += 1
        beat = {"seq": self._seq, "step": self.step, "health": self.health(), "t": round(time.time(), 3)}
        self.channel.set(f"hb/{self.rank}", json.dumps(beat).encode())

    def _watched(self) -> list[int]:
        """The next live rank in the ring; every rank once an alarm is up."""
        others = [(self.rank + i) % self.world_size for i in range(1, self.world_size)]
        alive = [r for r in others if r not in self.dead and r not in self.left]
        if self.alarm is not None:
            return alive
        return alive[:1]

    def _check(self, rank: int) -> None:
        now = time.monotonic()
        data = self.channel.get(f"hb/{rank}")
        if data is not None:
            beat = json.loads(data)
            self.last_heard[rank] = beat
            seq = int(beat["seq"])
            if rank not in self._seen or self._seen[rank][0] != seq:
                self._seen[rank] = (seq, now)
        else:
            self._seen.setdefault(rank, (-1, now))  # never heard: it gets a full timeout from now
        found = self.registration(rank)
        if found is not None and found.host == socket.gethostname() and not process_alive(found.pid, found.start):
            self._declare(rank, f"rank {rank}'s process (pid {found.pid} on {found.host}) is gone")
            return
        quiet = now - self._seen[rank][1]
        if quiet >= self.timeout_s:
            self._declare(rank, f"rank {rank} sent no heartbeat for {quiet:.1f}s (peer_timeout_s={self.timeout_s:g})")

    def _declare(self, rank: int, why: str) -> None:
        if rank in self.dead or rank in self.left:
            return
        if self.channel.get(f"bye/{rank}") is not None:  # it closed its guard: the job is ending, not losing it
            self.left.add(rank)
            return
        log.error("gpuguard: %s", why)
        if self.alarm is None:
            self.raise_alarm(rank, why)
        else:
            self.dead[rank] = why

    def _sound(self, alarm: Alarm) -> None:
        with self._lock:
            if self.alarm is not None:
                return
            self.alarm = alarm
            self.dead.setdefault(alarm.lost, alarm.why)
            subscribers = list(self._subscribers)
        self._alarmed.set()
        for callback in subscribers:
            try:
                callback(alarm)
            except Exception as exc:
                log.error("gpuguard: acting on the peer alarm failed: %s", exc, exc_info=exc)

    def _channel_failed(self, exc: SideChannelError) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("gpuguard: %s", exc)
        elif (
            now - self._failing_since >= self.timeout_s and self.alarm is None and not self.channel.outlives_every_rank
        ):
            # The store lives in rank 0's process: silence from it is rank 0's death (or its host's).
            why = f"the side channel hosted by rank 0 stopped answering for {now - self._failing_since:.1f}s ({exc})"
            log.error("gpuguard: %s", why)
            self.dead.setdefault(0, why)
            self._sound(Alarm(0, self.rank, why, time.time()))
