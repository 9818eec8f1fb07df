"""Every rank acts on the same answer about its checkpoints: real gloo ranks, one rank's view corrupt or dead.

One job of two ranks (a module fixture: one process group, then one more for the relaunch) covers:

- one corrupt rank part: every rank resumes the same older step (``Guard.resume()`` and
  ``CheckpointStore.load``), and every rank says which checkpoint it skipped, whose part and why; nothing
  loadable on every rank: every rank raises; nothing at all: every rank starts at 0;
- ``wait()`` means committed on every rank: after waiting on two saves every rank loads the newer one; with
  the committing rank late, the others' ``wait()`` returns once the manifest is there; a rank whose
  committing rank was killed never reports success;
- ranks that hold only empty pieces of a DTensor (one element over every rank) take part in ``prepare``'s
  agreement like the others (otherwise the job hangs), and save and load with them;
- ``PendingSave.abandon()`` (the preemption deadline's) on one rank: a save it says will not commit
  commits on no rank, and one whose commit had begun anywhere is not called abandoned on any rank;
- a committed checkpoint is immutable, and a relaunch that reuses a crashed save's id commits its own files;
- FSDP2 (a GPT with tied embeddings, AdamW) trained 50 steps under the Guard with periodic checkpoints and
  an emergency one, resumed: bitwise the run that was never interrupted;
- DP×TP with TP of size 1 (every DP replica holds every TP shard: the layout that wrote each chunk twice):
  each chunk written once, loaded bitwise on DP-only, on FSDP2 with the optimizer's groups reversed, on its
  own layout (and training continues bitwise), and in one process.

The slow step runs the agreement on four ranks and the crash-and-retry five times.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import jobs
from helpers.checks import (
    assert_identical,
    check_guarded,
    guarded_plan,
    plain_loaded,
    reports,
    run,
    tensors,
    written_chunks,
)

from gpuguard import CheckpointStore

SKIPPED = jobs.checkpoint_id(21)


def agreement_plan(ckpt: Path, world: int) -> list[dict[str, Any]]:
    names = ("fb", "bad", "none", "wait", "slow", "reuse", "small", "abandon", "nan")
    url = {name: f"file://{ckpt / name}" for name in names}
    last = world - 1
    return [
        {"action": "save_steps", "url": url["fb"], "steps": [11, 21], "tag": "fb-saved"},
        {"action": "save_steps", "url": url["bad"], "steps": [5, 6], "tag": "bad-saved"},
        {"action": "corrupt", "url": url["fb"], "parts": [[SKIPPED, last]], "tag": "fb"},  # only the last rank's
        {
            "action": "corrupt",
            "url": url["bad"],
            "parts": [[jobs.checkpoint_id(6), 0], [jobs.checkpoint_id(5), last]],
            "tag": "bad",
        },
        {"action": "resume", "url": url["fb"], "tag": "fb"},
        {"action": "resume", "url": url["bad"], "tag": "bad"},
        {"action": "resume", "url": url["none"], "tag": "none"},
        {"action": "nan_saved", "url": url["nan"], "steps": [2, 4], "poisoned_rank": last, "tag": "nan-saved"},
        {"action": "nan_resume", "url": url["nan"], "tag": "nan"},
        {"action": "wait_then_load", "url": url["wait"], "trials": 3, "tag": "wait"},
        {"action": "slow_committer", "url": url["slow"], "delay_s": 1.0, "tag": "slow"},
        {"action": "reuse", "url": url["reuse"], "tag": "reuse"},
        {"action": "prepare_small", "url": url["small"], "tag": "small"},
        {"action": "abandon", "url": url["abandon"], "tag": "abandon"},
    ]


def run_agreement(root: Path, world: int, training: list[dict[str, Any]] | None = None) -> tuple[Path, Path]:
    out, ckpt = root / "out", root / "ckpt"
    out.mkdir()
    crashed = f"file://{ckpt / 'crash'}"
    dies = {"action": "committer_dies", "url": crashed, "step": 9, "tag": "dies"}  # last: rank 0 is gone after it
    run(world, [*agreement_plan(ckpt, world), *(training or []), dies], out, dying=(0,))
    run(world, [{"action": "retry_after_crash", "url": crashed, "step": 9, "tag": "retry"}], out)
    return out, ckpt


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("agreement2")
    ckpt = root / "ckpt"
    training = guarded_plan("fsdp", 1, f"file://{ckpt / 'fsdp'}", "fsdp")
    dptp = str(ckpt / "dptp")
    training += [
        {"action": "save", "url": dptp, "layout": "dp_tp", "tp": 1, "steps": 3, "tag": "dptp"},
        {"action": "load", "url": dptp, "layout": "plain", "tp": 1, "tag": "dptp-to-dp"},
        {"action": "load", "url": dptp, "layout": "dp_tp", "tp": 1, "tag": "dptp-to-dptp"},
        {"action": "load", "url": dptp, "layout": "fsdp", "tp": 1, "tag": "dptp-to-fsdp", "groups_reversed": True},
    ]
    yield run_agreement(root, 2, training)
    shutil.rmtree(root, ignore_errors=True)


def check_fallback(out: Path, world: int) -> None:
    last = world - 1
    for rank, report in enumerate(reports(out, "fb", world)):
        # every rank resumes step 11 (the step after it: 12), each with its own values
        assert report["guard"] == {"value": 12} and report["guard_w"] == 100 * 11 + rank, report
        assert report["load"] == {"value": 11} and report["load_w"] == 100 * 11 + rank, report
        assert report["load_newest"]["error"] == "CheckpointCorruptError", report  # without fallback: every rank raises
        said = [line for line in report["log"] if SKIPPED in line and f"rank {last}:" in line]
        assert said and "fails its checksum" in said[0], report["log"]
        assert any(f"every rank loads {jobs.checkpoint_id(11)}" in line for line in report["log"]), report["log"]
    for report in reports(out, "bad", world):  # nothing loadable on every rank: every rank raises, none starts at 0
        assert report["guard"]["error"] == "CheckpointCorruptError", report
        assert "no checkpoint could be loaded on every rank" in report["guard"]["message"]
        assert report["load"]["error"] == "CheckpointCorruptError"
    for report in reports(out, "none", world):  # no checkpoint anywhere: every rank starts at 0
        assert report["guard"] == {"value": 0} and report["load"]["error"] == "CheckpointNotFoundError"


def check_commits(out: Path, ckpt: Path, world: int) -> None:
    for rank, report in enumerate(reports(out, "wait", world)):  # wait() then load() gives the new step
        for trial, got in enumerate(report["trials"]):
            assert got["waited"] == [10 * trial + 1, 10 * trial + 2] and got["loaded"] == 10 * trial + 2, report
            assert got["w"] == 100 * (10 * trial + 2) + rank
    for report in reports(out, "slow", world):  # a late committer: wait() returns once its manifest is there
        assert report == {"committed": jobs.checkpoint_id(7, "510e"), "manifest_there": True}, report
    for report in reports(out, "dies", world, first=1):  # the committing rank was killed: nobody succeeds
        assert report.get("error") == "CommitError" and "no manifest within" in report["message"], report


def check_ids(out: Path, ckpt: Path, world: int) -> None:
    for rank, report in enumerate(reports(out, "reuse", world)):  # a committed id is refused on every rank
        assert report["again"]["error"] == "CheckpointExistsError" and "already committed" in report["again"]["message"]
        assert report["loaded"] == 5 and report["w"] == 100 * 5 + rank
    with CheckpointStore(f"file://{ckpt / 'reuse'}") as store:
        assert store.verify().ok
    for rank, report in enumerate(reports(out, "retry", world)):  # the relaunch commits its own files whole
        assert report["committed"] == jobs.checkpoint_id(9, "dead") and report["loaded"] == 9
        assert report["w"] == 100 * 9 + rank
    assert reports(out, "retry", world)[0]["verify_ok"] is True


def check_empty_pieces(out: Path, world: int) -> None:
    for rank, report in enumerate(reports(out, "small", world)):  # prepare, save, load with empty pieces
        assert report["committed"] == jobs.checkpoint_id(3, "71ce") and report["loaded"] == 3, report
        assert report["local_numel"] == (1 if rank == 0 else 0) and report["tiny"] == [42.0], report
        assert report["w"] == 100 * 3 + rank, report


def check_abandon(out: Path, world: int) -> None:
    """When any rank's ``abandon()`` says a save will not commit, no rank commits it; every rank agrees."""
    got = reports(out, "abandon", world)
    posted, held, committer = (jobs.checkpoint_id(s) for s in (2, 3, 4))
    for rank, report in enumerate(got):
        assert report["posted"] == {"value": posted}, report  # committed: the last rank's abandon() said so
        if rank == world - 1:
            assert report["posted_abandon"] is False and report["held_abandon"] is True, report
            assert report["held"]["error"] == "CheckpointError" and "abandoned" in report["held"]["message"]
        elif rank == 0:  # did not abandon: its commit waited for the abandoned rank's record, in vain
            assert report["held"]["error"] == "TimeoutError" and f"rank(s) [{world - 1}]" in report["held"]["message"]
        else:  # the others' wait() for the manifest: the committing rank's failure note
            assert report["held"]["error"] == "CommitError", report
        assert report["committer_abandon"] is (rank == 0), report  # elsewhere the record was out: committing
        assert report["committer"]["error"] == ("CheckpointError" if rank == 0 else "CommitError"), report
        assert "abandoned" in report["committer"]["message"], report
        assert report["manifests"] == [jobs.checkpoint_id(1), posted], report  # neither held nor committer
        assert report["loaded"] == 2 and report["w"] == 100 * 2 + rank, report
    assert held not in got[0]["manifests"] and committer not in got[0]["manifests"]


def test_one_corrupt_part_every_rank_resumes_the_same_older_step(two_ranks: tuple[Path, Path]) -> None:
    check_fallback(two_ranks[0], 2)


def check_nan_demoted(out: Path, world: int) -> None:
    for rank, report in enumerate(reports(out, "nan", world)):
        assert report["guard"] == {"value": 3}, report  # step 2, the next older one, on every rank
        assert report["w"] == 200 + rank
        demoted = [line for line in report["log"] if "holds non-finite parameters" in line]
        assert len(demoted) == 1 and f"rank(s) [{world - 1}]" in demoted[0] and "(step 4)" in demoted[0], report


def test_nan_after_restore_on_one_rank_every_rank_resumes_the_older_step(two_ranks: tuple[Path, Path]) -> None:
    check_nan_demoted(two_ranks[0], 2)


def test_wait_means_committed_on_every_rank(two_ranks: tuple[Path, Path]) -> None:
    check_commits(two_ranks[0], two_ranks[1], 2)


def test_committed_ids_are_immutable_and_attempts_unique(two_ranks: tuple[Path, Path]) -> None:
    check_ids(two_ranks[0], two_ranks[1], 2)


def test_ranks_holding_only_empty_pieces_prepare_and_save_with_the_others(two_ranks: tuple[Path, Path]) -> None:
    check_empty_pieces(two_ranks[0], 2)


def test_an_abandoned_save_never_commits_on_any_rank(two_ranks: tuple[Path, Path]) -> None:
    check_abandon(two_ranks[0], 2)


def test_fsdp2_trains_under_the_guard_and_resumes_bitwise(two_ranks: tuple[Path, Path]) -> None:
    out, ckpt = two_ranks
    check_guarded(out, ckpt / "fsdp", "fsdp", 2)


def test_dp_tp_writes_each_chunk_once_and_reshards_bitwise(two_ranks: tuple[Path, Path]) -> None:
    out, ckpt = two_ranks
    written = written_chunks(ckpt / "dptp")
    assert written, "the TP weights are DTensors"
    for name, chunks in written.items():
        assert len(chunks) == len(set(chunks)), f"{name} written {len(chunks)} times: {chunks}"
    saved = tensors(out, "dptp-saved")
    for tag in ("dptp-to-dp", "dptp-to-dptp", "dptp-to-fsdp"):
        assert_identical(saved, tensors(out, f"{tag}-loaded"))
        assert [i["step"] for i in reports(out, f"{tag}-loaded", 2)] == [3, 3]
    assert_identical(tensors(out, "dptp-after"), tensors(out, "dptp-to-dptp-after"))  # continues bitwise
    assert_identical(saved, plain_loaded(str(ckpt / "dptp")))  # 2 → 1 process


@pytest.mark.slow
def test_every_rank_agrees_four_ranks(tmp_path: Path) -> None:
    out, ckpt = run_agreement(tmp_path, 4)
    check_fallback(out, 4)
    check_commits(out, ckpt, 4)
    check_ids(out, ckpt, 4)
    check_empty_pieces(out, 4)
    check_abandon(out, 4)
    check_nan_demoted(out, 4)


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
