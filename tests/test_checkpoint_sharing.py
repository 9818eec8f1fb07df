"""Several writers on one URL: leases keep every in-flight save safe from every pruner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import gated_fs
from helpers.gated_fs import GatedFileSystem

from gpuguard import CheckpointStore, CommitError, StorageError

from conftest import ROOT, TESTS


@pytest.fixture
def gated() -> Iterator[None]:
    gated_fs.reset()
    yield
    GatedFileSystem.gate.set()
    gated_fs.reset()


def _held_save(store: CheckpointStore, step: int, **kwargs: object) -> object:
    """Start a save and return once its shard is written and its state file is held (its lease is taken)."""
    pending = store.save({"w": torch.full((64,), float(step))}, step=step, **kwargs)  # type: ignore[arg-type]
    assert GatedFileSystem.waiting.wait(30)
    return pending


def test_another_stores_prune_leaves_an_in_flight_save_alone(gated: None) -> None:
    GatedFileSystem.hold = "step-000000000005-"
    with CheckpointStore("gated://run") as writer, CheckpointStore("gated://run") as other:
        pending = _held_save(writer, step=5)
        assert other.save({"w": torch.ones(64)}, step=10).wait() is not None
        # the step-5 folder has no manifest and is older than what is committed: before leases, this
        # prune deleted it mid-write, and the writer then committed a manifest over a missing shard
        assert other.prune() == []
        GatedFileSystem.gate.set()
        info = pending.wait(30)  # type: ignore[attr-defined]
        assert info is not None and info.step == 5
        assert other.verify(info.id).ok
        assert [i.step for i in other.list()] == [5, 10]


def test_a_writer_that_cannot_renew_its_lease_is_collected_and_cannot_commit(gated: None) -> None:
    GatedFileSystem.refuse_renewals = True  # its link to the storage is gone: the lease is never renewed
    with (
        CheckpointStore("gated://run", lease_s=0.5) as cut_off,
        CheckpointStore("gated://run") as other,
    ):
        pending = _held_save(cut_off, step=50)
        deadline = time.monotonic() + 30
        collected: list[str] = []
        while not collected and time.monotonic() < deadline:  # until the lease has expired by other's clock
            collected = [p for p in other.prune() if p.startswith("step-000000000050-")]
            time.sleep(0.05)
        assert collected, "a leftover of any step is collected once its lease expired"
        GatedFileSystem.gate.set()
        with pytest.raises(StorageError, match=r"lease .* is gone .* or lapsed"):
            pending.wait(30)  # type: ignore[attr-defined]
        assert other.list() == []


def test_a_commit_never_resurrects_a_removed_folder(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/ckpt"
    name = "step-000000000003-0000aaaa"
    folder = tmp_path / "ckpt" / name
    with CheckpointStore(url) as rank0, CheckpointStore(url) as rank1:
        first = rank0.save({"w": torch.ones(8)}, step=3, world_size=2, checkpoint_id=name, commit_timeout_s=30)
        deadline = time.monotonic() + 30
        while not (folder / "rank-00000-of-00002.done.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        shutil.rmtree(folder)  # another process collected it (say its lease had expired)
        second = rank1.save({"w": torch.ones(8)}, step=3, rank=1, world_size=2, checkpoint_id=name)
        with pytest.raises(StorageError, match=r"lease .* is gone|is missing"):
            first.wait(30)
        # rank 1 never reports success for a save rank 0 could not commit: rank 0 told it why
        with pytest.raises(CommitError, match=r"not committed: the committing rank failed: StorageError"):
            second.wait(30)
        assert not (folder / "MANIFEST.json").exists()
        assert rank0.list() == []


def test_a_stale_rank_record_from_another_attempt_is_refused() -> None:
    url = "memory://stale-attempt"
    name = "step-000000000007-0000beef"
    with CheckpointStore(url) as rank0, CheckpointStore(url) as rank1:
        # attempt "a": rank 1 finished, rank 0 crashed before committing
        old = rank1.save(
            {"w": torch.full((4,), 1.0)},
            step=7,
            rank=1,
            world_size=2,
            checkpoint_id=name,
            attempt="a",
            commit_timeout_s=0.2,
        )
        with pytest.raises(CommitError, match="no manifest within"):  # rank 0 of attempt a is gone
            old.wait(30)
        # attempt "b" reuses the id; rank 0 alone must not commit over attempt a's record
        alone = rank0.save(
            {"w": torch.full((4,), 2.0)},
            step=7,
            rank=0,
            world_size=2,
            checkpoint_id=name,
            attempt="b",
            commit_timeout_s=0.5,
        )
        with pytest.raises(TimeoutError, match=r"rank 1's record belongs to attempt 'a', not this one \('b'\)"):
            alone.wait(30)
        assert rank0.list() == []
        # when rank 1 of attempt b arrives, rank 0 commits attempt b's files
        first = rank0.save(
            {"w": torch.full((4,), 2.0)},
            step=7,
            rank=0,
            world_size=2,
            checkpoint_id=name,
            attempt="c",
            commit_timeout_s=30,
        )
        second = rank1.save({"w": torch.full((4,), 3.0)}, step=7, rank=1, world_size=2, checkpoint_id=name, attempt="c")
        info = first.wait(30)
        assert info.id == name and second.wait(30) == info
        assert rank0.verify(name).ok
        target = {"w": torch.zeros(4)}
        rank1.load(target, rank=1, world_size=2)
        assert torch.equal(target["w"], torch.full((4,), 3.0))


def _share(url: str, seconds: float) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
    script = str(TESTS / "helpers" / "sharing_writer.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, url, str(first), "2", str(seconds)], stdout=subprocess.PIPE, text=True, env=env
        )
        for first in (0, 1)  # interleaved steps: each one's saves are older than the other's newest
    ]
    acked: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        assert proc.returncode == 0
        acked += out.split()
    assert len(acked) >= 4
    with CheckpointStore(url, keep=10_000) as store:
        listed = {i.id for i in store.list()}
        missing = [a for a in acked if a not in listed]
        assert missing == [], f"acknowledged saves gone: {missing}"
        bad = [a for a in acked if not store.verify(a).ok]
        assert bad == []
        for checkpoint_id in acked[:: max(1, len(acked) // 10)]:
            target = {"w": torch.zeros(2048), "step": -1}
            step = store.load(target, checkpoint_id)
            assert target["step"] == step and torch.equal(target["w"], torch.full((2048,), float(step)))


def test_two_processes_saving_and_pruning_on_one_url_lose_nothing(tmp_path: Path) -> None:
    _share(f"file://{tmp_path}/shared", seconds=8)


@pytest.mark.slow
def test_two_processes_saving_and_pruning_for_a_minute_lose_nothing(tmp_path: Path) -> None:
    _share(f"file://{tmp_path}/shared", seconds=60)
