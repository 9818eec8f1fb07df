"""The guard in one process: evacuation, periodic checkpoints, resume, plugins, the training thread."""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import pytest
import torch
from helpers import flaky_fs
from helpers.flaky_fs import FlakyFileSystem
from helpers.training import assert_same, fresh_like, make_state, train_step

import gpuguard
from gpuguard import Action, CheckpointStore, ConfigError, Decision, Evacuation, Guard
from gpuguard.fakenvml import FakeNvml

SECONDS_PER_STEP = 0.1


def fake(*events: dict[str, Any], gpus: int = 1) -> FakeNvml:
    return FakeNvml.from_scenario({"gpus": gpus, "events": list(events)})


def train(guard: Guard, state: dict[str, Any], nvml: FakeNvml, steps: int, start: int = 0, pause: float = 0.003) -> int:
    """Train, moving scenario time with the steps; returns the last step completed."""
    step = start - 1
    for step in range(start, steps):
        nvml.clock.set(step * SECONDS_PER_STEP)
        train_step(state["model"], state["optimizer"], state["scheduler"])
        time.sleep(pause)  # lets the monitor's threads see the scenario's step, as GPU time would
        guard.step(step)
    return step


def guard_for(url: str, state: dict[str, Any], nvml: FakeNvml, **settings: Any) -> Guard:
    return Guard(checkpoint_dir=url, state=state, nvml=nvml, devices="all", **settings)


def test_a_failing_gpu_evacuates_with_75_after_a_durable_checkpoint(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    state, nvml = make_state(), fake({"at": 3.0, "gpu": 0, "xid": 48})
    with pytest.raises(Evacuation) as caught, guard_for(url, state, nvml) as guard:
        train(guard, state, nvml, steps=30)  # scenario time up to 2.9 s: healthy, the job trains
        assert guard.decision.action is Action.CONTINUE
        nvml.clock.set(3.0)  # the XID
        train_step(state["model"], state["optimizer"], state["scheduler"])
        deadline = time.monotonic() + 60  # a hang guard: the wait is for the guard's threads to decide
        while not guard.decision.action:
            assert time.monotonic() < deadline, "the guard never decided"
            time.sleep(0.005)
        guard.step(30)  # one process: the first step after the decision leaves
    evacuation = caught.value
    # a SystemExit, not an Exception: a user's `except Exception:` around the loop does not swallow it
    assert isinstance(evacuation, SystemExit) and not isinstance(evacuation, Exception) and evacuation.code == 75
    assert evacuation.step == 30
    # XID 48 comes with a double-bit ECC count: either reason may lead the message, both say what failed
    assert evacuation.decision.rung == "reschedule" and "double-bit ecc" in evacuation.decision.message.lower()
    assert evacuation.checkpoint is not None and evacuation.checkpoint.step == evacuation.step
    with CheckpointStore(url) as store:
        latest = store.latest()
        assert latest is not None and latest.reason == "emergency" and latest.step == evacuation.step
        assert latest.evidence["device"] == "GPU-19a36126-98b4-8ad1-96d3-832414cda6ec"
        reasons = latest.evidence["evidence"]["reasons"]
        # the XID event decides at once; the double-bit count it comes with is in the evidence when a poll
        # had read it by then
        assert {"XID"} <= {r["code"] for r in reasons} <= {"XID", "ECC_DBE_VOLATILE"}
        assert [r["evidence"]["xid"] for r in reasons if r["code"] == "XID"] == [48]
        restored = fresh_like()
        store.load(restored)
    assert_same(state, restored)


def test_a_restart_class_fault_exits_76(tmp_path: Any) -> None:
    state, nvml = make_state(), fake({"at": 2.0, "gpu": 0, "xid": 94})
    with pytest.raises(Evacuation) as caught, guard_for(f"file://{tmp_path}", state, nvml) as guard:
        train(guard, state, nvml, steps=200)
    assert caught.value.code == 76 and caught.value.decision.rung == "restart"


def test_resume_continues_where_the_evacuation_left(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    reference = make_state()
    nvml_ref = fake()
    with guard_for(f"file://{tmp_path}/ref", reference, nvml_ref) as guard:
        train(guard, reference, nvml_ref, steps=60, pause=0)

    state, nvml = make_state(), fake({"at": 2.0, "gpu": 0, "xid": 48})
    with pytest.raises(Evacuation) as caught, guard_for(url, state, nvml) as guard:
        train(guard, state, nvml, steps=60)
    resumed, healthy = make_state(seed=5), fake()
    with guard_for(url, resumed, healthy) as guard:
        start = guard.resume()
        assert start == caught.value.step + 1
        train(guard, resumed, healthy, steps=60, start=start, pause=0)
    assert_same(reference, resumed)


def test_resume_without_a_checkpoint_starts_at_0(tmp_path: Any) -> None:
    with guard_for(f"file://{tmp_path}", make_state(), fake()) as guard:
        assert guard.resume() == 0


def test_periodic_checkpoints_every_n_steps_and_retention(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    state, nvml = make_state(), fake()
    with guard_for(url, state, nvml, checkpoint_every_steps=10, keep=2) as guard:
        train(guard, state, nvml, steps=45, pause=0)
    with CheckpointStore(url) as store:
        assert [(c.step, c.reason) for c in store.list()] == [(30, "periodic"), (40, "periodic")]


def test_periodic_checkpoints_every_t_seconds(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    state, nvml = make_state(), fake()
    settings: dict[str, Any] = {"checkpoint_every_s": 0.2, "health": {"poll_interval_s": 0.05}}
    with guard_for(url, state, nvml, **settings) as guard:
        train(guard, state, nvml, steps=100, pause=0.01)
    with CheckpointStore(url) as store:
        assert len(store.list()) >= 2


def test_the_training_thread_makes_no_nvml_call_after_start(tmp_path: Any) -> None:
    nvml = fake({"at": 50.0, "gpu": 0, "xid": 48})
    callers: set[str] = set()
    for name in ("nvmlDeviceGetFieldValues", "nvmlDeviceGetTemperature", "nvmlEventSetWait_v2"):
        original = getattr(nvml, name)

        def spy(*args: Any, _original: Any = original) -> Any:
            callers.add(threading.current_thread().name)
            return _original(*args)

        setattr(nvml, name, spy)
    state = make_state()
    with guard_for(f"file://{tmp_path}", state, nvml, health={"poll_interval_s": 0.01}) as guard:
        callers.clear()
        train(guard, state, nvml, steps=100)
    assert callers and threading.main_thread().name not in callers
    assert callers <= {"gpuguard-nvml-poll", "gpuguard-nvml-events"}


@pytest.mark.parametrize("overlap", [False, True], ids=["snapshot", "overlapped"])
def test_state_dict_and_its_hooks_run_only_on_the_training_thread(tmp_path: Any, overlap: bool) -> None:
    """FSDP2 swaps parameters in its state-dict hooks: run off the training thread while it computes, they
    crashed training (issue 17). Every state_dict()/load_state_dict() of the guard's runs on the loop's thread."""
    state, nvml = make_state(), fake({"at": 4.0, "gpu": 0, "xid": 48})
    threads: list[str] = []

    def record(*args: Any, **kwargs: Any) -> None:
        threads.append(threading.current_thread().name)

    state["model"].register_state_dict_pre_hook(record)
    state["model"].register_load_state_dict_pre_hook(record)
    state["optimizer"].register_state_dict_pre_hook(record)
    state["optimizer"].register_load_state_dict_pre_hook(record)
    settings: dict[str, Any] = {"checkpoint_every_steps": 5, "checkpoint_every_s": 0, "overlap_snapshot": overlap}
    with pytest.raises(Evacuation) as caught, guard_for(f"file://{tmp_path}", state, nvml, **settings) as guard:
        assert guard.resume() == 0
        train(guard, state, nvml, steps=100)
    resumed = fresh_like()
    for hooked in (resumed["model"], resumed["optimizer"]):
        hooked.register_load_state_dict_pre_hook(record)
    with guard_for(f"file://{tmp_path}", resumed, fake(), **settings) as guard:
        assert guard.resume() == caught.value.step + 1
    # prepare, periodic saves, the emergency save and the resume: each walked the state on this thread
    assert len(threads) >= 8 and set(threads) == {threading.current_thread().name}, threads


def test_a_failed_emergency_checkpoint_still_leaves(tmp_path: Any) -> None:
    flaky_fs.reset()
    state, nvml = make_state(), fake({"at": 1.0, "gpu": 0, "xid": 48})
    FlakyFileSystem.failures[:] = [PermissionError(errno.EACCES, "Access Denied")] * 10
    with pytest.raises(Evacuation) as caught, guard_for("flaky://run", state, nvml) as guard:
        train(guard, state, nvml, steps=100)
    assert caught.value.code == 75 and caught.value.checkpoint is None
    assert guard.last_evacuation is not None and "Access Denied" in (guard.last_evacuation.error or "")
    # nothing was ever committed: the log, the evidence and the Event's message say the next run starts at 0
    assert guard.last_evacuation.resume_from is None
    assert "no committed checkpoint: the next run starts from step 0" in caught.value.decision.message
    assert caught.value.decision.evidence["resume_from"] is None


def test_a_failed_emergency_checkpoint_names_the_checkpoint_to_resume_from(tmp_path: Any) -> None:
    flaky_fs.reset()
    state, nvml = make_state(), fake({"at": 3.0, "gpu": 0, "xid": 48})
    settings: dict[str, Any] = {"checkpoint_every_steps": 10, "checkpoint_every_s": 0}
    with pytest.raises(Evacuation) as caught, guard_for("flaky://run2", state, nvml, **settings) as guard:
        train(guard, state, nvml, steps=25)
        # the step-20 save runs in the background: storage starts failing only after it committed (on a slow
        # CI machine it was still writing its manifest when the failures began)
        for pending in list(guard.periodic):  # the saves not yet done (done ones are dropped at each step)
            pending.wait(timeout=60)
        FlakyFileSystem.failures[:] = [PermissionError(errno.EACCES, "Access Denied")] * 10
        train(guard, state, nvml, steps=100, start=25)
    assert guard.last_evacuation is not None and guard.last_evacuation.resume_from is not None
    point = guard.last_evacuation.resume_from
    assert (point["step"], point["reason"]) == (20, "periodic")
    assert f"the next run resumes from {point['id']} (step 20, periodic)" in caught.value.decision.message


def test_a_gpu_that_falls_off_the_bus_is_left_at_once(tmp_path: Any) -> None:
    # (A GPU already lost when NVML is opened makes the monitor unavailable, not LOST: the health
    # package's to classify; the guard then says loudly that it is unwatched, as tested below.)
    state, nvml = make_state(), fake({"at": 0.5, "gpu": 0, "lost": True})
    with pytest.raises(Evacuation) as caught, guard_for(f"file://{tmp_path}", state, nvml) as guard:
        train(guard, state, nvml, steps=10)  # the GPU is lost at step 5
        deadline = time.monotonic() + 60  # a hang guard: on a loaded machine the guard may decide after step 9
        while not guard.decision.action:
            assert time.monotonic() < deadline, "the guard never decided"
            time.sleep(0.005)
        guard.step(10)
    assert caught.value.code == 75 and 5 <= caught.value.step <= 10  # after the fault, at the first step it could
    assert caught.value.decision.evidence["state"] == "LOST"


def test_without_nvml_the_guard_says_loudly_it_is_unwatched(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    with guard_for(f"file://{tmp_path}", make_state(), FakeNvml.missing()):
        pass
    said = [r for r in caplog.records if "GPU health is NOT monitored" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "ERROR"


def test_without_nvml_fail_closed_leaves_at_once(tmp_path: Any) -> None:
    state = make_state()
    with (
        pytest.raises(Evacuation) as caught,
        guard_for(f"file://{tmp_path}", state, FakeNvml.missing(), health={"fail_mode": "closed"}) as guard,
    ):
        train(guard, state, FakeNvml.replay(), steps=5)
    assert caught.value.code == 75 and caught.value.step == 0


def test_without_nvml_fail_open_trains_on(tmp_path: Any) -> None:
    state = make_state()
    with guard_for(f"file://{tmp_path}", state, FakeNvml.missing()) as guard:
        assert train(guard, state, FakeNvml.replay(), steps=20, pause=0) == 19


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @gpuguard.hookimpl
    def gpuguard_before_checkpoint(self, step: int, reason: str) -> None:
        self.calls.append(f"before:{reason}:{step}")

    @gpuguard.hookimpl
    def gpuguard_after_checkpoint(self, step: int, reason: str, info: Any) -> None:
        self.calls.append(f"after:{reason}:{info.step}")

    @gpuguard.hookimpl
    def gpuguard_on_evacuation(self, decision: Decision, exit_code: int) -> None:
        self.calls.append(f"evacuation:{exit_code}")


def test_plugins_see_the_evacuation_in_order(tmp_path: Any) -> None:
    recorder = Recorder()
    state, nvml = make_state(), fake({"at": 1.0, "gpu": 0, "xid": 48})
    with pytest.raises(Evacuation) as caught, guard_for(f"file://{tmp_path}", state, nvml, plugins=[recorder]) as guard:
        train(guard, state, nvml, steps=100)
    step = caught.value.step
    assert recorder.calls == [f"before:emergency:{step}", f"after:emergency:{step}", "evacuation:75"]


class Lenient:
    @gpuguard.hookimpl
    def gpuguard_decide(self, decision: Decision) -> Decision | None:
        return gpuguard.guard.policy.CONTINUE if decision.action else None


class ExtraEvidence:
    @gpuguard.hookimpl
    def gpuguard_health_reasons(self, snapshot: Any) -> dict[str, list[gpuguard.Reason]]:
        reason = gpuguard.Reason(
            "SITE_PROBE", gpuguard.HealthState.FAILING, "the site's probe failed", gpuguard.Remedy.REBOOT
        )
        return {d.uuid: [reason] for d in snapshot.devices}


def test_a_plugin_may_override_the_decision(tmp_path: Any) -> None:
    state, nvml = make_state(), fake({"at": 1.0, "gpu": 0, "xid": 48})
    with guard_for(f"file://{tmp_path}", state, nvml, plugins=[Lenient()]) as guard:
        assert train(guard, state, nvml, steps=40) == 39


def test_a_plugin_may_add_health_evidence(tmp_path: Any) -> None:
    state, nvml = make_state(), fake()
    with (
        pytest.raises(Evacuation) as caught,
        guard_for(f"file://{tmp_path}", state, nvml, plugins=[ExtraEvidence()]) as guard,
    ):
        train(guard, state, nvml, steps=40)
    assert "the site's probe failed" in caught.value.decision.message


def test_a_bad_plugin_is_refused_at_construction() -> None:
    class Misspelt:
        @gpuguard.hookimpl
        def gpuguard_on_evacuaton(self) -> None: ...

    with pytest.raises(ConfigError, match=r"plugins: .* invalid plugin"):
        Guard(checkpoint_dir="memory://x", plugins=[Misspelt()])


def test_guard_step_without_a_context_manager_needs_start() -> None:
    guard = Guard(checkpoint_dir="memory://nostart", state={"w": torch.ones(1)}, nvml=FakeNvml.replay(), devices="all")
    assert guard.resume() == 0  # resume starts it
    guard.step(0)
    guard.close()
