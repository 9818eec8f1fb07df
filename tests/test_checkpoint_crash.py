"""Crash consistency: a writer killed with SIGKILL at random moments never leaves a checkpoint that
looks valid and isn't."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from gpuguard import CheckpointStore

HELPER = Path(__file__).parent / "helpers" / "crash_writer.py"


def _leftover_bytes(store: CheckpointStore, committed: set[str]) -> int:
    """What uncommitted folders and incomplete S3 uploads hold: storage paid for nothing."""
    storage = store.storage
    total = sum(
        int(storage.fs.du(storage.path(d))) for d in storage.list_dirs() if d.startswith("step-") and d not in committed
    )
    if storage.is_s3:
        bucket, _, _ = storage.fs.split_path(storage.root)
        for path, upload_id in storage.list_uploads():
            key = storage.fs.split_path(storage.path(path))[1]
            parts = storage.fs.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=upload_id).get("Parts", [])
            total += sum(int(p["Size"]) for p in parts)
    return total


def kill_at_random(
    url: str, options: dict[str, Any], kills: int, seed: int, max_delay_s: float, numel: int | None = None
) -> dict[str, Any]:
    rng = random.Random(seed)
    zygote = subprocess.Popen(
        [sys.executable, str(HELPER), url, json.dumps(options), *([str(numel)] if numel else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert zygote.stdin and zygote.stdout
    seen: dict[str, Any] = {"committed": 0, "leftovers": 0, "empty": 0, "leftover_ratios": []}
    last_step = -1
    with CheckpointStore(url, options) as store:
        try:
            for i in range(kills):
                zygote.stdin.write(f"fork {seed * 1000 + i}\n")
                zygote.stdin.flush()
                pid = int(zygote.stdout.readline())
                time.sleep(rng.uniform(0.01, max_delay_s))
                os.kill(pid, signal.SIGKILL)
                zygote.stdin.write(f"reap {pid}\n")
                zygote.stdin.flush()
                assert zygote.stdout.readline().strip() == "ok"

                info = store.latest()
                if info is None:
                    seen["empty"] += 1
                    continue
                report = store.verify(info.id)
                assert report.ok, report.problems
                # no live "w": its size varies from child to child, so load puts the saved one in place
                target: dict[str, Any] = {"small": torch.zeros(16, dtype=torch.int64), "meta": None}
                assert store.load(target) == info.step
                assert torch.all(target["w"] == float(info.step)) and torch.all(target["small"] == info.step)
                assert target["meta"]["step"] == info.step
                assert info.step >= last_step, "a committed checkpoint went missing"
                last_step = info.step
                seen["committed"] += 1
                infos = store.list()
                committed = {c.id for c in infos}
                seen["leftovers"] += sum(
                    1 for d in store.storage.list_dirs() if d.startswith("step-") and d not in committed
                )
                if len(infos) >= 3:  # the writers keep 3: measured once the loop is in its steady state
                    seen["leftover_ratios"].append(
                        _leftover_bytes(store, committed) / sum(i.total_bytes for i in infos)
                    )
        finally:
            zygote.kill()
            zygote.wait()
    return seen


def test_sigkill_during_writes_never_leaves_a_valid_looking_partial(tmp_path: Path) -> None:
    seen = kill_at_random(f"file://{tmp_path}/ckpt", {}, kills=50, seed=1, max_delay_s=0.4)
    assert seen["committed"] >= 25
    # Some kills landed mid-save and left an uncommitted folder behind, which nobody trusted.
    assert seen["leftovers"] > 0


@pytest.mark.slow  # 30 writer processes killed (15-30 s); tests/test_checkpoint_leases.py checks the mechanism fast
def test_a_crash_loops_leftovers_stay_within_the_committed_size(tmp_path: Path) -> None:
    # Every writer is killed, most of them mid-save; each new one prunes after its first commit, and a
    # leftover whose writer is known dead goes then, not when its lease expires.
    seen = kill_at_random(f"file://{tmp_path}/ckpt", {}, kills=30, seed=4, max_delay_s=0.4, numel=2**19)
    assert len(seen["leftover_ratios"]) >= 10 and seen["leftovers"] > 0
    assert max(seen["leftover_ratios"]) <= 1.0, seen["leftover_ratios"]


@pytest.mark.slow
def test_sigkill_soak_local(tmp_path: Path) -> None:
    seen = kill_at_random(f"file://{tmp_path}/ckpt", {}, kills=300, seed=2, max_delay_s=0.6)
    assert seen["committed"] >= 150 and seen["leftovers"] > 0


@pytest.mark.slow
def test_sigkill_soak_s3(s3_bucket: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_bucket
    options = {k: v for k, v in options.items() if k != "skip_instance_cache"}
    # A fresh writer spends about a second on S3 before its first commit (client start-up, listing, its
    # lease and the shard's round trips to the server): kill moments span that and the saves after it.
    seen = kill_at_random(url, options, kills=40, seed=3, max_delay_s=2.5, numel=2**19)
    assert seen["committed"] >= 10
    assert seen["leftover_ratios"] and max(seen["leftover_ratios"]) <= 1.0, seen["leftover_ratios"]
