from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpuguard import HealthConfig, HealthMonitor
from gpuguard.fakenvml import FakeNvml

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# The probe of a real H200, copied here so the suite does not depend on ../shared.
H200_PROBE = TESTS / "data" / "nvml-h200-probe.json"
H200_UUID = "GPU-19a36126-98b4-8ad1-96d3-832414cda6ec"


@pytest.fixture
def h200_probe() -> Path:
    return H200_PROBE


@pytest.fixture
def make_monitor() -> Any:
    """A monitor over a fake NVML, started without threads, to drive with gpuguard.fakenvml.play."""
    monitors: list[HealthMonitor] = []

    def make(scenario: dict[str, Any], **config: Any) -> HealthMonitor:
        monitor = HealthMonitor(FakeNvml.from_scenario(scenario), HealthConfig(**config), devices="all")
        monitor.start(threads=False)
        monitors.append(monitor)
        return monitor

    yield make
    for monitor in monitors:
        monitor.stop()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed command line in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "gpuguard.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli
