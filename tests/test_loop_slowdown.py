"""benchmarks/loop_slowdown.py runs every mode on a tiny state and reports what each checkpoint cost the loop."""

import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "loop_slowdown.py"


@pytest.fixture(scope="module")
def loop_slowdown() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loop_slowdown", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mode_runs_keeps_up_and_its_last_checkpoint_loads_back(loop_slowdown: ModuleType, tmp_path: Any) -> None:
    tiny = [
        "--state-gib",
        "0.001",
        "--width",
        "64",
        "--batch",
        "4",
        "--every",
        "2",
        "--checkpoints",
        "2",
        "--threads",
        "1",
    ]
    args = loop_slowdown.parse([*tiny, "--repeats", "1", "--interval-s", "60", "--dir", str(tmp_path), "--json"])
    summary = loop_slowdown.measure(args)
    assert set(summary["modes"]) == {"gpuguard", "gpuguard_overlap", "dcp_async", "torch_save"}
    assert summary["every_steps"] == 2 and summary["checkpoints_per_run"] == 2
    assert summary["own_interval_s"] == pytest.approx(summary["step_s"] * 2, abs=0.01)
    for mode, figures in summary["modes"].items():
        assert figures["restored"] is True, mode  # the last checkpoint (step 4) loads back
        assert figures["durable_s"] > 0, mode
        assert figures["call_s"] > 0 and math.isfinite(figures["cpu_s_per_checkpoint"]), mode
        assert math.isfinite(figures["extra_s_per_checkpoint"]), mode
        extra = figures["extra_s_per_checkpoint"]
        assert figures["slowdown_at_interval"] == pytest.approx(extra / 60, abs=1e-4), mode
        in_run = figures["in_run_extra_s_per_checkpoint"]
        assert figures["in_run_slowdown_at_interval"] == pytest.approx(in_run / 60, abs=1e-4), mode
    assert list(tmp_path.iterdir()) == []  # nothing left on disk
