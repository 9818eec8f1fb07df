"""GpuGuardCallback in real processes: how they exit, and 2-rank DDP under each launcher users run.

The job is ``tests/helpers/lightning_job.py``. Faults are placed by step (``--evacuate-at-step``: one
rank requests an evacuation as that global step begins, the ranks agree on the step to leave at), so
nothing depends on how fast a loaded machine runs; the fake NVML (two healthy H200s) stands in for the
GPUs, and a fault scenario on rank 1's GPU for the XID path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gpuguard import CheckpointStore

JOB = Path(__file__).parent / "helpers" / "lightning_job.py"
RUN_S = 280  # a hang guard per launch, not a timing

LAUNCHERS: dict[str, list[str]] = {
    # Lightning's own DDP launcher: rank 0 is the parent of rank 1 and kills it when a rank fails.
    "plain": [sys.executable, str(JOB), "--devices", "2"],
    "gpuguard-run": [
        sys.executable,
        "-m",
        "gpuguard.integrations.torchrun",
        "--standalone",
        "--nproc-per-node=2",
        str(JOB),
    ],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(JOB)],
}


def healthy_gpus(folder: Path, faults: list[dict[str, Any]] | None = None) -> str:
    scenario = folder / f"scenario-{len(list(folder.glob('scenario-*')))}.json"
    scenario.write_text(json.dumps({"gpus": 2, "events": faults or []}))
    return str(scenario)


def run_job(
    command: list[str], folder: Path, *args: str, faults: list[dict[str, Any]] | None = None
) -> subprocess.CompletedProcess[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for report in folder.glob("rank-*.json"):
        report.unlink()
    env = {**os.environ, "GPUGUARD_FAKE_NVML": healthy_gpus(folder, faults), "OMP_NUM_THREADS": "1"}
    cmd = [*command, "--dir", str(folder), "--sleep", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_S, check=False)


def rank_reports(folder: Path, ranks: int = 2) -> list[dict[str, Any]]:
    """Each rank's report; a rank that waits for its parent to leave writes it a moment after."""
    limit = time.monotonic() + RUN_S  # a hang guard, not a timing
    paths = [folder / f"rank-{r}.json" for r in range(ranks)]
    while not all(p.exists() for p in paths):
        assert time.monotonic() < limit, f"missing: {[p.name for p in paths if not p.exists()]}"
        time.sleep(0.05)
    return [json.loads(p.read_text()) for p in paths]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), f"{name} differs"


# -- one process ---------------------------------------------------------------------------------


def test_a_teardown_that_raises_after_the_evacuation_still_exits_75(tmp_path: Path) -> None:
    # Another callback's on_exception raises what cleanup on a failed GPU raises: Python would end
    # the process with 1 and a traceback (the Job would count it against backoffLimit).
    done = run_job(
        [sys.executable, str(JOB)], tmp_path, "--epochs", "1", "--evacuate-at-step", "3", "--teardown-raises"
    )
    assert done.returncode == 75, done.stderr[-3000:]
    assert "RuntimeError raised while leaving after the evacuation at step 4" in done.stderr
    assert "RuntimeError: CUDA error: uncorrectable ECC error encountered (simulated in teardown)" in done.stderr
    [info] = CheckpointStore(f"file://{tmp_path / 'checkpoints'}").list()
    assert (info.step, info.reason) == (4, "emergency")


# -- two ranks, DDP (gloo): each launcher users run ------------------------------------------------


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted 2-rank run (4 epochs of 8 batches a rank: 32 steps)."""
    folder = tmp_path_factory.mktemp("ddp-reference")
    done = run_job(LAUNCHERS["gpuguard-run"], folder, "--epochs", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["global_step"] for r in rank_reports(folder)] == [32, 32]
    return load_file(str(folder / "final.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three launches of two ranks each; a hang guard on a loaded machine
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_ddp_evacuates_together_and_resumes_bitwise(
    tmp_path: Path, launcher: str, ddp_reference: dict[str, torch.Tensor]
) -> None:
    # Rank 1 asks to leave as global step 9 begins; with sync_every=1 the ranks start agreeing after
    # step 10 and both checkpoint step 11, mid-epoch (epoch 1, batch 2). A second evacuation follows in
    # the resumed run at an epoch's last batch (step 16, checkpointed at the epoch's end); a third run
    # finishes, bitwise as the uninterrupted one.
    store = CheckpointStore(f"file://{tmp_path / 'checkpoints'}")
    for request, step, batch in ((9, 11, [1, 2, 10]), (14, 16, [1, 7, 15])):
        args = ["--epochs", "4", "--sync-every", "1", "--evacuate-at-step", str(request), "--evacuate-rank", "1"]
        if launcher == "plain" and request == 9:
            # Rank 0 (the parent) tears down for 6 s: Lightning's launcher checks its children every
            # 5 s and terminates rank 0 once one has exited non-zero, so rank 1 must leave after it.
            args += ["--linger-rank0", "6"]
        done = run_job(LAUNCHERS[launcher], tmp_path, *args)
        # gpuguard-run and Lightning's launcher leave with the evacuation's code; torchrun reports a
        # failed worker its own way (1), which is why gpuguard-run exists.
        assert done.returncode == (1 if launcher == "torchrun" else 75), done.stderr[-3000:]
        reports = rank_reports(tmp_path)
        assert [r["exit_code"] for r in reports] == [75, 75]
        assert [r["global_step"] for r in reports] == [step, step]
        assert [r["last_batch"] for r in reports] == [batch, batch]  # (epoch, batch, global step before it)
        newest = store.latest()
        assert newest is not None and (newest.step, newest.reason, newest.world_size) == (step, "emergency", 2)
    done = run_job(LAUNCHERS[launcher], tmp_path, "--epochs", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    reports = rank_reports(tmp_path)
    assert [r["resumed_from"] for r in reports] == [newest.id, newest.id]
    assert [r["first_batch"] for r in reports] == [[2, 0, 16], [2, 0, 16]]
    assert [r["global_step"] for r in reports] == [32, 32]
    assert_identical(load_file(str(tmp_path / "final.safetensors")), ddp_reference)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_xid_on_one_rank_evacuates_both_and_resumes_bitwise(
    tmp_path: Path, ddp_reference: dict[str, torch.Tensor]
) -> None:
    # The fake NVML's XID 48 on rank 1's GPU (at 1 s of its clock): the ranks agree, both checkpoint
    # the same step and leave with 75 through gpuguard-run; the resumed run ends as the uninterrupted one.
    xid = [{"at": 1.0, "gpu": 1, "xid": 48}]
    done = run_job(LAUNCHERS["gpuguard-run"], tmp_path, "--epochs", "4", "--sleep", "0.1", faults=xid)
    assert done.returncode == 75, done.stderr[-3000:]
    reports = rank_reports(tmp_path)
    assert [r["exit_code"] for r in reports] == [75, 75]
    assert reports[0]["last_batch"] == reports[1]["last_batch"]  # both stopped after the same batch
    [info] = CheckpointStore(f"file://{tmp_path / 'checkpoints'}").list()
    assert (info.step, info.reason, info.world_size) == (reports[0]["global_step"], "emergency", 2)
    done = run_job(LAUNCHERS["gpuguard-run"], tmp_path, "--epochs", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    reports = rank_reports(tmp_path)
    assert reports[0]["resumed_from"] == info.id and reports[0]["first_batch"][2] == info.step
    assert_identical(load_file(str(tmp_path / "final.safetensors")), ddp_reference)
