"""Leases live as long as their save (a heartbeat renews them), a dead writer's do not, and what a dead
writer left behind goes: its folder at once when it is known dead, its incomplete S3 upload too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import throttled_fs

from gpuguard import CheckpointStore

from conftest import ROOT, TESTS

HELPER = TESTS / "helpers" / "lease_writer.py"


def _writer(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "saving"
    return proc


def _until(condition: Callable[[], Any], what: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)
    return value


def test_a_save_through_a_slow_link_lasting_several_lease_lifetimes_commits_while_another_writer_prunes() -> None:
    # Short leases, so that several lifetimes pass quickly; long enough that a loaded 2-core machine
    # still runs the heartbeat in time (it lapses after 1.5 s without a renewal, tried every 0.25 s).
    lease_s = 2.0
    state = {"w": torch.arange(1 << 18, dtype=torch.float32)}  # 1 MiB
    throttled_fs.reset(bytes_per_s=(1 << 20) / (3.2 * lease_s))  # its shard takes 3.2 lease lifetimes
    with (
        CheckpointStore("throttled://run", lease_s=lease_s) as slow,
        CheckpointStore("throttled://run", keep=1) as other,
    ):
        started = time.monotonic()
        pending = slow.save(state, step=1000, rng=False)
        expiries: set[float] = set()
        step = prunes = 0
        while not pending.done():  # meanwhile another writer saves and prunes, keeping one checkpoint
            step += 1
            assert other.save({"v": torch.full((16,), float(step))}, step=step, rng=False).wait() is not None
            other.prune()
            prunes += 1
            time.sleep(0.02)  # a few hundred saves, not thousands: their steps stay below the slow save's 1000
            for file in other.storage.list_files(".leases"):
                if file.startswith("step-000000001000-"):
                    expiries.add(json.loads(other.storage.cat(other.storage.path(".leases", file)))["expires_at"])
        info = pending.wait()
        lasted = time.monotonic() - started
        assert info is not None and info.step == 1000
        assert lasted > 3 * lease_s and 3 <= prunes < 1000, (lasted, prunes)
        assert len(expiries) >= 3, "the lease was renewed while the save ran"
        other.prune()
        assert [i.step for i in other.list()] == [1000]
        assert other.verify(info.id).ok
        target = {"w": torch.zeros(1 << 18)}
        assert other.load(target) == 1000 and torch.equal(target["w"], state["w"])
        assert other.storage.list_files(".leases") == []


def test_a_dead_writers_folder_is_collected_at_once_and_a_stopped_ones_is_not(tmp_path: Path) -> None:
    url, name = f"file://{tmp_path}/ckpt", "step-000000000009-0000dead"
    folder = tmp_path / "ckpt" / name
    writer = _writer("gather", url, name)  # rank 0 of 2: its files are written, it waits for rank 1
    try:
        _until((folder / "rank-00000-of-00002.done.json").exists, "rank 0's files")
        with CheckpointStore(url) as store:  # the default lease: 120 s, far from expiring here
            writer.send_signal(signal.SIGSTOP)  # alive but not running (a paused or swapped-out writer)
            try:
                assert store.prune() == []
                assert folder.exists()
            finally:
                writer.send_signal(signal.SIGCONT)
            writer.kill()
            writer.wait(30)
            # Its lease has not expired, but its writer is gone: the leftover goes now, not in 120 s.
            assert store.prune() == [name]
            assert not folder.exists() and store.storage.list_files(".leases") == []
    finally:
        writer.kill()
        writer.wait(30)


@pytest.mark.slow  # two processes and an S3 server: 10-25 s
def test_prune_aborts_the_incomplete_upload_of_a_killed_writer_and_only_that(
    s3_bucket: tuple[str, dict[str, Any]],
) -> None:
    import s3fs

    url, options = s3_bucket
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    s3 = s3fs.S3FileSystem(**options)

    def uploads() -> list[dict[str, Any]]:
        return list(s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix="run/").get("Uploads", []))

    def parts_uploaded() -> bool:
        found = uploads()
        return bool(found) and bool(
            s3.call_s3("list_parts", Bucket=bucket, Key=found[0]["Key"], UploadId=found[0]["UploadId"]).get("Parts")
        )

    writer = _writer("upload", url, json.dumps(options))  # one part goes through, the others stall
    try:
        _until(parts_uploaded, "a part of the writer's multipart upload")
        with CheckpointStore(url, options) as store:
            store.prune()
            assert len(uploads()) == 1, "a live writer's upload is left alone"
            writer.kill()
            writer.wait(30)
            store.prune()
            assert uploads() == [], "the killed writer's upload is aborted (S3 would bill its parts)"
            assert store.storage.list_files(".leases") == []
    finally:
        writer.kill()
        writer.wait(30)
