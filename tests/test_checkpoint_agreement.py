"""Every rank acts on the same answer about its checkpoints: real gloo ranks, one rank's view corrupt or dead.

- One corrupt rank part: every rank resumes the same older step (through ``Guard.resume()`` and
  ``CheckpointStore.load``) and every rank says which checkpoint it skipped, whose part and why;
  nothing loadable on every rank: every rank raises; none at all: every rank starts at 0.
- ``wait()`` means committed on every rank: after waiting on two saves, every rank loads the newer one;
  a rank whose committing rank was killed never reports success.
- A committed checkpoint is immutable: a second save under its id is refused on every rank, and a new
  launch that reuses a crashed save's id commits its own files only (attempt tokens are drawn per save).
"""

from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers import agreement_job

from gpuguard import CheckpointStore


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(world: int, plan: list[dict[str, Any]], out: Path, *, dying: tuple[int, ...] = ()) -> None:
    """Run ``plan`` on ``world`` gloo ranks; the ranks in ``dying`` are expected to be killed."""
    context = multiprocessing.get_context("spawn")
    port = _port()
    procs = [
        context.Process(target=agreement_job.worker, args=(rank, world, port, plan, str(out)), daemon=True)
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(240)
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    errors = "\n".join(p.read_text() for p in sorted(out.glob("error-rank*.txt")))
    expected = [None if r in dying else 0 for r in range(world)]
    assert [None if r in dying else c for r, c in enumerate(codes)] == expected, f"exit codes {codes}\n{errors}"
    assert all(codes[r] is not None and codes[r] != 0 for r in dying), codes


def reports(out: Path, tag: str, world: int, first: int = 0) -> list[dict[str, Any]]:
    return [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in range(first, world)]


def corrupt(folder: Path, rank: int, world: int) -> None:
    """Flip one byte in the middle of ``rank``'s tensor file of the checkpoint in ``folder``."""
    shard = folder / f"rank-{rank:05d}-of-{world:05d}.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def check_agreement(tmp_path: Path, world: int) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    fallback, broken, empty, reused, crashed = (f"file://{ckpt / n}" for n in ("fb", "bad", "none", "reuse", "crash"))
    run(
        world,
        [
            {"action": "save_steps", "url": fallback, "steps": [11, 21], "tag": "fb-saved"},
            {"action": "save_steps", "url": broken, "steps": [5, 6], "tag": "bad-saved"},
        ],
        out,
    )
    last = world - 1
    corrupt(ckpt / "fb" / agreement_job.checkpoint_id(21), last, world)  # only the last rank's part of step 21
    corrupt(ckpt / "bad" / agreement_job.checkpoint_id(6), 0, world)
    corrupt(ckpt / "bad" / agreement_job.checkpoint_id(5), last, world)
    run(
        world,
        [
            {"action": "resume", "url": fallback, "tag": "fb"},
            {"action": "resume", "url": broken, "tag": "bad"},
            {"action": "resume", "url": empty, "tag": "none"},
            {"action": "committer_dies", "url": crashed, "step": 9, "tag": "dies"},
        ],
        out,
        dying=(0,),
    )
    run(
        world,
        [
            {"action": "retry_after_crash", "url": crashed, "step": 9, "tag": "retry"},
            {"action": "wait_then_load", "url": f"file://{ckpt / 'wait'}", "trials": 3, "tag": "wait"},
            {"action": "reuse", "url": reused, "tag": "reuse"},
        ],
        out,
    )
    skipped = agreement_job.checkpoint_id(21)

    # one corrupt part: every rank resumes step 11 (the step after it: 12), each with its own values, and says why
    for rank, report in enumerate(reports(out, "fb", world)):
        assert report["guard"] == {"value": 12} and report["guard_w"] == 100 * 11 + rank, report
        assert report["load"] == {"value": 11} and report["load_w"] == 100 * 11 + rank, report
        assert report["load_newest"]["error"] == "CheckpointCorruptError", report  # no fallback: every rank raises
        said = [line for line in report["log"] if skipped in line and f"rank {last}:" in line]
        assert said and "fails its checksum" in said[0], report["log"]
        assert any(f"every rank loads {agreement_job.checkpoint_id(11)}" in line for line in report["log"])
    # nothing loadable on every rank: every rank raises, none starts at 0
    for report in reports(out, "bad", world):
        assert report["guard"]["error"] == "CheckpointCorruptError", report
        assert "no checkpoint could be loaded on every rank" in report["guard"]["message"]
        assert report["load"]["error"] == "CheckpointCorruptError"
    # no checkpoint anywhere: every rank starts at 0
    for report in reports(out, "none", world):
        assert report["guard"] == {"value": 0} and report["load"]["error"] == "CheckpointNotFoundError"

    # the committing rank was killed: no other rank reports success
    for report in reports(out, "dies", world, first=1):
        assert report.get("error") == "CommitError" and "no manifest within" in report["message"], report
    # the next launch reuses that id: it commits its own files whole, and every rank loads them
    for rank, report in enumerate(reports(out, "retry", world)):
        assert report["committed"] == agreement_job.checkpoint_id(9, "dead") and report["loaded"] == 9
        assert report["w"] == 100 * 9 + rank
    assert reports(out, "retry", world)[0]["verify_ok"] is True
    # wait() then load() on every rank gives the new step, in every trial
    for rank, report in enumerate(reports(out, "wait", world)):
        for trial, got in enumerate(report["trials"]):
            assert got["waited"] == [10 * trial + 1, 10 * trial + 2] and got["loaded"] == 10 * trial + 2, report
            assert got["w"] == 100 * (10 * trial + 2) + rank
    # a committed id is refused on every rank; what was committed stays and loads
    for rank, report in enumerate(reports(out, "reuse", world)):
        assert report["again"]["error"] == "CheckpointExistsError" and "already committed" in report["again"]["message"]
        assert report["loaded"] == 5 and report["w"] == 100 * 5 + rank
    with CheckpointStore(reused) as store:
        assert store.verify().ok


def test_every_rank_agrees_on_resume_commit_and_ids_two_ranks(tmp_path: Path) -> None:
    check_agreement(tmp_path, 2)


@pytest.mark.slow
def test_every_rank_agrees_on_resume_commit_and_ids_four_ranks(tmp_path: Path) -> None:
    check_agreement(tmp_path, 4)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5))
def test_a_crashed_save_and_its_retry_never_commit_a_mix(tmp_path: Path, trial: int) -> None:
    """The crash-and-retry that committed a corrupt checkpoint in 1 of 5 runs when attempts shared a token."""
    out, url = tmp_path / "out", f"file://{tmp_path / 'ckpt'}"
    out.mkdir()
    run(2, [{"action": "committer_dies", "url": url, "step": 9, "tag": "dies"}], out, dying=(0,))
    run(2, [{"action": "retry_after_crash", "url": url, "step": 9, "tag": "retry"}], out)
    got = reports(out, "retry", 2)
    assert got[0]["verify_ok"] is True and [r["w"] for r in got] == [900.0, 901.0]
