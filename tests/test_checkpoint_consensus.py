"""The agreement part on its own: ranks as threads, each with its own view, one answer for all.

`ThreadGroup` gathers JSON values between threads the way `TorchGroup` gathers them between processes
(a barrier per call; every member gets every value, decoded from JSON, in rank order), so the logic that
real gloo ranks run (tests/test_checkpoint_agreement.py) is checked here edge case by edge case, fast.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from gpuguard import CheckpointCorruptError, CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from gpuguard.checkpoint._consensus import agree_newest


class ThreadGroup:
    """``size`` threads that gather JSON values; a rank that never arrives breaks the barrier for all."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=30)
        self._slots: list[Any] = [None] * size

    def member(self, rank: int) -> Any:
        group = self

        class Member:
            def __init__(self) -> None:
                self.rank, self.size = rank, group.size

            def all_gather(self, value: Any) -> list[Any]:
                group._slots[rank] = json.dumps(value)
                group._barrier.wait()
                gathered = [json.loads(s) for s in group._slots]
                group._barrier.wait()  # nobody overwrites a slot before everyone has read it
                return gathered

        return Member()


@dataclass(frozen=True)
class Ckpt:
    id: str
    step: int


def run_ranks(size: int, body: Callable[[Any, int], Any]) -> list[Any]:
    """Run ``body(member, rank)`` on ``size`` threads; returns each rank's result or exception."""
    group = ThreadGroup(size)
    results: list[Any] = [None] * size

    def run(rank: int) -> None:
        try:
            results[rank] = body(group.member(rank), rank)
        except Exception as exc:
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


NEWEST_FIRST = [Ckpt("c30", 30), Ckpt("c20", 20), Ckpt("c10", 10)]


def test_one_rank_corrupt_every_rank_falls_back_to_the_same_one_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    def body(group: Any, rank: int) -> tuple[str, str]:
        def check(c: Ckpt) -> str:
            if rank == 2 and c.id == "c30":
                raise CheckpointCorruptError("rank-00002: tensor 'w' fails its checksum", shard="x", tensor="w")
            return f"{c.id}@{rank}"

        agreed = agree_newest(group, lambda: NEWEST_FIRST, check, fallback=True)
        return agreed.candidate.id, agreed.value

    assert run_ranks(3, body) == [("c20", "c20@0"), ("c20", "c20@1"), ("c20", "c20@2")]
    said = [r.getMessage() for r in caplog.records if "c30" in r.getMessage()]
    assert (
        len([m for m in said if "rank 2: rank-00002: tensor 'w' fails its checksum" in m]) == 3 * 2
    )  # each rank, twice


def test_without_fallback_every_rank_raises_and_the_failing_rank_its_own_error() -> None:
    own = CheckpointCorruptError("rank-00001: missing", shard="rank-00001")

    def body(group: Any, rank: int) -> Any:
        def check(c: Ckpt) -> str:
            if rank == 1:
                raise own
            return c.id

        return agree_newest(group, lambda: NEWEST_FIRST, check, fallback=False)

    results = run_ranks(3, body)
    assert results[1] is own
    for rank in (0, 2):
        assert isinstance(results[rank], CheckpointCorruptError)
        assert "rank 1 failed checking c30: rank-00001: missing" in str(results[rank])


def test_a_mismatch_on_one_rank_stops_every_rank_even_with_fallback() -> None:
    def body(group: Any, rank: int) -> Any:
        def check(c: Ckpt) -> str:
            if rank == 0:
                raise CheckpointMismatchError("state['model']: shape (3,) in the checkpoint, (4,) live")
            if rank == 1:
                raise CheckpointCorruptError("bad block")
            return c.id

        return agree_newest(group, lambda: NEWEST_FIRST, check, fallback=True)

    results = run_ranks(3, body)
    assert isinstance(results[0], CheckpointMismatchError) and "shape (3,)" in str(results[0])
    # the mismatch wins over the corruption: falling back would not cure it
    for rank in (1, 2):
        assert isinstance(results[rank], CheckpointMismatchError), results[rank]
        assert "rank 0 failed checking c30" in str(results[rank]) and "rank(s) [1] failed too" in str(results[rank])


def test_a_listing_that_lags_leaves_out_what_not_every_rank_sees(caplog: pytest.LogCaptureFixture) -> None:
    views = {0: NEWEST_FIRST, 1: NEWEST_FIRST[1:]}  # rank 1 listed before c30 was committed

    def body(group: Any, rank: int) -> int:
        return agree_newest(group, lambda: views[rank], lambda c: c.step, fallback=False).value

    assert run_ranks(2, body) == [20, 20]
    assert any("c30 (listed by rank(s) [0])" in r.getMessage() for r in caplog.records)


def test_nothing_anywhere_every_rank_is_told_so_and_disjoint_views_stop_every_rank() -> None:
    def nothing(group: Any, rank: int) -> Any:
        return agree_newest(group, lambda: [], lambda c: c, fallback=True, nothing="no committed checkpoint here")

    results = run_ranks(2, nothing)
    assert all(isinstance(r, CheckpointNotFoundError) and "here" in str(r) for r in results)

    def disjoint(group: Any, rank: int) -> Any:
        return agree_newest(group, lambda: [NEWEST_FIRST[rank]], lambda c: c, fallback=True)

    results = run_ranks(2, disjoint)
    assert all(type(r) is CheckpointError and "none in common" in str(r) for r in results), results


def test_a_rank_that_cannot_list_stops_every_rank() -> None:
    def body(group: Any, rank: int) -> Any:
        def listing() -> list[Ckpt]:
            if rank == 1:
                raise CheckpointNotFoundError("no committed checkpoint 'c99'")
            return NEWEST_FIRST

        return agree_newest(group, listing, lambda c: c, fallback=True)

    results = run_ranks(2, body)
    assert isinstance(results[1], CheckpointNotFoundError) and str(results[1]) == "no committed checkpoint 'c99'"
    assert isinstance(results[0], CheckpointNotFoundError) and "rank 1 failed listing" in str(results[0])


def test_a_bug_on_one_rank_keeps_its_traceback_and_stops_the_others() -> None:
    def body(group: Any, rank: int) -> Any:
        def check(c: Ckpt) -> Any:
            return {}["missing"] if rank == 0 else c.id

        return agree_newest(group, lambda: NEWEST_FIRST, check, fallback=True)

    results = run_ranks(2, body)
    assert isinstance(results[0], KeyError)
    assert type(results[1]) is CheckpointError and "rank 0 failed checking c30: 'missing'" in str(results[1])
