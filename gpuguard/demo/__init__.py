"""``gpuguard demo``: the whole cycle on CPU with a fake GPU, end to end, in real processes.

Pod A trains until its (fake) H200 reports XID 48, takes the emergency checkpoint and exits 75, as a
real job would. Pod B starts the way a rescheduled pod would — a fresh process on a healthy GPU —
resumes from the checkpoint and finishes. A reference run trains without the fault. The demo passes
only when pod B's final weights are bitwise identical to the reference's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DemoResult:
    identical: bool
    steps_lost: int
    detection_latency_s: float | None
    stall_s: float
    durable_s: float
    pod_a: dict[str, Any] = field(default_factory=dict)
    pod_b: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "steps_lost": self.steps_lost,
            "detection_latency_s": self.detection_latency_s,
            "stall_s": self.stall_s,
            "durable_s": self.durable_s,
            "exit_code_pod_a": self.pod_a.get("exit_code"),
            "evacuated_at_step": self.pod_a.get("evacuated_at"),
            "resumed_at_step": self.pod_b.get("resumed_at"),
            "wall_s": round(self.wall_s, 2),
        }


def _run_pod(name: str, folder: Path, steps: int, fault_step: int | None) -> tuple[int, dict[str, Any]]:
    report = folder / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "gpuguard.demo.worker",
        "--dir",
        str(folder),
        "--steps",
        str(steps),
        "--report",
        str(report),
    ]
    if fault_step is not None:
        cmd += ["--fault-step", str(fault_step)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if not report.exists():
        raise RuntimeError(f"{name} died without a report (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.returncode, json.loads(report.read_text())


def run_demo(folder: Path | None = None, *, steps: int = 200, fault_step: int = 120, say: Any = print) -> DemoResult:
    """Run the cycle; ``say`` receives the timeline's lines."""
    from safetensors.torch import load_file

    started = time.perf_counter()
    root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="gpuguard-demo-"))
    job, reference = root / "job", root / "reference"
    job.mkdir(parents=True, exist_ok=True)
    reference.mkdir(parents=True, exist_ok=True)
    say(f"gpuguard demo: {steps} training steps on CPU, a fake H200, XID 48 injected at step {fault_step}")
    say(f"  checkpoints under {job / 'checkpoints'}")

    code_a, pod_a = _run_pod("pod-a", job, steps, fault_step)
    latency = pod_a.get("detection_latency_s")
    say(
        f"  pod A   trained steps 0..{pod_a.get('evacuated_at')}; XID 48 at step {fault_step} detected in "
        + (f"{latency * 1000:.1f} ms" if latency is not None else "n/a")
    )
    say(f"  pod A   decision: {pod_a.get('decision')}")
    say(
        f"  pod A   emergency checkpoint at step {pod_a.get('evacuated_at')}: "
        f"stall {pod_a.get('stall_s', 0) * 1000:.1f} ms, "
        f"durable after {pod_a.get('durable_s', 0) * 1000:.1f} ms -> exit {code_a}"
    )
    if code_a != 75:
        raise RuntimeError(f"pod A exited {code_a}, expected 75: {pod_a}")

    code_b, pod_b = _run_pod("pod-b", job, steps, None)
    say(
        f"  pod B   a new process on a healthy GPU: resumed at step {pod_b.get('resumed_at')}, "
        f"finished step {pod_b.get('finished_at')} -> exit {code_b}"
    )
    code_r, ref = _run_pod("reference", reference, steps, None)
    say(f"  reference run without the fault finished step {ref.get('finished_at')} -> exit {code_r}")

    final, expected = load_file(str(job / "final.safetensors")), load_file(str(reference / "final.safetensors"))
    identical = final.keys() == expected.keys() and all(final[k].equal(expected[k]) for k in final)
    steps_lost = int(pod_a["evacuated_at"]) + 1 - int(pod_b["resumed_at"])
    result = DemoResult(
        identical=identical,
        steps_lost=steps_lost,
        detection_latency_s=latency,
        stall_s=float(pod_a.get("stall_s", 0.0)),
        durable_s=float(pod_a.get("durable_s", 0.0)),
        pod_a=pod_a,
        pod_b=pod_b,
        reference=ref,
        wall_s=time.perf_counter() - started,
    )
    say(
        f"  final weights {'IDENTICAL to' if identical else 'DIFFER from'} the uninterrupted run; "
        f"steps lost: {steps_lost}"
    )
    return result
