"""``gpuguard demo``: the README's main job, end to end, in real processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow  # three 200-step training runs in fresh processes (50 s on 2 cores, 120 s under load)
def test_demo_resumes_bitwise_identical(cli: Any, tmp_path: Path) -> None:
    result = cli("demo", "--dir", str(tmp_path), "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["identical"] is True
    assert summary["steps_lost"] == 0
    assert summary["exit_code_pod_a"] == 75
    assert summary["resumed_at_step"] == summary["evacuated_at_step"] + 1
    assert 0 <= summary["detection_latency_s"] < 1.0
    assert 0 < summary["stall_s"] <= summary["durable_s"]
    assert summary["wall_s"] < 60
    # the timeline went to stderr, for people
    assert "IDENTICAL" in result.stderr and "exit 75" in result.stderr


def test_demo_rejects_a_fault_after_the_end(cli: Any) -> None:
    result = cli("demo", "--steps", "50", "--fault-step", "80")
    assert result.returncode == 2
    assert "--fault-step: 80 is not valid; must be between 0 and --steps (50)" in result.stderr
