"""Preemption end to end, with real processes: SIGTERM mid-run, a committed checkpoint at the step
the job was in, exit 75, and a rerun that finishes bitwise identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
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

HELPERS = Path(__file__).parent / "helpers"
JOB = HELPERS / "realistic_job.py"


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "GPUGUARD_FAKE_NVML": "h200", "OMP_NUM_THREADS": "1", **extra}


def run_job(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(JOB), "--dir", str(folder), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, check=False)


def wait_for_progress(process: subprocess.Popen[str], progress: Path, at_least: int) -> int:
    """Until the job has finished ``at_least`` steps (a guard against hangs, not a timing)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        text = progress.read_text().strip() if progress.exists() else ""
        if text.isdigit() and int(text) >= at_least:
            return int(text)
        time.sleep(0.05)
    raise AssertionError("the job made no progress")


def read_progress(progress: Path) -> int:
    """The job's last finished step, now (it rewrites the file each step: an empty read is retried)."""
    deadline = time.monotonic() + 60  # a hang guard, not a timing
    while not (text := progress.read_text().strip()).isdigit():
        assert time.monotonic() < deadline, "no progress to read"
        time.sleep(0.01)
    return int(text)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "final.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("reference")
    result = run_job(folder, "--pause", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"weights": weights(folder), "report": json.loads((folder / "report.json").read_text())}


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("plain-reference")
    result = run_job(folder, "--pause", "0", "--plain-loader")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"weights": weights(folder)}


def test_sigterm_mid_epoch_checkpoints_exits_75_and_resumes_identically(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    job = tmp_path / "job"
    cmd = [sys.executable, str(JOB), "--dir", str(job)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) as process:
        seen = wait_for_progress(process, job / "progress", 45)  # in the second epoch (32 batches each)
        process.send_signal(signal.SIGTERM)
        # Read after the signal was sent: the job was at most here when it arrived. (A bound taken from `seen`
        # raced the job: on a loaded machine this process may be held up before the send for steps on end.)
        sent_at_most = read_progress(job / "progress")
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    ended = json.loads((job / "report.json").read_text())
    # the step it was in when the signal came: the next step() after it (the one after that when the signal
    # came between its step() and its progress line)
    assert ended["signal"] == "SIGTERM" and seen < ended["evacuated_at"] <= sent_at_most + 2
    assert ended["evacuated_at"] % 32 != 31  # mid-epoch, not at an epoch's end
    assert 0 < ended["to_durable_s"] < 25
    with CheckpointStore(f"file://{job / 'checkpoints'}") as store:
        committed = store.list()
        assert [(c.step, c.reason) for c in committed] == [(ended["evacuated_at"], "emergency")]
        assert committed[0].evidence["signal"] == "SIGTERM"
        assert store.verify(committed[0].id).ok
    resumed = run_job(job, "--pause", "0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((job / "report.json").read_text())
    assert report["resumed_at"] == ended["evacuated_at"] + 1
    assert report["progress"] == reference["report"]["progress"]  # the dict came back in place
    assert_identical(weights(job), reference["weights"])


@pytest.mark.parametrize(
    "loader",
    # the plain DataLoader's recipe (~30 s on 2 cores with its own reference run) runs in the slow step
    ["stateful", pytest.param("plain", marks=pytest.mark.slow)],
    ids=["StatefulDataLoader", "DataLoader-recipe"],
)
def test_an_xid_fault_mid_epoch_resumes_identically(
    tmp_path: Path, request: pytest.FixtureRequest, loader: str
) -> None:
    extra = ["--plain-loader"] if loader == "plain" else []
    # each variant computes only its own reference run
    expected = request.getfixturevalue("plain_reference" if loader == "plain" else "reference")
    job = tmp_path / "job"
    scenario = tmp_path / "xid.json"
    scenario.write_text(json.dumps({"gpus": 1, "events": [{"at": 1.5, "gpu": 0, "xid": 48}]}))
    cmd = [sys.executable, str(JOB), "--dir", str(job), *extra]
    first = subprocess.run(
        cmd, capture_output=True, text=True, env=env(GPUGUARD_FAKE_NVML=str(scenario)), timeout=300, check=False
    )
    assert first.returncode == 75, first.stderr[-3000:]
    ended = json.loads((job / "report.json").read_text())
    assert ended["signal"] is None and 0 < ended["evacuated_at"] < 99
    resumed = run_job(job, "--pause", "0", *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((job / "report.json").read_text())["resumed_at"] == ended["evacuated_at"] + 1
    assert_identical(weights(job), expected["weights"])
