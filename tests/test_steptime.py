"""Step time moves a job only with evidence about its GPU: alone it warns once and is exported.

A slow input pipeline, shared storage, a slow peer or a busy CPU slow the steps as a throttled GPU
does; only NVML evidence on this rank's GPU, with this rank slower than its peers, makes a slowdown a
DEGRADED reason — or ``evacuate_on_slowdown_alone=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.training import make_state, train_step

from gpuguard import Action, DeviceHealth, Evacuation, Guard, GuardConfig, HealthState
from gpuguard.fakenvml import FakeNvml
from gpuguard.guard.steptime import Peers, SlowdownDetector, StepClock
from gpuguard.metrics import GuardMetrics

SECONDS_PER_STEP = 0.1  # scenario time per training step
GRACE_S = 0.3
FAST_SETTINGS: dict[str, Any] = {
    "step_warmup_steps": 2,
    "step_baseline_steps": 10,
    "step_window_steps": 5,
    "degraded_grace_s": GRACE_S,
}


# -- the decision, on recorded step times -------------------------------------------------------------


def detector(world_size_peers: Peers | None = None, **settings: Any) -> tuple[SlowdownDetector, StepClock]:
    config = GuardConfig(
        checkpoint_dir="memory://steptime", step_warmup_steps=0, step_baseline_steps=5, step_window_steps=5, **settings
    )
    clock = StepClock()
    found = SlowdownDetector(config, clock)
    found.peers = world_size_peers
    return found, clock


def run_steps(clock: StepClock, seconds: float, n: int) -> None:
    now = clock.last or 1000.0
    clock.tick(now)
    for _ in range(n):
        now += seconds
        clock.tick(now)


def gpu(**readings: Any) -> DeviceHealth:
    return DeviceHealth(0, "GPU-0", "00000000:00:06.0", "H200", HealthState.HEALTHY, readings=readings)


THROTTLED = {"clock_events": ["hw_slowdown"]}


@pytest.mark.parametrize(
    ("world_size", "fastest_s", "readings", "acts"),
    [
        (1, None, THROTTLED, True),  # one rank: no peers to compare, the GPU's evidence decides
        (2, 0.010, THROTTLED, True),  # 3x slower than the fastest rank, and the GPU throttles
        (2, 0.030, THROTTLED, False),  # every rank as slow (synchronous training): not this GPU's doing
        (2, None, THROTTLED, False),  # no agreement read yet: nothing says this rank is the slow one
        (2, 0.010, {"clock_events": ["gpu_idle"]}, False),  # slower than its peers, but NVML says nothing
        (1, None, {}, False),  # step time alone
    ],
    ids=["one-rank", "slower-than-peers", "all-ranks-slow", "no-agreement-yet", "no-gpu-evidence", "alone"],
)
def test_a_slowdown_counts_only_with_gpu_evidence_on_a_rank_slower_than_its_peers(
    world_size: int, fastest_s: float | None, readings: dict[str, Any], acts: bool
) -> None:
    peers = None if fastest_s is None else Peers(world_size, 0, fastest_s, 1, 0.030)
    found, clock = detector(peers)
    run_steps(clock, 0.010, 5)  # the baseline: 10 ms
    run_steps(clock, 0.030, 5)  # now 30 ms: 200% over it
    reason = found.check(gpu(**readings), world_size)
    assert found.latest is not None and found.latest.slowdown == pytest.approx(2.0)
    if acts:
        assert reason is not None and (reason.code, reason.state) == ("STEP_TIME_SLOWDOWN", HealthState.DEGRADED)
        assert reason.evidence["gpu_evidence"] == ["clock events hw_slowdown"]
        assert reason.evidence["peers"]["slower_than_peers"] is True
        assert found.ignored == 0
    else:
        assert reason is None and found.ignored == 1


def test_counters_that_rose_since_the_baseline_are_gpu_evidence() -> None:
    found, clock = detector()
    run_steps(clock, 0.010, 10)
    assert found.check(gpu(pcie_replay=7, thermal_violation_ns=100, nvlink_replay_errors=0)) is None  # not slow
    run_steps(clock, 0.030, 5)
    reason = found.check(gpu(pcie_replay=10, thermal_violation_ns=100, nvlink_replay_errors=2))
    assert reason is not None
    assert reason.evidence["gpu_evidence"] == [
        "pcie_replay rose by 3 since the baseline",
        "nvlink_replay_errors rose by 2 since the baseline",
    ]


def test_opting_in_acts_on_step_time_alone() -> None:
    found, clock = detector(evacuate_on_slowdown_alone=True)
    run_steps(clock, 0.010, 5)
    run_steps(clock, 0.030, 5)
    reason = found.check(gpu(), world_size=1)
    assert reason is not None and reason.evidence["acted_on"] == "evacuate_on_slowdown_alone"
    assert reason.evidence["gpu_evidence"] == []


# -- the guard, training -----------------------------------------------------------------------------


def guarded(tmp_path: Any, nvml: FakeNvml, **settings: Any) -> tuple[Guard, dict[str, Any]]:
    state = make_state()
    health = {"poll_interval_s": 0.05, **settings.pop("health", {})}
    guard = Guard(checkpoint_dir=f"file://{tmp_path}", state=state, nvml=nvml, devices="all", health=health, **settings)
    return guard, state


def one_step(guard: Guard, state: dict[str, Any], nvml: FakeNvml, step: int, pause: float) -> None:
    nvml.clock.set(step * SECONDS_PER_STEP)
    train_step(state["model"], state["optimizer"], state["scheduler"])
    time.sleep(pause)
    guard.step(step)


def slow_down(guard: Guard, state: dict[str, Any], nvml: FakeNvml) -> tuple[int, float]:
    """Quick steps until the guard has its baseline, then the pause that makes every later step at least
    4x that baseline: 300% over it, whatever the machine's load does to a step (it only adds)."""
    step = 0
    while guard.slowdown.baseline_s is None:
        one_step(guard, state, nvml, step, 0.002)
        step += 1
        assert step < 5000, "no baseline"
    return step, 4 * guard.slowdown.baseline_s


def test_a_slowdown_alone_warns_once_and_never_moves_the_job(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gpuguard")
    guard, state = guarded(tmp_path, FakeNvml.from_scenario({"gpus": 1, "events": []}), **FAST_SETTINGS)
    metrics = GuardMetrics().attach(guard)
    with guard:
        step, pause = slow_down(guard, state, guard._nvml)
        first_ignored = None
        # Slow steps until the slowdown has gone unacted on for 4 grace periods (a DEGRADED reason would
        # have escalated after one): a lower bound that load only lengthens.
        while first_ignored is None or time.monotonic() - first_ignored < 4 * GRACE_S or guard.slowdown.ignored < 5:
            one_step(guard, state, guard._nvml, step, pause)
            if first_ignored is None and guard.slowdown.ignored:
                first_ignored = time.monotonic()
            step += 1
            assert step < 3000, "the slowdown was never seen"
        latest = guard.slowdown.latest
        assert latest is not None and latest.slowdown > 0.25
        assert guard.decision.action is Action.CONTINUE
        # exported: the gauge is what the guard measured, and the job stays
        assert metrics.registry.get_sample_value("gpuguard_step_slowdown") == pytest.approx(latest.slowdown)
        assert metrics.registry.get_sample_value("gpuguard_step_baseline_seconds") == latest.baseline_s
    said = [r.getMessage() for r in caplog.records if "not moving the job" in r.getMessage()]
    assert len(said) == 1, said  # once per episode, however many checks saw it
    assert "NVML reports nothing on GPU 0 that would slow it" in said[0]
    assert "evacuate_on_slowdown_alone" in said[0]


@pytest.mark.parametrize("opt_in", [False, True], ids=["throttled-gpu", "opted-in"])
def test_a_slowdown_with_a_throttled_gpu_or_opted_in_moves_the_job(tmp_path: Any, opt_in: bool) -> None:
    # The GPU reports a hardware slowdown clock event; the CLOCK_EVENT rule alone would need it held
    # for clock_event_onset_s, set out of reach here, so the verdict can only come from the step time.
    events = [] if opt_in else [{"at": 0.5, "gpu": 0, "field": "clock_events", "set": ["hw_slowdown"]}]
    nvml = FakeNvml.from_scenario({"gpus": 1, "events": events})
    settings = {**FAST_SETTINGS, "health": {"clock_event_onset_s": 1e6}, "evacuate_on_slowdown_alone": opt_in}
    guard, state = guarded(tmp_path, nvml, **settings)
    with pytest.raises(Evacuation) as caught, guard:
        step, pause = slow_down(guard, state, nvml)
        while step < 3000:
            one_step(guard, state, nvml, step, pause)
            step += 1
    assert caught.value.code == 75 and caught.value.decision.rung == "reschedule"
    (reason,) = caught.value.decision.evidence["reasons"]
    evidence = reason["evidence"]
    assert reason["code"] == "STEP_TIME_SLOWDOWN" and evidence["slowdown"] > evidence["threshold"] == 0.25
    if opt_in:
        assert evidence["gpu_evidence"] == [] and evidence["acted_on"] == "evacuate_on_slowdown_alone"
    else:
        assert evidence["gpu_evidence"] == ["clock events hw_slowdown"]
        assert evidence["acted_on"] == "gpu evidence and peers" and evidence["peers"] == {
            "world_size": 1,
            "slower_than_peers": True,
        }


# -- real processes: two ranks under gpuguard-run -----------------------------------------------------

SLOW_RANK_WORKER = Path(__file__).parent / "helpers" / "slow_rank_worker.py"


def two_ranks(folder: Path, events: list[dict[str, Any]], *args: str) -> subprocess.CompletedProcess[str]:
    folder.mkdir(parents=True, exist_ok=True)
    scenario = folder / "scenario.json"
    scenario.write_text(json.dumps({"gpus": 2, "events": events}))
    # the CLOCK_EVENT rule alone would need the event held for clock_event_onset_s: out of reach here
    env = {
        **os.environ,
        "GPUGUARD_FAKE_NVML": str(scenario),
        "GPUGUARD_HEALTH_CLOCK_EVENT_ONSET_S": "1e6",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "gpuguard.integrations.torchrun", "--standalone", "--nproc-per-node=2"]
    cmd += ["--leave-grace-s=120", str(SLOW_RANK_WORKER), "--dir", str(folder), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)


@pytest.mark.slow  # about 10 s on a quiet 2-core machine; the one-process case above runs in the main suite
def test_two_ranks_a_throttled_gpu_on_the_slower_rank_moves_the_job(tmp_path: Path) -> None:
    throttled = [{"at": 0.1, "gpu": 1, "field": "clock_events", "set": ["hw_slowdown"]}]
    done = two_ranks(tmp_path, throttled)
    assert done.returncode == 75, done.stderr[-3000:]
    ended = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["exit_code"] for r in ended] == [75, 75] and ended[0]["evacuated_at"] == ended[1]["evacuated_at"]
    assert ended[0]["decided_by_rank"] == 1  # rank 0 followed rank 1's decision
    (reason,) = ended[1]["reasons"]
    evidence = reason["evidence"]
    assert reason["code"] == "STEP_TIME_SLOWDOWN" and evidence["gpu_evidence"] == ["clock events hw_slowdown"]
    peers = evidence["peers"]
    assert peers["slower_than_peers"] and peers["fastest_rank"] == 0 and peers["slowest_rank"] == 1
    assert peers["slowest_ms"] >= 1.25 * peers["fastest_ms"]


@pytest.mark.slow
def test_two_ranks_a_slower_rank_without_gpu_evidence_trains_to_the_end(tmp_path: Path) -> None:
    done = two_ranks(tmp_path, [], "--steps", "300")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads((tmp_path / f"rank-{r}.json").read_text())["exit_code"] for r in range(2)] == [0, 0]
    assert "not moving the job: NVML reports nothing on GPU 1" in done.stderr  # the slowdown was seen


# -- the soak: healthy jobs on busy CPUs are never moved ----------------------------------------------

SOAK_S = 240.0
EXAMPLE = Path(__file__).parent.parent / "examples" / "train_guarded.py"


class Contention:
    """Busy processes, switched on and off every few seconds: slowdowns that come and go, as a shared
    node's do, each starting after the jobs' baselines were taken on a quieter machine."""

    def __init__(self, processes: int = 3, period_s: float = 6.0) -> None:
        self.processes, self.period_s = processes, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contention", daemon=True)

    def __enter__(self) -> Contention:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        busy: list[subprocess.Popen[bytes]] = []
        try:
            while not self._stop.wait(self.period_s):
                if busy:
                    for proc in busy:
                        proc.kill()
                        proc.wait()
                    busy = []
                else:
                    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.processes)]
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 1200)  # the soak's length, and a last run that may take long on a loaded machine
def test_healthy_two_rank_jobs_under_cpu_contention_are_never_evacuated(tmp_path: Path) -> None:
    # The case: examples/train_guarded.py under gpuguard-run with 2 ranks on a loaded 2-core machine
    # evacuated a healthy job on step time alone. A short degraded_grace_s makes any DEGRADED verdict from
    # step time escalate within seconds, so a false evacuation could not hide in a long grace period.
    env = {**os.environ, "GPUGUARD_FAKE_NVML": "h200", "GPUGUARD_DEGRADED_GRACE_S": "3", "OMP_NUM_THREADS": "1"}
    runs, seen, started = [], 0, time.monotonic()
    with Contention():
        while time.monotonic() - started < SOAK_S or len(runs) < 2:
            folder = tmp_path / f"run-{len(runs)}"
            cmd = [sys.executable, "-m", "gpuguard.integrations.torchrun", "--standalone", "--nproc-per-node=2"]
            cmd += [str(EXAMPLE), "--checkpoint-dir", f"file://{folder}", "--steps", "1200"]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=False)
            runs.append(done.returncode)
            assert done.returncode == 0 and "evacuating" not in done.stderr, done.stderr[-3000:]
            seen += done.stderr.count("not moving the job")
            shutil.rmtree(folder, ignore_errors=True)
    # the contention did slow the steps past the threshold (else this soak would prove nothing)
    assert seen >= 1, f"{len(runs)} runs saw no slowdown"
    print(
        f"soak: {len(runs)} runs of 2 ranks in {time.monotonic() - started:.0f}s, 0 evacuations, {seen} slowdowns seen"
    )
