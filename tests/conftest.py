from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
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


@pytest.fixture(autouse=True, scope="session")
def pod_health_files_removed() -> Iterator[None]:
    """The pod-health files the Kubernetes tests' pods leave in /dev/shm (gpuguard.k8s.pod_health.shared_file,
    one per pod by design) are removed after the session: only the ones that were not there before it."""
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    before = set(folder.glob("gpuguard-pod-health-*.json")) if folder else set()
    yield
    for leftover in set(folder.glob("gpuguard-pod-health-*.json")) - before if folder else ():
        leftover.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def torch_determinism_restored() -> Iterator[None]:
    """Lightning's ``deterministic=True`` turns on ``torch.use_deterministic_algorithms`` for the whole process
    and leaves it on; a later test would then run (and fail, e.g. float4 copies) under settings it never chose."""
    import torch

    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(autouse=True)
def no_real_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's ~/.kube/config must never be touched by a test; tests that want a cluster opt in."""
    monkeypatch.setenv("GPUGUARD_KUBERNETES_ENABLED", "off")
    for name in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG", "GPUGUARD_FAKE_NVML"):
        monkeypatch.delenv(name, raising=False)


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


@pytest.fixture
def cli_here(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """The command line's ``main`` in this process: what it prints and its exit code, without the
    seconds a fresh interpreter spends importing torch (for tests of what a command says, not of how it
    starts; `cli` runs the installed command in a fresh process)."""
    from gpuguard.cli import main

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        with monkeypatch.context() as patched:
            for name, value in (env or {}).items():
                patched.setenv(name, value)
            capsys.readouterr()
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
            out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["gpuguard", *args], code, out, err)

    return run


# -- checkpoints -----------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Any:
    """A real S3 server over HTTP (moto in server mode, its own process) for the whole session."""
    import time
    import urllib.request

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)
    yield endpoint
    server.terminate()
    server.wait(10)


S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Any:
    """A fresh bucket: (url, storage_options)."""
    import uuid

    import s3fs

    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_options(s3_endpoint))
    fs.call_s3("create_bucket", Bucket=bucket)
    return f"s3://{bucket}/run", s3_options(s3_endpoint)


@pytest.fixture(params=["file", "memory", "s3"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """(url, storage_options) for each kind of storage users have."""
    import uuid

    if request.param == "file":
        return f"file://{tmp_path}/ckpt", {}
    if request.param == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex[:12]}", {}
    return request.getfixturevalue("s3_bucket")  # type: ignore[no-any-return]
