"""The plugin in examples/plugins/gpuguard-site, installed with pip (into a folder of its own, so the
shared environment is untouched), discovered through the ``gpuguard`` entry-point group by a job that
does not mention it, and called with the documented arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

import gpuguard
from gpuguard import ConfigError, Guard
from gpuguard.fakenvml import FakeNvml

ROOT = Path(__file__).parent.parent
PLUGIN = ROOT / "examples" / "plugins" / "gpuguard-site"
H200_UUID = "GPU-19a36126-98b4-8ad1-96d3-832414cda6ec"

JOB = """
import json, sys, time, torch, gpuguard
from gpuguard.fakenvml import FakeNvml
model = torch.nn.Linear(4, 4)
guard = gpuguard.Guard(sys.argv[1], {"model": model}, nvml=FakeNvml.replay(), devices="all")
print(json.dumps(sorted(n for n, _ in guard.plugins.list_name_plugin())), flush=True)
with guard:
    for step in range(6000):  # up to a minute: the guard's thread evaluates the probe every second
        guard.step(step)
        time.sleep(0.01)
        if step == 5:
            open(sys.argv[2], "w").write("%s burn-in: 3 of 40 matmuls wrong\\n" % guard.monitor.snapshot().devices[0].uuid)
"""


class Hooks(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        Hooks.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The example plugin, pip-installed into tmp_path/site (no network: the venv's setuptools builds it)."""
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--target", str(target), str(PLUGIN)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (target / "gpuguard_site.py").exists()
    return target


def test_installed_plugin_is_discovered_and_called(installed: Path, tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hooks.received.clear()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(installed), str(ROOT)]),
        "SITE_GPU_WEBHOOK_URL": f"http://127.0.0.1:{server.server_port}/hook",
        "SITE_GPU_PROBE_FILE": str(tmp_path / "probe.txt"),
        "GPUGUARD_KUBERNETES_ENABLED": "off",
    }
    env.pop("GPUGUARD_FAKE_NVML", None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", JOB, f"file://{tmp_path / 'ckpt'}", str(tmp_path / "probe.txt")],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
            check=False,
            cwd=tmp_path,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 75, done.stderr[-3000:]
    names = json.loads(done.stdout.splitlines()[0])
    assert {"site-webhook", "site-probe"} <= set(names)  # found by entry point, not passed in
    [posted] = Hooks.received
    assert posted["event"] == "evacuation" and posted["exit_code"] == 75 and posted["action"] == "RESCHEDULE"
    assert posted["message"].endswith(
        "the site probe failed this GPU: " + H200_UUID + " burn-in: 3 of 40 matmuls wrong"
    )
    assert posted["checkpoint"] is not None and posted["checkpoint"].startswith("step-")


class Misspelt:
    @gpuguard.hookimpl
    def gpuguard_on_evacuaton(self, decision: Any, exit_code: int) -> None:
        pass


class WrongArgument:
    @gpuguard.hookimpl
    def gpuguard_on_evacuation(self, decision: Any, code: int) -> None:
        pass


@pytest.mark.parametrize(
    ("plugin", "named"),
    [(Misspelt(), "gpuguard_on_evacuaton"), (WrongArgument(), "code")],
    ids=["misspelt-hook", "unknown-argument"],
)
def test_bad_hook_is_rejected_at_start(tmp_path: Path, plugin: object, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Guard(f"file://{tmp_path}", {}, nvml=FakeNvml.replay(), plugins=[plugin])
