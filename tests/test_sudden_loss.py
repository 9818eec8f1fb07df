"""A rank dies without warning (SIGKILL) under gpuguard-run (real torchrun processes, gloo on CPU): the
survivors notice, abandon their collectives, save the last step every rank completed from the replicas,
exit 75 (the launcher's code too), and a relaunch resumes bitwise identical to a run never interrupted.

The main suite runs one two-rank case; the slow step runs 20+ four-rank trials at random ranks, steps and
moments (forward, the all-reduce in backward, between steps, during a periodic save, inside the optimizer
step), HSDP on a 2 x 2 mesh, a job without replicas (the clear line, and the periodic fallback), and a rank
that hangs instead of dying (no socket error: only the heartbeat tells, and gloo must be cut loose).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from gpuguard import CheckpointStore
from gpuguard.demo.sudden import Kill, SuddenTrial, final_weights, launch, run_trial, summarize, traced


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Final weights of uninterrupted runs, by (ranks, layout, steps), computed once each."""
    cache: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}

    def get(nproc: int, layout: str, steps: int) -> dict[str, torch.Tensor]:
        key = (nproc, layout, steps)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"reference-{nproc}-{layout}")
            done = launch(folder, nproc, steps=steps, layout=layout)
            assert done.code == 0, done.stderr[-3000:]
            cache[key] = final_weights(folder)
        return cache[key]

    return get


def expected_step(kill: Kill) -> int:
    """The last step every rank completed: the dead rank's own step, unless it died inside it."""
    return kill.step - 1 if kill.phase in ("forward", "backward") else kill.step


def check_trial(trial: SuddenTrial, folder: Path, nproc: int, steps: int, *, compared: bool = True) -> None:
    """Everything the acceptance asks of one trial, with the trial in every message."""
    kill, where = trial.kill, f"{trial.kill} -> {trial.accounting()}"
    assert trial.first.code == 75, f"{where}\n{trial.first.stderr[-4000:]}"
    assert trial.killed["rank"] == kill.rank and trial.killed["step"] == kill.step, where
    survivors = [r for r in range(nproc) if r != kill.rank]
    assert sorted(trial.first.reports) == survivors, where
    saved = expected_step(kill)
    for rank in survivors:
        report = trial.first.reports[rank]
        outcome = report["sudden_loss"]
        assert report["exit_code"] == 75 and outcome["result"] == "saved", (where, report)
        assert (outcome["lost"], outcome["members"], outcome["step"]) == ([kill.rank], survivors, saved), where
        committers = f"rank{'s' if len(survivors) > 1 else ''} {', '.join(map(str, survivors))}"
        assert report["message"] == (
            f"peer rank {kill.rank} lost at step {saved}, checkpoint of step {saved} committed by {committers}"
        )
    assert f"gpuguard-run: rank {survivors[0]}: peer rank {kill.rank} lost at step {saved}" in trial.first.stderr
    store = CheckpointStore(f"file://{folder / 'checkpoints'}")
    (info,) = [c for c in store.list() if c.id == trial.outcome["checkpoint_id"]]  # the relaunch saved more since
    assert info.step == saved and info.reason == "emergency", where
    assert info.evidence["sudden_loss"]["survivors"] == survivors, where
    assert store.verify(info.id).ok, where
    assert trial.steps_replayed is not None and trial.steps_replayed <= 1, where
    assert trial.detect_s is not None and trial.committed_s is not None and trial.detect_s <= trial.committed_s
    resume = trial.resume
    assert resume is not None and resume.code == 0, f"{where}\n{resume.stderr[-4000:] if resume else ''}"
    assert {r["resumed_at"] for r in resume.reports.values()} == {saved + 1}, where
    assert {r["batches"] for r in resume.reports.values()} == {steps}, where  # every rank's data position came back
    if compared:
        assert trial.identical, f"{where}: the resumed run's final weights differ from the uninterrupted run's"


@pytest.mark.slow  # two launches of two ranks (30 s quiet, a minute under load): tests/test_peers.py covers the parts in the main suite
@pytest.mark.timeout(600)
def test_two_ranks_one_killed_in_its_all_reduce_the_survivor_saves_and_every_rank_resumes_its_exact_state(
    tmp_path: Path,
) -> None:
    # Two launches, no reference run (the slow tests compare final weights): every rank's state after the
    # resume — parameters, optimizer, scheduler, its RNG and data position — is the one it had at the saved
    # step, the dead rank's included; training from there is deterministic.
    steps, kill = 8, Kill(rank=1, step=5, phase="backward")
    trial = run_trial(tmp_path, 2, kill, steps=steps, trace=True)
    check_trial(trial, tmp_path, 2, steps, compared=False)
    saved = expected_step(kill)
    assert trial.resume is not None
    for rank in range(2):
        before = traced(tmp_path, rank)[saved]  # written by the rank itself at guard.step(saved), before the loss
        assert trial.resume.reports[rank]["resumed_digest"] == before, f"rank {rank}'s state differs after the resume"
    # The survivor knew from /proc on this host well inside the default bound (peer_timeout_s + 2 heartbeats).
    assert "process (pid" in trial.outcome["alarm"]["why"] and trial.detect_s is not None and trial.detect_s < 4.0


PHASES = ("forward", "backward", "between", "periodic", "optimizer")


@pytest.mark.slow  # 20 trials x 2 four-rank launches: about half an hour on 2 cores
@pytest.mark.timeout(7200)
def test_four_ranks_random_ranks_random_moments_twenty_trials(tmp_path: Path, reference: Any) -> None:
    # Not a GPUGUARD_ variable: the workers inherit the environment, and the guard refuses unknown ones.
    steps, periodic, trials = 12, 4, int(os.environ.get("SUDDEN_LOSS_TRIALS", "20"))
    expected = reference(4, "ddp", steps)
    chooser = random.Random(22)  # reproducible: each trial is printed with its kill
    results = []
    for number in range(trials):
        phase = PHASES[number % len(PHASES)] if number < len(PHASES) else chooser.choice(PHASES)
        step = chooser.choice([4, 8]) if phase == "periodic" else chooser.randint(2, steps - 3)
        kill = Kill(rank=chooser.randrange(4), step=step, phase=phase)
        folder = tmp_path / f"trial-{number}"
        trial = run_trial(folder, 4, kill, steps=steps, periodic_every=periodic, reference=expected)
        check_trial(trial, folder, 4, steps)
        results.append(trial.accounting())
        for leftover in folder.glob("checkpoints/*"):  # bound what the trials keep on the shared disk
            if leftover.is_dir():
                for file in leftover.iterdir():
                    file.unlink()
    print(json.dumps({"detect_s": summarize([r["detect_s"] for r in results]), "trials": results}, indent=1))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "kill",
    [  # every moment, and a rank of each shard and each replica (rank 0 is the committer: its files move)
        Kill(rank=3, step=5, phase="backward"),
        Kill(rank=3, step=5, phase="between"),
        Kill(rank=1, step=5, phase="forward"),
        Kill(rank=2, step=6, phase="optimizer"),
        Kill(rank=0, step=4, phase="periodic"),
    ],
    ids=lambda kill: f"{kill.phase}-rank{kill.rank}",
)
def test_hsdp_2x2_one_rank_lost_its_shard_replica_saves_it(tmp_path: Path, reference: Any, kill: Kill) -> None:
    steps = 10
    trial = run_trial(
        tmp_path, 4, kill, steps=steps, layout="hsdp", periodic_every=4, reference=reference(4, "hsdp", steps)
    )
    check_trial(trial, tmp_path, 4, steps)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_without_a_replica_the_survivors_say_which_piece_and_the_rerun_resumes_from_the_periodic(
    tmp_path: Path,
) -> None:
    steps, kill = 10, Kill(rank=1, step=7, phase="backward")
    trial = run_trial(tmp_path, 2, kill, steps=steps, layout="fsdp", periodic_every=4, resume=False)
    assert trial.first.code == 75, trial.first.stderr[-4000:]
    assert trial.killed["step"] == kill.step, "the kill inside FSDP2's backward did not fire"
    outcome = trial.first.reports[0]["sudden_loss"]
    assert outcome["result"] == "cannot"
    assert outcome["message"].startswith(
        "peer rank 1 lost; no survivor checkpoint: no survivor holds the shard at shard=1"
    )
    assert "rank(s) 1 lost" in outcome["message"]
    # How much the loss cost, said: the next run resumes from the periodic checkpoint of step 4.
    assert (
        "; the next run resumes from the newest committed checkpoint, step 4 (step-000000000004-"
        in (outcome["message"])
    )
    store = CheckpointStore(f"file://{tmp_path / 'checkpoints'}")
    assert [c.step for c in store.list()] == [4]  # the periodic one; nothing half-written was committed
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-000000000006")]
    resume = launch(tmp_path, 2, steps=steps, layout="fsdp", periodic_every=4)
    assert resume.code == 0, resume.stderr[-4000:]
    assert {r["resumed_at"] for r in resume.reports.values()} == {5}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_hung_rank_is_found_by_its_silence_and_gloo_is_cut_loose(tmp_path: Path, reference: Any) -> None:
    """SIGSTOP: the rank's sockets stay open (as when its node vanishes), so no collective fails by itself.
    Only the heartbeat tells, and only shutting gloo's sockets ends the blocked all-reduce in time."""
    steps = 10
    folder = tmp_path / "job"
    env = {"GPUGUARD_PEER_TIMEOUT_S": "2", "GPUGUARD_PEER_HEARTBEAT_S": "0.25"}
    started = time.monotonic()
    done = _launch_and_stop(folder, steps=steps, env=env)
    assert done.code == 75, done.stderr[-4000:]
    outcome = done.reports[0]["sudden_loss"]
    assert outcome["result"] == "saved" and outcome["lost"] == [1] and "sent no heartbeat" in outcome["alarm"]["why"]
    assert time.monotonic() - started < 300  # far below gloo's 30-minute default
    resume = launch(folder, 2, steps=steps)
    assert resume.code == 0 and {r["resumed_at"] for r in resume.reports.values()} == {outcome["step"] + 1}
    assert torch.equal(final_weights(folder)["module.0.weight"], reference(2, "ddp", steps)["module.0.weight"])


def _launch_and_stop(folder: Path, *, steps: int, env: dict[str, str]) -> Any:
    """Launch 2 ranks; stop rank 1 (SIGSTOP) inside its all-reduce of step 5; kill it once the survivor left."""
    import threading

    def stop_then_kill() -> None:
        killed = folder / "stopped.json"
        deadline = time.monotonic() + 240
        while not killed.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = json.loads(killed.read_text())["pid"]
        while not (folder / "rank-0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)  # the launcher would wait 30 s for a stopped worker

    watcher = threading.Thread(target=stop_then_kill, daemon=True)
    watcher.start()
    done = launch(folder, 2, steps=steps, kill=Kill(rank=1, step=5, phase="stop"), env=env)
    watcher.join(5)
    return done


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_rank_that_raises_is_saved_from_but_the_launcher_exit_counts(tmp_path: Path) -> None:
    """A bug is not a lost node: the survivors still save, but exit 75 would restart it forever uncounted."""
    steps, kill = 8, Kill(rank=1, step=5, phase="raise")
    trial = run_trial(tmp_path, 2, kill, steps=steps, resume=False)
    assert trial.first.code == 1, trial.first.stderr[-4000:]
    assert (
        "a worker failed with exit 1 (its own error, not a lost rank): exit 1 so that it counts" in trial.first.stderr
    )
    outcome = trial.first.reports[0]["sudden_loss"]
    assert outcome["result"] == "saved" and outcome["step"] == 4
    info = CheckpointStore(f"file://{tmp_path / 'checkpoints'}").latest()
    assert info is not None and info.step == 4


@pytest.mark.slow  # four spawned gloo processes
@pytest.mark.timeout(900)
def test_hsdp_survivors_write_the_lost_ranks_files_from_the_replica_of_its_shard(tmp_path: Path) -> None:
    """The HSDP path of the survivors' save on its own (the end-to-end HSDP tests above need FSDP2 to train
    under the guard): rank 1 of a 2 x 2 (replicate, shard) mesh is lost; rank 3 holds the same shard and
    writes rank 1's files, chunks included, with no collective; the checkpoint is the job's whole state."""
    import socket

    import torch.multiprocessing as mp
    from helpers import hsdp_survivors
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(hsdp_survivors.worker, args=(port, str(tmp_path)), nprocs=4, join=True)
    plan = json.loads((tmp_path / "plan-0.json").read_text())
    assert plan["groups"] == [[0, 2], [1, 3]] and plan["writers"] == {"0": 0, "1": 3, "2": 2, "3": 3}
    assert plan["labels"][1] == "the shard at shard=1 of 'model/w' on mesh ('replicate', 'shard')"
    store = CheckpointStore(f"file://{tmp_path / 'checkpoints'}")
    info = store.latest()
    assert info is not None and (info.step, info.world_size, info.reason) == (2, 4, "emergency")
    assert store.verify(info.id).ok
    expected = load_file(str(tmp_path / "expected.safetensors"))
    for rank in range(4):
        plain = hsdp_survivors.state(None)
        assert store.load(plain, rank=rank, world_size=4) == 2
        got = {f"model.{k}": v for k, v in plain["model"].state_dict().items()}
        for index, per in plain["optimizer"].state_dict()["state"].items():
            got.update({f"optimizer.{index}.{key}": value for key, value in per.items()})
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), rank
        saved_rng = torch.frombuffer(bytearray((tmp_path / f"rng-{rank}.pt").read_bytes()), dtype=torch.uint8)
        assert torch.equal(torch.get_rng_state(), saved_rng), f"rank {rank}'s RNG"  # the dead rank's too


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_copy_of_the_lost_ranks_state_the_survivors_say_which_and_the_rerun_uses_the_periodic(
    tmp_path: Path,
) -> None:
    """DDP with replicated=False: the guard may not take one rank's tensors for another's, so nothing
    survives of rank 1's part. One line says so; nothing is committed; the rerun resumes from the
    newest periodic checkpoint that was committed before the loss."""
    steps, kill = 12, Kill(rank=1, step=9, phase="backward")
    trial = run_trial(tmp_path, 2, kill, steps=steps, layout="ddp-per-rank", periodic_every=2, resume=False)
    assert trial.first.code == 75, trial.first.stderr[-4000:]
    outcome = trial.first.reports[0]["sudden_loss"]
    assert outcome["result"] == "cannot" and outcome["lost"] == [1]
    assert outcome["message"].startswith(
        "peer rank 1 lost; no survivor checkpoint: no survivor holds rank 1's tensors (the state is per rank: set "
        "replicated=True for data-parallel replicas) at step 8: rank(s) 1 lost; the next run resumes from "
    )
    assert f"gpuguard-run: rank 0: {outcome['message']}" in trial.first.stderr
    committed = CheckpointStore(f"file://{tmp_path / 'checkpoints'}").list()
    assert committed and all(c.reason == "periodic" for c in committed)  # nothing of the survivors' committed
    newest = committed[-1].step  # a periodic save still in flight when rank 1 died never commits: older ones did
    assert newest in (2, 4, 6, 8)
    assert outcome["message"].endswith(f"the newest committed checkpoint, step {newest} ({committed[-1].id})")
    resume = launch(tmp_path, 2, steps=steps, layout="ddp-per-rank", periodic_every=2)
    assert resume.code == 0 and {r["resumed_at"] for r in resume.reports.values()} == {newest + 1}
