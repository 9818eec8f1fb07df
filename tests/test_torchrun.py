"""End to end with real processes: torchrun (gloo, CPU), a fault on one rank's GPU, every rank
checkpoints the same step and leaves; a relaunch resumes and ends bitwise identical to a run that
was never interrupted."""

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

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"


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


def test_a_restart_class_fault_exits_76_and_resumes_identically(tmp_path: Path, reference: Any) -> None:
    ended = evacuate_then_resume(tmp_path, 2, {"at": 1.5, "gpu": 1, "xid": 94}, 76)
    assert ended[1]["exit_code"] == 76
    assert_identical(final_weights(tmp_path / "job"), reference(2))


def test_a_rank_killed_during_the_emergency_checkpoint_commits_nothing(tmp_path: Path, reference: Any) -> None:
    job = tmp_path / "job"
    first = launch(job, 2, {"at": 1.5, "gpu": 1, "xid": 48}, "--kill-rank", "1")
    assert first.returncode != 0
    with CheckpointStore(f"file://{job / 'checkpoints'}") as store:
        committed = store.list()
        assert committed and all(c.reason == "periodic" for c in committed)
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
    # A rank that leaves first makes torchrun's agent stop the others with its own SIGTERM; one that
    # arrives after rank 0 committed and closed its guard can end rank 0 before its report is written.
    # The committed manifest is the truth; every report that was written must agree with it.
    ended = [json.loads(f.read_text()) for f in sorted(job.glob("rank-*.json"))]
    assert ended and {r["exit_code"] for r in ended} == {75}
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
