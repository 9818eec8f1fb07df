"""Deciding, from the survivors' check-ins, which step they save and who writes what — or why they cannot.

Pure logic (no I/O): the coordinator runs it once and posts the result; every survivor acts on that.

What a survivor holds: its live parameters and optimizer state are those of its last completed step
unless it has entered an optimizer step since (parameters change only in ``optimizer.step()``, and
DDP and FSDP issue no collective there, so a peer's death cannot interrupt one half-way; but the rank
that died may have been in one, and a survivor may have finished the next step's before it noticed).
So the step ``S`` saved is the newest one such that:

- every replica group (the ranks holding the same tensors: all ranks under DDP with
  ``replicated=True``; the ranks at one shard coordinate under HSDP; each rank alone otherwise) has a
  survivor whose live tensors are those of ``S``;
- every rank's own small state (RNG, data position) at ``S`` is known: a survivor's from its own
  record, a dead rank's from the copy it mirrored before its ``step`` returned.

The files of every rank of the job (dead ones too) are written as that rank would have written them,
each by a survivor holding ``S`` in the rank's group, so the checkpoint is the one the whole job would
have saved at ``S``: same layout, same world size, loaded by the usual resume.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CheckIn:
    """A survivor's report: the last step it completed, the step its live tensors hold (None inside an
    optimizer step), the steps of its own per-rank records, the step of its provisional record (taken as
    its last optimizer step began) and the steps whose provisional record equalled the final one or not."""

    rank: int
    last_step: int
    holds: int | None
    records: tuple[int, ...]
    provisional: int | None = None
    exact: tuple[int, ...] = ()
    differed: tuple[int, ...] = ()

    def to_json(self) -> bytes:
        doc = {
            "rank": self.rank,
            "last_step": self.last_step,
            "holds": self.holds,
            "records": list(self.records),
            "provisional": self.provisional,
            "exact": list(self.exact),
            "differed": list(self.differed),
        }
        return json.dumps(doc).encode()

    @classmethod
    def parse(cls, data: bytes) -> CheckIn:
        doc = json.loads(data)
        holds, pre = doc["holds"], doc.get("provisional")
        return cls(
            int(doc["rank"]),
            int(doc["last_step"]),
            None if holds is None else int(holds),
            tuple(int(s) for s in doc["records"]),
            None if pre is None else int(pre),
            tuple(int(s) for s in doc.get("exact", ())),
            tuple(int(s) for s in doc.get("differed", ())),
        )


@dataclass(frozen=True)
class Plan:
    """What the survivors do: save ``step`` as ``checkpoint_id``; ``writers[v]`` writes rank v's files."""

    checkpoint_id: str
    step: int
    attempt: str
    members: tuple[int, ...]
    lost: tuple[int, ...]
    writers: dict[int, int]
    provisional: tuple[int, ...] = ()  # ranks whose state at ``step`` is their provisional record

    @property
    def committer(self) -> int:
        """The member writing rank 0's files commits the manifest."""
        return self.writers[0]

    def assigned(self, member: int) -> list[int]:
        return [v for v, w in sorted(self.writers.items()) if w == member]

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": "save",
            "checkpoint_id": self.checkpoint_id,
            "step": self.step,
            "attempt": self.attempt,
            "members": list(self.members),
            "lost": list(self.lost),
            "writers": {str(v): w for v, w in self.writers.items()},
            "provisional": list(self.provisional),
        }


@dataclass(frozen=True)
class Cannot:
    """No complete copy of some piece survives: ``reason`` names it in one line."""

    reason: str
    members: tuple[int, ...]
    lost: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"plan": "cannot", "reason": self.reason, "members": list(self.members), "lost": list(self.lost)}


def parse(data: bytes) -> Plan | Cannot:
    doc = json.loads(data)
    members, lost = tuple(doc["members"]), tuple(doc["lost"])
    if doc["plan"] == "cannot":
        return Cannot(str(doc["reason"]), members, lost)
    writers = {int(v): int(w) for v, w in doc["writers"].items()}
    provisional = tuple(int(r) for r in doc.get("provisional", ()))
    return Plan(str(doc["checkpoint_id"]), int(doc["step"]), str(doc["attempt"]), members, lost, writers, provisional)


def decide(
    checkins: Mapping[int, CheckIn],
    world_size: int,
    groups: Sequence[tuple[str, Collection[int]]],
    mirrored: Mapping[int, Collection[int]],
    *,
    checkpoint_id: Any,
    attempt: str,
    mirrored_provisional: Mapping[int, int | None] | None = None,
) -> Plan | Cannot:
    """The plan, or why there is none.

    Args:
        checkins: the survivors' check-ins, by rank; every other rank is lost.
        world_size: the job's number of ranks.
        groups: (label, ranks) of each replica group; together they cover every rank once.
        mirrored: for each lost rank, the steps of its records on the side channel.
        mirrored_provisional: for each lost rank, the step of its provisional record, if any. A rank
            without a final record of a step may use its provisional one when the survivors show it
            exact: some survivor's provisional record of that step equalled its final one, and none
            differed (the loop changes no per-rank state after ``optimizer.step()``).
        checkpoint_id: called with the step: the id of the checkpoint to write.
        attempt: the commit's attempt token (unique to this plan).
    """
    members = tuple(sorted(checkins))
    lost = tuple(r for r in range(world_size) if r not in checkins)
    group_of = {rank: i for i, (_, ranks) in enumerate(groups) for rank in ranks}

    pre_of = dict(mirrored_provisional or {})
    pre_of.update({c.rank: c.provisional for c in checkins.values()})

    def exact(step: int) -> bool:
        # Survivors that completed ``step`` and compared their provisional record of it: exact on every one.
        return any(step in c.exact for c in checkins.values()) and not any(
            step in c.differed for c in checkins.values()
        )

    def records_of(rank: int) -> set[int]:
        return set(checkins[rank].records) if rank in checkins else set(mirrored.get(rank, ()))

    def usable(rank: int, step: int) -> bool:
        return step in records_of(rank) or (pre_of.get(rank) == step and exact(step))

    held = {c.holds for c in checkins.values() if c.holds is not None}
    candidates = sorted((s for s in held if s >= 0), reverse=True)
    if not candidates:
        if held:  # -1: no survivor has completed a step since this launch began (or resumed)
            return Cannot(
                "no rank had completed a step in this launch: nothing newer than the checkpoint it resumed from "
                "(if any) to save",
                members,
                lost,
            )
        return Cannot("every survivor was inside an optimizer step: none holds a completed step's state", members, lost)
    first_problem = ""
    for step in candidates:
        holders = {m for m in members if checkins[m].holds == step}
        problem = _missing_group(step, groups, holders, checkins, lost) or _missing_record(
            step, world_size, records_of, usable, pre_of, checkins
        )
        if problem:
            first_problem = first_problem or problem
            continue
        # Each holder writes its own files; the others' go to the least loaded holder of their group.
        writers = {rank: rank for rank in holders}
        load = dict.fromkeys(holders, 1)
        for rank in range(world_size):
            if rank not in writers:
                eligible = [m for m in holders if group_of[m] == group_of[rank]]
                writers[rank] = min(eligible, key=lambda m: (load[m], m))
                load[writers[rank]] += 1
        provisional = tuple(r for r in range(world_size) if step not in records_of(r))
        return Plan(checkpoint_id(step), step, attempt, members, lost, dict(sorted(writers.items())), provisional)
    return Cannot(first_problem, members, lost)


def _missing_group(
    step: int,
    groups: Sequence[tuple[str, Collection[int]]],
    holders: set[int],
    checkins: Mapping[int, CheckIn],
    lost: tuple[int, ...],
) -> str:
    for label, ranks in groups:
        if holders & set(ranks):
            continue
        gone = sorted(set(ranks) & set(lost))
        ahead = sorted(r for r in ranks if r in checkins and checkins[r].holds != step)
        why = f"rank(s) {', '.join(map(str, gone))} lost" if gone else ""
        if ahead:
            past = f"rank(s) {', '.join(map(str, ahead))} already past it or inside an optimizer step"
            why += ("; " if why else "") + past
        return f"no survivor holds {label} at step {step}: {why}"
    return ""


def _missing_record(
    step: int,
    world_size: int,
    records_of: Any,
    usable: Any,
    pre_of: Mapping[int, int | None],
    checkins: Mapping[int, CheckIn],
) -> str:
    for rank in range(world_size):
        steps = records_of(rank)
        if usable(rank, step):
            continue
        differed = sorted(c.rank for c in checkins.values() if step in c.differed)
        if pre_of.get(rank) == step and differed:
            return (
                f"rank {rank}'s per-rank state at step {step} is known only as its optimizer step began, and the loop "
                f"changes per-rank state after optimizer.step() (seen on rank {differed[0]})"
            )
        have = ", ".join(map(str, sorted(steps))) or "none"
        return f"rank {rank}'s per-rank state (RNG, data position) at step {step} was not mirrored (it has: {have})"
    return ""
