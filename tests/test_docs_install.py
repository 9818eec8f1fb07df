"""The install the docs tell users to do works: ``pip install .[s3,lightning]`` into a fresh venv (no system site
packages, no development dependencies) runs the Lightning example, through a fault and its resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FAULT = ROOT / "examples" / "scenarios" / "xid48-gpu0-at-2s.json"
# What the venv may take on disk: torch 2.13.0+cpu is about 0.9 GB installed, the rest about 0.3 GB.
DISK_BOUND_BYTES = 3 * 2**30
SOURCE_IGNORED = shutil.ignore_patterns(
    ".git", ".venv*", "site", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache",
    ".pytest_cache", ".whl", ".out",
)  # fmt: skip


def _local_torch_wheel() -> Path | None:
    """torch 2.13.0's CPU wheel on this machine's disk (pip's find-links, or the checkout's .whl/)."""
    folders = [*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels", str(ROOT / ".whl")]
    for folder in folders:
        wheels = sorted(Path(folder).glob("torch-2.13.0*cpu*.whl")) if Path(folder).is_dir() else []
        if wheels:
            return wheels[0]
    return None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pip_install_s3_lightning_in_a_fresh_venv_runs_the_lightning_example(tmp_path: Path) -> None:
    wheel = _local_torch_wheel()
    if wheel is None:
        pytest.skip("no torch 2.13.0 CPU wheel on disk: from the index pip would fetch a multi-GB CUDA build")
    if shutil.disk_usage(tmp_path).free < DISK_BOUND_BYTES + 2**30:
        pytest.skip(f"less than {DISK_BOUND_BYTES // 2**30 + 1} GiB free under {tmp_path}")
    venv = tmp_path / "venv"
    try:
        # the package as shipped: the checkout's files without its venvs and build leftovers
        source = tmp_path / "src"
        shutil.copytree(ROOT, source, ignore=SOURCE_IGNORED, symlinks=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUGUARD_", "PYTHON", "VIRTUAL_ENV"))}
        env |= {"OMP_NUM_THREADS": "1", "GPUGUARD_KUBERNETES_ENABLED": "off"}
        made = _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
        assert made.returncode == 0, made.stderr
        python = str(venv / "bin" / "python")
        pip = [python, "-m", "pip", "install", "-q", "--no-cache-dir"]
        # torch from the wheel on disk (what scripts/setup.sh does), then the extras under the project's pins
        pins = ["-c", str(source / "scripts" / "constraints.txt")]
        torch = _run([*pip, *pins, str(wheel)], tmp_path, env)
        assert torch.returncode == 0, torch.stderr[-3000:]
        extras = _run([*pip, *pins, f"{source}[s3,lightning]"], tmp_path, env)
        assert extras.returncode == 0, extras.stderr[-3000:]

        which = _run(
            [python, "-c", "import gpuguard, torch, s3fs; print(gpuguard.__file__, torch.__version__)"], tmp_path, env
        )
        assert which.returncode == 0, which.stderr[-2000:]
        where, version = which.stdout.split()
        assert where.startswith(str(venv)), f"gpuguard imported from {where}, not the fresh venv"
        assert version.startswith("2.13.0"), version
        assert _size(venv) < DISK_BOUND_BYTES

        # the Lightning example, as the docs run it: the fault (exit 75, an emergency checkpoint), then the resume
        url = f"file://{tmp_path / 'ckpt'}"
        example = [python, str(source / "examples" / "lightning_example.py"), "--checkpoint-dir", url]
        faulted = _run(
            [*example, "--scenario-seconds-per-step", "0.25"], tmp_path, env | {"GPUGUARD_FAKE_NVML": str(FAULT)}
        )
        assert faulted.returncode == 75, faulted.stdout[-2000:] + faulted.stderr[-3000:]
        resumed = _run(example, tmp_path, env | {"GPUGUARD_FAKE_NVML": "h200"})
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        assert "finished at global step 128 (resumed from step-" in resumed.stdout, resumed.stdout[-2000:]
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
