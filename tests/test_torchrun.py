"""End to end with real processes: torchrun (gloo, CPU), a fault on one rank's GPU, every rank
checkpoints the same step and leaves; a relaunch resumes and ends bitwise identical to a run that
was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gpuguard import CheckpointStore

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"
LEAVING_WORKER = Path(__file__).parent / "helpers" / "leaving_worker.py"
# Every rank writes its report after its guard has closed. Once the first rank has left with 75/76,
# gpuguard-run waits for the others to leave on their own for this long: in these tests it bounds a
# hang, it is not a timing (the launcher returns as soon as the last worker has left).
LEAVE_GRACE = "--leave-grace-s=120"


def launch(
    folder: Path, nproc: int, fault: dict[str, Any] | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    """gpuguard-run (torchrun underneath) with the fake NVML: healthy H200s, or a fault scenario."""
    cmd, env = command(folder, nproc, fault, *extra)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)


def command(
    folder: Path, nproc: int, fault: dict[str, Any] | None = None, *extra: str
) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "GPUGUARD_FAKE_NVML": "h200", "OMP_NUM_THREADS": "1"}
    if fault is not None:
        scenario = folder.parent / f"{folder.name}-fault.json"
        scenario.write_text(json.dumps({"gpus": nproc, "events": [fault]}))
        env["GPUGUARD_FAKE_NVML"] = str(scenario)
    cmd = [
        sys.executable,
        "-m",
        "gpuguard.integrations.torchrun",
        "--standalone",
        f"--nproc-per-node={nproc}",
        LEAVE_GRACE,
        str(WORKER),
        "--dir",
        str(folder),
        *extra,
    ]
    return cmd, env


def reports(folder: Path, nproc: int) -> list[dict[str, Any]]:
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(nproc)]


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "final.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Final weights of uninterrupted runs, by world size (computed once each)."""
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def get(nproc: int) -> dict[str, torch.Tensor]:
        if nproc not in cache:
            folder = tmp_path_factory.mktemp(f"reference-{nproc}")
            result = launch(folder, nproc)
            assert result.returncode == 0, result.stderr[-3000:]
            cache[nproc] = final_weights(folder)
        return cache[nproc]

    return get


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def evacuate_then_resume(
    tmp_path: Path, nproc: int, fault: dict[str, Any], code: int, *extra: str
) -> list[dict[str, Any]]:
    job = tmp_path / "job"
    first = launch(job, nproc, fault, *extra)
    assert first.returncode == code, first.stderr[-3000:]
    ended = reports(job, nproc)
    assert {r["exit_code"] for r in ended} == {code}
    # every rank checkpointed the same step, into the same checkpoint, and it is committed
    assert len({r["evacuated_at"] for r in ended}) == 1 and len({r["checkpoint"] for r in ended}) == 1
    with CheckpointStore(f"file://{job / 'checkpoints'}") as store:
        latest = store.latest()
        assert latest is not None
        assert (latest.id, latest.step, latest.reason, latest.world_size) == (
            ended[0]["checkpoint"],
            ended[0]["evacuated_at"],
            "emergency",
            nproc,
        )
        assert store.verify(latest.id).ok
        assert latest.evidence["decided_by_rank"] == fault["gpu"]
        assert 0 <= latest.evidence["slowest_rank"] < nproc and latest.evidence["slowest_step_ms"] > 0
    second = launch(job, nproc, None, *extra)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {r["resumed_at"] for r in reports(job, nproc)} == {ended[0]["evacuated_at"] + 1}
    return ended


def test_two_ranks_reschedule_and_resume_identically(tmp_path: Path, reference: Any) -> None:
    evacuate_then_resume(tmp_path, 2, {"at": 1.5, "gpu": 1, "xid": 48}, 75)
    assert_identical(final_weights(tmp_path / "job"), reference(2))


@pytest.mark.slow  # about a minute on 2 cores: the two-rank run above covers the same path in the main suite
def test_four_ranks_replicated_reschedule_and_resume_identically(tmp_path: Path, reference: Any) -> None:
    evacuate_then_resume(tmp_path, 4, {"at": 2.0, "gpu": 1, "xid": 79}, 75, "--replicated")
    assert_identical(final_weights(tmp_path / "job"), reference(4))


@pytest.mark.slow  # 30 s on 2 cores: the two-rank 75 run above takes the same path; 76 itself is tested in test_guard
def test_a_restart_class_fault_exits_76_and_resumes_identically(tmp_path: Path, reference: Any) -> None:
    ended = evacuate_then_resume(tmp_path, 2, {"at": 1.5, "gpu": 1, "xid": 94}, 76)
    assert ended[1]["exit_code"] == 76
    assert_identical(final_weights(tmp_path / "job"), reference(2))


def test_a_rank_killed_during_the_emergency_checkpoint_commits_nothing(tmp_path: Path, reference: Any) -> None:
    job = tmp_path / "job"
    # The periodic checkpoint of step 40 must have committed before the emergency: a fault at a wall-clock time
    # raced it (at 1.5 s a loaded machine had not reached step 40; at 4 s a quick one may finish its 300 steps
    # first). So the XID comes early, and every rank holds its decisions until it has seen that commit.
    first = launch(job, 2, {"at": 0.5, "gpu": 1, "xid": 48}, "--kill-rank", "1", "--act-after-commit")
    assert first.returncode != 0
    with CheckpointStore(f"file://{job / 'checkpoints'}") as store:
        committed = store.list()
        assert committed and all(c.reason == "periodic" for c in committed), first.stderr[-3000:]
        latest = committed[-1]
        assert store.verify(latest.id).ok
        # the emergency checkpoint's folder may exist, but without a manifest nobody trusts it
        emergency = [d for d in store.storage.list_dirs() if d not in {c.id for c in committed}]
        assert all(not store.storage.exists(store.storage.path(d, "MANIFEST.json")) for d in emergency)
    second = launch(job, 2, None)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {r["resumed_at"] for r in reports(job, 2)} == {latest.step + 1}
    assert_identical(final_weights(job), reference(2))


def test_sigterm_to_the_wrapper_checkpoints_both_ranks_at_one_step_and_exits_75(tmp_path: Path, reference: Any) -> None:
    job = tmp_path / "job"
    cmd, env = command(job, 2, None, "--no-periodic")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as wrapper:
        deadline = time.monotonic() + 180  # a guard against hangs, not a timing
        while time.monotonic() < deadline:
            assert wrapper.poll() is None, wrapper.communicate()[1][-3000:]
            text = (job / "progress").read_text().strip() if (job / "progress").exists() else ""
            if text.isdigit() and int(text) >= 60:
                break
            time.sleep(0.05)
        wrapper.send_signal(signal.SIGTERM)  # what the kubelet does: to the container's main process only
        _, stderr = wrapper.communicate(timeout=120)
    assert wrapper.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr.split("SIGTERM forwarded")[-1]
    # The rank that leaves first no longer makes torchrun's agent cut the other before its report.
    ended = reports(job, 2)
    assert {r["exit_code"] for r in ended} == {75}
    assert len({r["evacuated_at"] for r in ended}) == 1 and len({r["checkpoint"] for r in ended}) == 1
    with CheckpointStore(f"file://{job / 'checkpoints'}") as store:
        committed = store.list()  # no periodic checkpoints: only the one the signal asked for
        assert [(c.step, c.reason, c.world_size) for c in committed] == [(ended[0]["evacuated_at"], "emergency", 2)]
        assert committed[0].evidence["signal"] == "SIGTERM" and store.verify(committed[0].id).ok
    for f in job.glob("rank-*.json"):
        f.unlink()
    second = launch(job, 2, None, "--no-periodic")
    assert second.returncode == 0, second.stderr[-3000:]
    assert {r["resumed_at"] for r in reports(job, 2)} == {ended[0]["evacuated_at"] + 1}
    assert_identical(final_weights(job), reference(2))


# -- the leave grace: once a worker exits 75/76, its peers leave on their own --------------------------


def leaving_job(folder: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """gpuguard-run over two plain workers (no torch, no guard) that exit as an evacuated job's do."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gpuguard.integrations.torchrun", "--standalone", "--nproc-per-node=2"]
    cmd += [a for a in extra if a.startswith("--leave")]
    cmd += [str(LEAVING_WORKER), "--dir", str(folder), *(a for a in extra if not a.startswith("--leave"))]
    env = {**os.environ, "GPUGUARD_FAKE_NVML": "h200", **(env or {})}
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def read_until(stream: Any, marker: str) -> str:
    """stderr up to and including the first line holding ``marker`` (all of it if it never comes)."""
    seen = []
    for line in stream:
        seen.append(line)
        if marker in line:
            break
    return "".join(seen)


@pytest.mark.parametrize("code", [75, pytest.param(76, marks=pytest.mark.slow)])  # the same path: 76 in the slow step
def test_after_a_workers_exit_the_others_leave_on_their_own_and_the_code_stays(tmp_path: Path, code: int) -> None:
    with leaving_job(tmp_path, "--code", str(code), "--leave-grace-s=120") as wrapper:
        said = read_until(wrapper.stderr, "to leave on their own")
        # rank 1 runs its last lines only now, after gpuguard-run saw rank 0 leave: without the grace,
        # torchrun's agent would have stopped it before this point, and it would write no report
        (tmp_path / "go").touch()
        rest = wrapper.communicate(timeout=120)[1]
    assert "rank 0 (local rank 0, pid " in said and f"left with exit {code}; the other 1 worker(s) have up to" in said
    assert wrapper.returncode == code, said + rest
    report = json.loads((tmp_path / "rank-1.json").read_text())
    assert report["exit_code"] == code
    assert not (tmp_path / "rank-1.sigterm").exists(), "rank 1 was signalled although it left on its own"
    assert "did not leave" not in rest


def test_a_worker_that_does_not_leave_within_the_grace_is_named_and_signalled(tmp_path: Path) -> None:
    with leaving_job(tmp_path, "--peer", "stay", "--leave-grace-s=0.5") as wrapper:
        stderr = wrapper.communicate(timeout=120)[1]
    assert wrapper.returncode == 75, stderr[-3000:]
    pid = (tmp_path / "ready-1").read_text()
    assert f"rank 1 (local rank 1, pid {pid}) did not leave within" in stderr
    assert (tmp_path / "rank-1.sigterm").read_text() == "1"  # torchrun's SIGTERM, after the grace


@pytest.mark.slow  # about 8 s; the deadline's arithmetic is checked in the main suite below
def test_the_grace_never_runs_past_the_pods_termination_grace(tmp_path: Path) -> None:
    # the kubelet stops the pod: SIGTERM to gpuguard-run, forwarded; rank 0 leaves with 75, rank 1 (like
    # a guard's handler) only records it. A grace of 600 s would outlive the pod's 4 s: it is cut to what
    # is left of them, less the margin gpuguard-run needs to stop rank 1 and exit with its own code.
    env = {"GPUGUARD_TERMINATION_GRACE_S": "4"}
    with leaving_job(tmp_path, "--peer", "stay", "--rank0-on-sigterm", "--leave-grace-s=600", env=env) as wrapper:
        while not (tmp_path / "ready-0").exists():  # the hang guard is pytest-timeout's
            assert wrapper.poll() is None
            time.sleep(0.02)
        wrapper.send_signal(signal.SIGTERM)
        stderr = wrapper.communicate(timeout=120)[1]
    assert wrapper.returncode == 75, stderr[-3000:]
    match = re.search(r"have up to (\d+\.\d) s to leave on their own", stderr)
    assert match and float(match.group(1)) <= 4 - 2, stderr[-3000:]
    assert "rank 1 (local rank 1, pid" in stderr.split("have up to")[1]
    assert (tmp_path / "rank-1.sigterm").read_text() == "2"  # the forwarded SIGTERM, then torchrun's


def test_grace_deadline_is_cut_by_the_pods_kill_time() -> None:
    from gpuguard.integrations._leave_grace import KILL_MARGIN_S, LeaveGrace

    codes = frozenset({75, 76})
    assert LeaveGrace(10.0, codes).deadline(100.0) == 110.0
    assert LeaveGrace(10.0, codes, lambda: 200.0).deadline(100.0) == 110.0
    assert LeaveGrace(600.0, codes, lambda: 130.0).deadline(100.0) == 130.0 - KILL_MARGIN_S


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--leave-grace-s=-1"], {}, "--leave-grace-s"),
        (["--leave-grace-s=nan"], {}, "--leave-grace-s"),
        ([], {"GPUGUARD_LEAVE_GRACE_S": "soon"}, "GPUGUARD_LEAVE_GRACE_S"),
    ],
    ids=["negative", "nan", "env-not-a-number"],
)
def test_a_bad_leave_grace_is_refused_naming_it(
    argv: list[str],
    env: dict[str, str],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gpuguard.integrations.torchrun import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--standalone", "train.py"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "must be a number of seconds, 0 or more" in err
