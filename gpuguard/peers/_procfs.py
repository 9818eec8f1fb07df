"""What Linux's /proc says about processes and sockets: a peer's process gone, this process's TCP sockets.

Two uses, both on the sudden-loss path only:

- A rank on this host whose process is gone (or a zombie, or its pid reused: the start time differs)
  is dead now; no heartbeat timeout needs to pass. Ranks of one pod share a pid namespace.
- Shutting down gloo's sockets: torch 2.13's gloo cannot be aborted. ``ProcessGroup.abort()`` and
  ``shutdown()`` return at once and leave a collective blocked on a peer that never answers (measured
  on this project's machine: the wait ended only when the peer's process exited). gloo fails a pair
  whose socket reaches end of stream ("Connection closed by peer", gloo/transport/tcp/pair.cc), and
  ``shutdown(2)`` acts on the socket itself, not on the descriptor used to call it, so shutting down a
  duplicate of each of gloo's descriptors ends every collective blocked on them with gloo's own error.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_ESTABLISHED: Final = "01"
_LISTEN: Final = "0A"


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie or dead task: it runs no more code
        return None
    return int(fields[19])


def process_alive(pid: int, start: int | None) -> bool:
    """The process ``pid`` that started at ``start`` still runs (False once it exited, even if reaped late)."""
    now = process_start(pid)
    return now is not None and (start is None or now == start)


@dataclass(frozen=True)
class TcpSocket:
    fd: int
    local_port: int
    remote_port: int
    state: str


def tcp_sockets() -> list[TcpSocket]:
    """This process's TCP sockets (IPv4 and IPv6) with their ports; empty where /proc is not Linux's."""
    inodes: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = int(fd)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            parts = line.split()
            if len(parts) > 9 and parts[9] in inodes:
                local, remote = (int(p.rsplit(":", 1)[1], 16) for p in (parts[1], parts[2]))
                found.append(TcpSocket(inodes[parts[9]], local, remote, parts[3]))
    return found


def listening_ports(exclude: set[int]) -> list[int]:
    """Ports this process listens on, but ``exclude`` (the store's): gloo's listener among them."""
    return sorted({s.local_port for s in tcp_sockets() if s.state == _LISTEN and s.local_port not in exclude})


def shut_down_connections(own_listeners: set[int], peer_listeners: set[int], keep: set[int]) -> int:
    """Shut down this process's TCP connections accepted on ``own_listeners`` or made to a port in
    ``peer_listeners``; connections touching a port in ``keep`` (the side channel's) stay. Returns how many.

    Only connections between the job's own ranks match: checkpoint storage, the store and any other
    client connection go to ports no rank listens on.
    """
    done = 0
    for sock in tcp_sockets():
        if sock.state != _ESTABLISHED or sock.local_port in keep or sock.remote_port in keep:
            continue
        if sock.local_port not in own_listeners and sock.remote_port not in peer_listeners:
            continue
        try:
            dup = socket.socket(fileno=os.dup(sock.fd))
        except OSError:  # gloo closed it meanwhile (a pair that failed already)
            continue
        with dup, contextlib.suppress(OSError):
            dup.shutdown(socket.SHUT_RDWR)
            done += 1
    return done
