"""The examples, run as a user would: a fault makes the job leave with 75; run again, it resumes and finishes.

plain_loop.py, lightning_example.py and torchrun_ddp.py get the fault from a scenario through
GPUGUARD_FAKE_NVML; hf_trainer_example.py from its ``--evacuate-at-step`` flag (placed by step)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpuguard import CheckpointStore

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
FAULT = EXAMPLES / "scenarios" / "xid48-gpu0-at-2s.json"


def run(argv: list[str], fake: str | Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPUGUARD_FAKE_NVML": str(fake), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=280, check=False, cwd=tmp_path)


def evacuate_then_resume(argv: list[str], tmp_path: Path) -> tuple[int, str]:
    """Runs with the fault (exit 75, one emergency checkpoint), then healthy (exit 0); returns the
    checkpoint's step and the second run's output."""
    url = f"file://{tmp_path / 'ckpt'}"
    argv = [*argv, "--checkpoint-dir", url]
    first = run(argv, FAULT, tmp_path)
    assert first.returncode == 75, first.stdout[-2000:] + first.stderr[-3000:]
    emergency = [c for c in CheckpointStore(url).list() if c.reason == "emergency"]
    assert len(emergency) == 1
    second = run(argv, "h200", tmp_path)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    return emergency[0].step, second.stdout


def test_plain_loop(tmp_path: Path) -> None:
    step, out = evacuate_then_resume([sys.executable, str(EXAMPLES / "plain_loop.py")], tmp_path)
    assert f"starting at step {step + 1}" in out
    assert "finished step 299" in out


@pytest.mark.slow  # ~25 s on 2 cores; the Lightning evacuate/resume path runs in tests/test_lightning.py in the main suite
def test_lightning_example(tmp_path: Path) -> None:
    step, out = evacuate_then_resume([sys.executable, str(EXAMPLES / "lightning_example.py")], tmp_path)
    match = re.search(r"finished at global step (\d+) \(resumed from step-(\d+)-", out)
    assert match, out
    assert int(match.group(1)) == 4 * 32 and int(match.group(2)) == step


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lightning_example_ddp_under_gpuguard_run(tmp_path: Path) -> None:
    # The README's DDP command: the scenario's XID lands at a step (its clock driven by the steps), not
    # after 2 s of a wall clock that a busy 2-core machine's 64 steps may never reach.
    launcher = [sys.executable, "-m", "gpuguard.integrations.torchrun", "--standalone", "--nproc-per-node", "2"]
    argv = [*launcher, str(EXAMPLES / "lightning_example.py"), "--scenario-seconds-per-step", "0.25"]
    step, out = evacuate_then_resume(argv, tmp_path)
    [info] = CheckpointStore(f"file://{tmp_path / 'ckpt'}").list()
    assert info.world_size == 2 and 8 <= step < 64  # the XID at scenario second 2 is step 8
    match = re.search(r"finished at global step (\d+) \(resumed from step-(\d+)-", out)
    assert match, out
    assert int(match.group(1)) == 4 * 16 and int(match.group(2)) == step


@pytest.mark.slow
def test_torchrun_ddp(tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "gpuguard.integrations.torchrun", "--standalone", "--nproc-per-node=2"]
    step, out = evacuate_then_resume([*launcher, str(EXAMPLES / "torchrun_ddp.py")], tmp_path)
    assert f"starting at step {step + 1}" in out
    assert "finished step 299" in out


@pytest.mark.slow
def test_hf_trainer_example_evacuates_under_gpuguard_run(tmp_path: Path) -> None:
    # Two ranks on a 2-core machine: the fault is placed by step (after optimizer step 5, on rank 1),
    # so it lands mid-run however slow the machine is; the ranks agree (sync_every=2) on step 7.
    healthy = tmp_path / "two-healthy-gpus.json"
    healthy.write_text('{"gpus": 2, "events": []}')
    launcher = [sys.executable, "-m", "gpuguard.integrations.torchrun", "--standalone", "--nproc-per-node=2"]
    url = f"file://{tmp_path / 'ckpt'}"
    argv = [*launcher, str(EXAMPLES / "hf_trainer_example.py"), "--checkpoint-dir", url]
    argv += ["--output-dir", str(tmp_path / "output")]
    first = run([*argv, "--evacuate-at-step", "5"], healthy, tmp_path)
    assert first.returncode == 75, first.stdout[-2000:] + first.stderr[-3000:]
    [emergency] = CheckpointStore(url).list()
    assert (emergency.step, emergency.reason, emergency.world_size) == (7, "emergency", 2)
    second = run(argv, healthy, tmp_path)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} finished at global step 16 (resumed from {emergency.id})" in second.stdout
