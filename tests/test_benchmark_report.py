"""benchmarks/run_all.py turns measurements into the report: the table states each goal honestly."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def run_all() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("run_all", BENCHMARKS / "run_all.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(run_all: ModuleType) -> dict[str, Any]:
    nan = float("nan")
    results = {
        "memory copy": {"stall_s": 0.2, "durable_s": nan, "resume_s": nan},
        "gpuguard": {"stall_s": 0.24, "durable_s": 3.9, "resume_s": 1.5, "resume_fresh_s": 2.0, "prepare_s": 0.4},
        "torch.save": {"stall_s": 3.0, "durable_s": 3.0, "resume_s": 1.2, "resume_fresh_s": 2.5},
        "dcp.async_save": {"stall_s": 1.5, "durable_s": 4.9, "resume_s": 1.4},
        "raw write (8 threads)": {"stall_s": nan, "durable_s": 3.0, "resume_s": 0.3},
    }
    checkpoint = {
        "size_mib": 1024.0,
        "device": "cpu",
        "repeats": 5,
        "command": "python benchmarks/checkpoint.py --size-mib 1024 --device cpu --repeats 5",
        "results": results,
        "ratios": {
            "stall_vs_memory_copy": 1.2,
            "stall_vs_dcp_async_save": 0.16,
            "durable_vs_parallel_raw_write": 1.3,
            "resume_vs_torch_load": 1.25,
            "resume_vs_parallel_raw_read": 5.0,
            "new_process_resume_vs_torch_load": 0.8,
        },
        "goals": {
            "stall_vs_memory_copy": 1.5,
            "stall_vs_dcp_async_save": 0.5,
            "durable_vs_parallel_raw_write": 1.15,
            "resume_vs_torch_load": 1.0,
            "resume_vs_parallel_raw_read": 2.0,
        },
    }
    report = {
        "name": "test-machine",
        "when": "2026-11-27 19:00 UTC",
        "command": "python benchmarks/run_all.py",
        "machine": {"cpu": "Test CPU", "cpus": 2, "memory_gib": 24, "platform": "Linux", "python": "3.11"},
        "benchmarks": {"checkpoint": checkpoint, "s3": {"error": "exit 1: moto did not start"}},
    }
    report["goodput"] = run_all.goodput(checkpoint, failures=5_000)
    return report


def test_the_table_marks_each_goal_met_or_not(run_all: ModuleType) -> None:
    text = run_all.markdown(_report(run_all))
    assert "| gpuguard | 0.2400 | 3.900 | 1.500 | 2.000 |" in text
    assert "| memory copy | 0.2000 | - | - | - |" in text
    assert "| resume vs torch load | 1.250 | ≤ 1.0 (not met) |" in text
    assert "| resume vs parallel raw read | 5.000 | ≤ 2.0 (not met) |" in text
    assert "| new process resume vs torch load | 0.800 |  |" in text
    assert "| stall vs memory copy | 1.200 | ≤ 1.5 (met) |" in text
    assert "| durable vs parallel raw write | 1.300 | ≤ 1.15 (not met) |" in text
    assert "- s3: exit 1: moto did not start" in text  # a failed benchmark is reported, not dropped


def test_goodput_uses_the_measured_costs(run_all: ModuleType) -> None:
    report = _report(run_all)
    measured = report["goodput"]["this_machine_costs"]["assumptions"]
    # 1 GiB per GPU x 1,024 GPUs through 125 GB/s (the storage floor) is longer than this machine's 3 s torch.save.
    assert measured["periodic_stall_s"] == "8.796 (given 3, raised to the storage floor)"
    assert measured["gpuguard_stall_s"] == "0.24 (given)"
    assert "gpuguard + just-in-time" in run_all.markdown(report)
    assert report["goodput"]["h200_costs"]["assumptions"]["failures_per_day"] == pytest.approx(2.432)
    assert all(c["agrees"] for g in report["goodput"].values() for c in g["monte_carlo"] + g["monte_carlo_best"])
    tiers = [line for line in run_all.markdown(report).splitlines() if line.startswith("| gpuguard + local tier |")]
    assert len(tiers) == 2 and all(line.endswith("agrees |") for line in tiers)  # one per set of costs


def test_plots_are_png_files(run_all: ModuleType, tmp_path: Path) -> None:
    made = run_all.plots(_report(run_all), tmp_path, "test-machine")
    assert [Path(p).name for p in made] == ["test-machine-checkpoint.png", "test-machine-goodput.png"]
    for path in made:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
