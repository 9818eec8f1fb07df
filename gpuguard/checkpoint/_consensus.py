"""Agreeing on what every rank read: the newest checkpoint that every rank verified.

A rank never acts alone on what it read from storage. Each rank lists what it sees and checks its own
part of a candidate; one small collective per candidate (`RankGroup.all_gather`) gives every rank every
other rank's verdict, and all act on the same answer:

- the candidates are the ones every rank lists, newest first (a listing may lag: one committed while
  the others listed is left out, and every rank says so);
- the first candidate every rank could use is the answer, on every rank;
- a candidate whose check failed on some rank with an error that allows falling back (its part is
  corrupt) is skipped by every rank, and every rank logs which rank failed and why;
- any other failure on any rank (storage down, a mismatch with the live state, a bug) stops every rank:
  the rank that failed raises its own error, the others an error of the same kind naming that rank;
- none left: every rank raises. No rank starts from step 0 while another resumes.

The part is generic over what a candidate is (a checkpoint; later a checkpoint in one storage tier) and
what checking it means (reading and verifying this rank's part without touching the live state):
`agree_newest` takes the two as functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from gpuguard.checkpoint._collective import RankGroup
from gpuguard.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    StorageError,
)

log = logging.getLogger("gpuguard.checkpoint")


class Candidate(Protocol):
    """Something every rank can name the same way: an id, and the step it holds."""

    @property
    def id(self) -> str: ...

    @property
    def step(self) -> int: ...


C = TypeVar("C", bound=Candidate)
T = TypeVar("T")


@dataclass(frozen=True)
class Agreed(Generic[C, T]):
    """The candidate every rank agreed on, this rank's result of checking it, and what was skipped."""

    candidate: C
    value: T
    skipped: list[str] = field(default_factory=list)  # one line per newer candidate skipped, with why


# Errors that cross ranks by kind: the other ranks raise the same kind, naming the rank.
_KINDS: dict[str, type[CheckpointError]] = {
    "corrupt": CheckpointCorruptError,
    "mismatch": CheckpointMismatchError,
    "not_found": CheckpointNotFoundError,
    "storage": StorageError,
    "checkpoint": CheckpointError,
}


def _kind(exc: BaseException) -> str:
    for kind, cls in _KINDS.items():
        if isinstance(exc, cls):
            return kind
    return "error"  # not a checkpoint error: a bug or an unexpected library error on that rank


def _rebuild(kind: str, message: str) -> Exception:
    return _KINDS.get(kind, CheckpointError)(message)


def falls_back_on_corruption(exc: BaseException) -> bool:
    """The default: a corrupt part lets every rank fall back to an older candidate; nothing else does."""
    return isinstance(exc, CheckpointCorruptError)


def agree_newest(
    group: RankGroup,
    listing: Callable[[], Sequence[C]],
    check: Callable[[C], T],
    *,
    fallback: bool,
    can_fall_back: Callable[[BaseException], bool] = falls_back_on_corruption,
    nothing: str = "no committed checkpoint",
) -> Agreed[C, T]:
    """The newest candidate whose ``check`` passed on every rank. Every rank calls it; all get the same one.

    Args:
        group: the ranks that agree (`solo` for one process).
        listing: this rank's candidates, newest first; raising counts as this rank's failure.
        check: this rank's check of its part of a candidate; returns what the caller applies afterwards
            (nothing may change the live state before every rank has passed).
        fallback: try older candidates when the newest one fails on some rank; otherwise only the newest.
        can_fall_back: which errors of ``check`` let every rank fall back (default: corruption).
        nothing: how to say that no rank lists any candidate.

    Raises:
        CheckpointNotFoundError: no rank lists a candidate (on every rank).
        CheckpointCorruptError: no candidate passed on every rank; names each one, the rank and why.
        CheckpointError: ranks list different candidates and none in common, or another rank failed
            (the same kind as that rank's error, naming it); this rank's own error is raised as it is.
    """
    own_error: Exception | None = None
    try:
        mine = list(listing())
        report: dict[str, Any] = {"ids": [c.id for c in mine]}
    except Exception as exc:
        mine, own_error = [], exc
        report = {"error": _kind(exc), "message": str(exc)}
    listings = group.all_gather(report)
    _raise_any(group.rank, listings, own_error, "listing checkpoints")
    common = set.intersection(*(set(entry["ids"]) for entry in listings))
    everywhere = [c for c in mine if c.id in common]
    # Every rank iterates in rank 0's order, so the same candidate is checked at the same time everywhere.
    order = {cid: i for i, cid in enumerate(listings[0]["ids"])}
    everywhere.sort(key=lambda c: order[c.id])
    partial = sorted(set().union(*(set(entry["ids"]) for entry in listings)) - common)
    if partial:
        seen_by = {cid: [r for r, entry in enumerate(listings) if cid in entry["ids"]] for cid in partial}
        log.warning(
            "checkpoint(s) not listed by every rank are not candidates (a listing may lag a commit): %s",
            "; ".join(f"{cid} (listed by rank(s) {ranks})" for cid, ranks in seen_by.items()),
        )
    if not everywhere:
        if partial:
            raise CheckpointError(
                "the ranks list different checkpoints and none in common: "
                + "; ".join(f"rank {r}: {entry['ids'] or 'none'}" for r, entry in enumerate(listings))
            )
        raise CheckpointNotFoundError(nothing)
    tried: list[str] = []
    candidates = everywhere if fallback else everywhere[:1]
    for candidate in candidates:
        value: Any = None
        own_error = None
        try:
            value = check(candidate)
            verdict: dict[str, Any] = {"ok": True}
        except Exception as exc:
            own_error = exc
            verdict = {"ok": False, "error": _kind(exc), "message": str(exc), "fallback": can_fall_back(exc)}
        verdicts = group.all_gather(verdict)
        failed = [(r, v) for r, v in enumerate(verdicts) if not v["ok"]]
        if not failed:
            if tried:
                log.warning(
                    "every rank loads %s (step %d); newer checkpoint(s) skipped on every rank: %s",
                    candidate.id,
                    candidate.step,
                    " | ".join(tried),
                )
            return Agreed(candidate, value, tried)
        fatal = [(r, v) for r, v in failed if not v["fallback"]]
        if fatal or not fallback:
            _raise_any(group.rank, verdicts, own_error, f"checking {candidate.id}")
        why = "; ".join(f"rank {r}: {v['message']}" for r, v in failed)
        tried.append(f"{candidate.id} (step {candidate.step}): {why}")
        more = candidate is not candidates[-1]
        log.warning(
            "checkpoint %s (step %d) cannot be loaded on every rank (%s); %s",
            candidate.id,
            candidate.step,
            why,
            "every rank falls back to the next older one" if more else "it was the last candidate",
        )
    raise CheckpointCorruptError("no checkpoint could be loaded on every rank: " + " | ".join(tried))


def _raise_any(rank: int, reports: list[dict[str, Any]], own: BaseException | None, doing: str) -> None:
    """Raise on every rank when any rank reported an error.

    The error that stops the job is the first one that allows no fallback (else the first one): the
    rank that had it raises its own (with its traceback), the others one of the same kind naming it.
    """
    failed = [(r, entry) for r, entry in enumerate(reports) if "error" in entry]
    if not failed:
        return
    r, entry = next(((r, e) for r, e in failed if not e.get("fallback", False)), failed[0])
    if r == rank and own is not None:
        raise own
    others = [x for x, _ in failed if x != r]
    also = f" (rank(s) {others} failed too)" if others else ""
    raise _rebuild(entry["error"], f"rank {r} failed {doing}{also}: {entry['message']}")
