"""``gpuguard demo --sudden``: one rank of several dies mid-step without warning, the survivors save.

Launch 1 runs `gpuguard.demo.sudden_worker` under ``gpuguard-run`` (gloo, CPU) and SIGKILLs one rank
inside a step; its survivors save the last step every rank completed and exit 75, which becomes the
launcher's exit code. Launch 2 resumes as a rescheduled job would. A reference launch trains without the
loss, and the demo passes only when launch 2's final weights are bitwise identical to it.

The same trial, measured, is what the tests (tests/test_sudden_loss.py) and the benchmark
(benchmarks/sudden_loss.py) run: time to detect, to a committed checkpoint, to the survivors' exit, to
restart and restore, and steps replayed — each from real processes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

WORKER = Path(__file__).with_name("sudden_worker.py")
PHASES = ("forward", "backward", "between", "periodic", "optimizer")


@dataclass(frozen=True)
class Kill:
    """Which rank dies, during which step, in which phase (see `gpuguard.demo.sudden_worker`)."""

    rank: int
    step: int
    phase: str

    def describe(self) -> str:
        where = {
            "forward": "inside its forward pass",
            "backward": "inside its gradient all-reduce",
            "between": "between two steps",
            "periodic": "while a periodic checkpoint was being written",
            "optimizer": "inside its optimizer step",
            "stop": "stopped (SIGSTOP) inside its gradient all-reduce: a hang, its sockets open",
            "raise": "raising an error of its own inside its forward pass",
        }[self.phase]
        return f"rank {self.rank} SIGKILLed {where} (step {self.step})"


@dataclass
class Launch:
    code: int
    stderr: str
    started_at: float
    wall_s: float
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)


def launch(
    folder: Path,
    nproc: int,
    *,
    steps: int,
    layout: str = "ddp",
    kill: Kill | None = None,
    periodic_every: int = 0,
    timeout_s: float = 600,
    env: dict[str, str] | None = None,
    ballast_mib: float = 0.0,
    trace: bool = False,
) -> Launch:
    """One run of the job under gpuguard-run; every rank's report (``rank-N.json``) read back."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rank-*.json"):
        old.unlink()
    cmd = [
        sys.executable,
        "-m",
        "gpuguard.integrations.torchrun",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(WORKER),
        "--dir",
        str(folder),
        "--steps",
        str(steps),
        "--layout",
        layout,
        "--periodic-every",
        str(periodic_every),
    ]
    if ballast_mib:
        cmd += ["--ballast-mib", str(ballast_mib)]
    if trace:
        cmd.append("--trace")
    if kill is not None:
        cmd += ["--kill-rank", str(kill.rank), "--kill-step", str(kill.step), "--kill-phase", kill.phase]
    environment = {**os.environ, "GPUGUARD_FAKE_NVML": "h200", "OMP_NUM_THREADS": "1", **(env or {})}
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=environment, timeout=timeout_s, check=False)
    reports = {}
    for path in folder.glob("rank-*.json"):
        report = json.loads(path.read_text())
        reports[int(report["rank"])] = report
    return Launch(done.returncode, done.stderr, started, time.time() - started, reports)


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "final.safetensors"))


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@dataclass
class SuddenTrial:
    """One sudden loss and its resume, measured. Times are seconds after the kill unless said otherwise."""

    kill: Kill
    first: Launch
    killed: dict[str, Any]
    resume: Launch | None = None
    identical: bool | None = None

    @property
    def survivors(self) -> list[int]:
        return sorted(r for r in self.first.reports if r != self.kill.rank)

    @property
    def outcome(self) -> dict[str, Any]:
        """What the survivors did (their reports agree; the first one's)."""
        for rank in self.survivors:
            found = self.first.reports[rank].get("sudden_loss")
            if found:
                return dict(found)
        return {}

    def _after_kill(self, wall: float | None) -> float | None:
        return None if wall is None else wall - float(self.killed["at"])

    @property
    def detect_s(self) -> float | None:
        return self._after_kill(self.outcome.get("alarm", {}).get("at"))

    @property
    def committed_s(self) -> float | None:
        return self._after_kill(self.outcome.get("timings", {}).get("committed_at"))

    @property
    def survivors_left_s(self) -> float | None:
        left = [self.first.reports[r].get("left_at") for r in self.survivors]
        return self._after_kill(max(t for t in left if t is not None)) if all(left) and left else None

    @property
    def restart_s(self) -> float | None:
        """Launch 2: from the launcher's start to every worker's process running."""
        if self.resume is None or not self.resume.reports:
            return None
        return float(max(r["started_at"] for r in self.resume.reports.values())) - self.resume.started_at

    @property
    def restore_s(self) -> float | None:
        """Launch 2: from a worker's start to training again (process group, guard, resume), slowest rank."""
        if self.resume is None or not self.resume.reports:
            return None
        reports = self.resume.reports.values()
        spans = [float(r["training_at"]) - float(r["started_at"]) for r in reports if "training_at" in r]
        return max(spans) if spans else None

    @property
    def steps_replayed(self) -> int | None:
        """Steps the resume computes again: the one the job was in, and any completed after the saved one."""
        found = self.outcome.get("steps_replayed")
        return None if found is None else int(found)

    def accounting(self) -> dict[str, Any]:
        return {
            "kill": {"rank": self.kill.rank, "step": self.kill.step, "phase": self.kill.phase},
            "result": self.outcome.get("result"),
            "saved_step": self.outcome.get("step"),
            "detect_s": _round(self.detect_s),
            "committed_s": _round(self.committed_s),
            "survivors_left_s": _round(self.survivors_left_s),
            "launcher_exit": self.first.code,
            "restart_s": _round(self.restart_s),
            "restore_s": _round(self.restore_s),
            "steps_replayed": self.steps_replayed,
            "identical": self.identical,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_trial(
    folder: Path,
    nproc: int,
    kill: Kill,
    *,
    steps: int,
    layout: str = "ddp",
    periodic_every: int = 0,
    reference: dict[str, torch.Tensor] | None = None,
    resume: bool = True,
    timeout_s: float = 600,
    ballast_mib: float = 0.0,
    trace: bool = False,
) -> SuddenTrial:
    """Launch with ``kill``, then (``resume``) launch again and compare with ``reference``'s final weights."""
    options: dict[str, Any] = {
        "steps": steps,
        "layout": layout,
        "periodic_every": periodic_every,
        "timeout_s": timeout_s,
        "ballast_mib": ballast_mib,
        "trace": trace,
    }
    first = launch(folder, nproc, kill=kill, **options)
    killed_file = folder / "killed.json"
    killed = json.loads(killed_file.read_text()) if killed_file.exists() else {"at": float("nan"), "step": -1}
    trial = SuddenTrial(kill, first, killed)
    if resume:
        trial.resume = launch(folder, nproc, **options)
        if reference is not None and trial.resume.code == 0:
            trial.identical = identical(final_weights(folder), reference)
    return trial


def traced(folder: Path, rank: int) -> dict[int, str]:
    """A rank's digest of its state at each step it completed (``trace`` launches)."""
    path = folder / f"trace-rank-{rank}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {int(d["step"]): str(d["digest"]) for d in map(json.loads, lines)}


def summarize(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(present), 3), "max": round(max(present), 3)}


def run_sudden_demo(
    folder: Path | None = None, *, nproc: int = 3, steps: int = 30, kill: Kill | None = None, say: Any = print
) -> SuddenTrial:
    """The demo: the trial with its reference, each step said as it happens."""
    root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="gpuguard-demo-sudden-"))
    kill = kill or Kill(rank=1, step=steps // 2 + 2, phase="backward")
    say(f"gpuguard demo --sudden: {nproc} ranks (DDP, gloo, CPU) under gpuguard-run, {steps} steps; {kill.describe()}")
    say(f"  checkpoints under {root / 'job' / 'checkpoints'}")
    reference = launch(root / "reference", nproc, steps=steps)
    if reference.code != 0:
        raise RuntimeError(f"the reference run failed (exit {reference.code}):\n{reference.stderr[-3000:]}")
    trial = run_trial(root / "job", nproc, kill, steps=steps, reference=final_weights(root / "reference"))
    o = trial.outcome
    say(f"  launch 1  {kill.describe()}")
    if o:
        survivors = ", ".join(map(str, trial.survivors))
        say(f"  launch 1  survivors {survivors} knew in {trial.detect_s:.2f} s: {o['alarm']['why']}")
        if o.get("result") == "saved":
            say(
                f"  launch 1  checkpoint of step {o['step']} ({o['checkpoint_id']}) committed "
                f"{trial.committed_s:.2f} s after the kill; survivors gone after {trial.survivors_left_s:.2f} s"
            )
        else:
            say(f"  launch 1  {o.get('message')}")
    said = [line for line in trial.first.stderr.splitlines() if line.startswith("gpuguard-run:")]
    for line in said[:1] + said[-1:]:
        say(f"  launch 1  {line}")
    say(f"  launch 1  gpuguard-run exit {trial.first.code}")
    r = trial.resume
    if r is not None:
        resumed = sorted({rep.get("resumed_at") for rep in r.reports.values()}, key=str)
        say(
            f"  launch 2  resumed at step {', '.join(map(str, resumed))} on every rank "
            f"(restart {trial.restart_s or 0:.1f} s, restore {trial.restore_s or 0:.2f} s) -> exit {r.code}"
        )
    say(f"  reference run without the loss -> exit {reference.code}")
    verdict = "IDENTICAL to" if trial.identical else "DIFFER from"
    say(f"  final weights {verdict} the uninterrupted run; steps replayed: {trial.steps_replayed}")
    a = trial.accounting()
    say(
        f"  per failure: detect {a['detect_s']} s, committed {a['committed_s']} s, survivors gone "
        f"{a['survivors_left_s']} s, restart {a['restart_s']} s, restore {a['restore_s']} s, "
        f"{a['steps_replayed']} step(s) replayed"
    )
    return trial
