"""The survivors agree, over the side channel and without the dead rank, on what to save.

1. Each survivor posts its check-in (``in/<rank>``): its last completed step, the step its live
   tensors hold, the steps of its own records.
2. The coordinator — the lowest rank its watch does not know to be dead — waits until every rank has
   checked in or is dead (its process gone, or its heartbeat silent for ``peer_timeout_s``), and at
   most ``checkin_s`` for a rank that beats but does not check in (its training thread is stuck
   elsewhere: it cannot take part). It decides (`gpuguard.peers._plan.decide`) and posts the plan
   with compare-and-set, so exactly one plan stands even if a second coordinator rose meanwhile.
   After ``checkin_s`` any survivor may post one.
3. Everyone acts on the plan that stands. A rank that is not among its members (it checked in late)
   writes nothing.
4. The committer posts ``done`` (or ``failed``); the others wait for it, so every survivor leaves
   knowing whether the checkpoint was committed.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from gpuguard.errors import SideChannelError
from gpuguard.peers._channel import SideChannel
from gpuguard.peers._plan import Cannot, CheckIn, Plan, decide, parse
from gpuguard.peers._records import StepRecords
from gpuguard.peers._watch import PeerWatch

POLL_S = 0.05


def agree(
    channel: SideChannel,
    watch: PeerWatch,
    records: StepRecords,
    checkin: CheckIn,
    *,
    world_size: int,
    groups: Sequence[tuple[str, Collection[int]]],
    checkpoint_id: Callable[[int], str],
    checkin_s: float,
    deadline: float,
) -> Plan | Cannot:
    """Post this rank's check-in and return the plan that stands (see the module docstring).

    Raises:
        SideChannelError: the side channel failed.
        TimeoutError: no plan by ``deadline`` (``time.monotonic()``).
    """
    channel.set(f"in/{checkin.rank}", checkin.to_json())
    started = time.monotonic()
    checkins: dict[int, CheckIn] = {}
    while True:
        posted = channel.get("plan")
        if posted is not None:
            return parse(posted)
        now = time.monotonic()
        alive = [r for r in range(world_size) if r not in watch.dead]
        coordinating = bool(alive) and alive[0] == checkin.rank
        if coordinating or now - started >= checkin_s:
            for rank in range(world_size):
                if rank not in checkins and rank not in watch.dead:
                    data = channel.get(f"in/{rank}")
                    if data is not None:
                        checkins[rank] = CheckIn.parse(data)
            waiting = [r for r in range(world_size) if r not in checkins and r not in watch.dead]
            if not waiting or now - started >= checkin_s:
                lost = [r for r in range(world_size) if r not in checkins]
                mirrored = {r: tuple(records.mirrored_records(r)) for r in lost}
                provisional = {r: getattr(records.mirrored_provisional(r), "step", None) for r in lost}
                attempt = f"survivors-{secrets.token_hex(6)}"
                decision = decide(
                    checkins,
                    world_size,
                    groups,
                    mirrored,
                    checkpoint_id=checkpoint_id,
                    attempt=attempt,
                    mirrored_provisional=provisional,
                )
                return parse(channel.first("plan", json.dumps(decision.to_dict()).encode()))
        if now >= deadline:
            raise TimeoutError(f"the survivors did not agree on a plan within {deadline - started:.1f}s")
        time.sleep(POLL_S)


def announce(channel: SideChannel, outcome: dict[str, Any]) -> None:
    """The committer's word to the others: ``{"committed": bool, ...}``."""
    channel.first("done", json.dumps(outcome).encode())


def wait_announced(channel: SideChannel, deadline: float) -> dict[str, Any] | None:
    """The committer's word, or None when it did not come by ``deadline``."""
    while True:
        try:
            posted = channel.get("done")
        except SideChannelError:
            posted = None
        if posted is not None:
            result: dict[str, Any] = json.loads(posted)
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)
