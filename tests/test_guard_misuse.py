"""What the guard does when it is used wrongly or asked to act: clear errors, one warning each,
signals chained and restored, state checked before the first step, bounded waits on the way out."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from helpers.training import make_state, train_step

from gpuguard import CheckpointStore, ConfigError, Evacuation, GpuGuardError, Guard, GuardConfig
from gpuguard.errors import UnsupportedStateError
from gpuguard.fakenvml import FakeNvml


def guard_for(url: str, state: dict[str, Any], **settings: Any) -> Guard:
    return Guard(checkpoint_dir=url, state=state, nvml=FakeNvml.replay(), devices="all", **settings)


def warnings_from(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_step_before_start_says_what_to_do() -> None:
    guard = guard_for("memory://misuse-start", {"w": torch.ones(1)})
    with pytest.raises(GpuGuardError, match=r"not running.*with gpuguard.Guard\(\.\.\.\) as guard.*guard.start\(\)"):
        guard.step(0)


def test_step_after_close_is_refused(tmp_path: Path) -> None:
    with guard_for(f"file://{tmp_path}", {"w": torch.ones(1)}) as guard:
        for step in range(30):
            guard.step(step)
    with pytest.raises(GpuGuardError, match="not running"):
        guard.step(30)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"GPUGUARD_CHECKPOINT_EVRY_STEPS": "5"},
            r"GPUGUARD_CHECKPOINT_EVRY_STEPS: '5' .* did you mean "
            r"GPUGUARD_CHECKPOINT_EVERY_STEPS\?",
        ),
        ({"GPUGUARD_HEALTH_ONSET": "3"}, r"did you mean GPUGUARD_HEALTH_ONSET_S\?"),
        ({"GPUGUARD_HEALTH_ONSET_S": "nan"}, r"GPUGUARD_HEALTH_ONSET_S: 'nan' is not valid; must be a finite number"),
        ({"GPUGUARD_DEGRADED_GRACE_S": "inf"}, r"GPUGUARD_DEGRADED_GRACE_S: 'inf' is not valid; must be a finite"),
        ({"GPUGUARD_PREEMPTION_SIGNALS": "SIGTERM,SIGKILL"}, r"preemption_signals: 'SIGKILL' is not valid"),
    ],
    ids=["misspelled", "section-misspelled", "nan-env", "inf-env", "uncatchable-signal"],
)
def test_bad_environment_is_rejected_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GuardConfig.load(env={"GPUGUARD_CHECKPOINT_DIR": "memory://x", **env})


def test_the_variables_gpuguard_reads_are_not_refused() -> None:
    env = {"GPUGUARD_CHECKPOINT_DIR": "memory://x", "GPUGUARD_FAKE_NVML": "h200", "GPUGUARD_CONFIG": ""}
    env |= {"GPUGUARD_PREEMPTION_SIGNALS": "SIGTERM, usr1", "GPUGUARD_CHECKPOINT_EVERY_S": "0"}
    config = GuardConfig.load(env=env)
    assert config.preemption_signals == ["SIGTERM", "SIGUSR1"] and config.checkpoint_every_s is None


@pytest.mark.parametrize("field", ["degraded_grace_s", "preemption_deadline_s", "checkpoint_every_s"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_non_finite_numbers_are_rejected(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"{field}: {value!r} is not valid; must be a finite number greater than 0"):
        GuardConfig(checkpoint_dir="memory://x", **{field: value})


def test_periodic_checkpoints_are_on_by_default_and_0_turns_them_off() -> None:
    assert GuardConfig(checkpoint_dir="x").checkpoint_every_s == 1800.0
    off = GuardConfig(checkpoint_dir="x", checkpoint_every_s=0, checkpoint_every_steps=0)
    assert (off.checkpoint_every_s, off.checkpoint_every_steps) == (None, None)


def test_odd_step_numbers_are_reported_once_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gpuguard")
    with guard_for(f"file://{tmp_path}", {"w": torch.ones(1)}, checkpoint_every_s=0) as guard:
        guard.step(-1)
        for step in (0, 1, 2, 2, 1, 3, 3, 4):  # a repeat, a step back, a repeat again
            guard.step(step)
        guard.step(4.5)  # type: ignore[arg-type]
        guard.step(5.5)  # type: ignore[arg-type]
    assert len(warnings_from(caplog, "guard.step(-1): step numbers start at 0")) == 1
    order = warnings_from(caplog, "steps must increase")
    assert len(order) == 1 and "guard.step(2) after guard.step(2)" in order[0]
    kinds = warnings_from(caplog, "the step must be an int")
    assert len(kinds) == 1 and "guard.step(4.5)" in kinds[0] and "a float was passed" in kinds[0]


def test_a_step_below_the_resumed_one_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"file://{tmp_path}"
    with guard_for(url, {"w": torch.ones(1)}, checkpoint_every_steps=5, checkpoint_every_s=0) as guard:
        for step in range(6):
            guard.step(step)
    caplog.set_level(logging.WARNING, "gpuguard")
    with guard_for(url, {"w": torch.ones(1)}) as guard:
        assert guard.resume() == 6
        guard.step(0)  # the loop restarted from 0 instead of resume()'s value
    [message] = warnings_from(caplog, "below the resumed step")
    assert "guard.step(0) lies at or below the resumed step 5 (resume() returned 6)" in message


def test_unsupported_state_is_refused_before_the_first_step(tmp_path: Path) -> None:
    guard = guard_for(f"file://{tmp_path}", {"w": torch.ones(1), "extras": {"hook": lambda: None}})
    with pytest.raises(UnsupportedStateError, match=r"state\['extras'\]\['hook'\]: cannot checkpoint a function"):
        guard.start()
    assert not guard.running


def test_generators_dicts_and_paths_round_trip_in_place(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    extras: dict[str, Any] = {"epoch": 4, "order": torch.arange(5), "inner": {"gen": torch.Generator().manual_seed(5)}}
    state = {"w": torch.ones(2), "gen": generator, "extras": extras}
    with guard_for(tmp_path / "ckpt", state, checkpoint_every_steps=1, checkpoint_every_s=0) as guard:
        guard.step(0)
        guard.step(1)  # periodic saves start after step 0
    expected = (torch.rand(3, generator=generator), torch.rand(2, generator=extras["inner"]["gen"]))
    fresh_gen, inner_gen = torch.Generator().manual_seed(99), torch.Generator().manual_seed(98)
    fresh_extras: dict[str, Any] = {"epoch": 0, "order": torch.zeros(5, dtype=torch.int64), "inner": {"gen": inner_gen}}
    fresh = {"w": torch.zeros(2), "gen": fresh_gen, "extras": fresh_extras}
    with guard_for(str(tmp_path / "ckpt"), fresh) as guard:
        assert guard.resume() == 2
    assert fresh["extras"] is fresh_extras and fresh_extras["epoch"] == 4  # the same dict object, restored
    assert torch.equal(fresh_extras["order"], torch.arange(5)) and fresh_extras["inner"]["gen"] is inner_gen
    assert torch.equal(torch.rand(3, generator=fresh_gen), expected[0])
    assert torch.equal(torch.rand(2, generator=inner_gen), expected[1])


def test_checkpoint_now_saves_at_the_next_step(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    with guard_for(url, {"w": torch.ones(1)}, checkpoint_every_s=0) as guard:
        for step in range(5):
            guard.step(step)
        # the request comes from another thread; step 5 is the first step after it returned (a sleep here
        # let a thread that a loaded machine had not yet run ask after step 5: nothing was saved)
        asker = threading.Thread(target=guard.checkpoint_now)
        asker.start()
        asker.join()
        guard.step(5)
    with CheckpointStore(url) as store:
        assert [(c.step, c.reason) for c in store.list()] == [(5, "periodic")]


def test_request_evacuation_from_another_thread(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    with pytest.raises(Evacuation) as caught, guard_for(url, {"w": torch.ones(1)}, checkpoint_every_s=0) as guard:
        for step in range(3):
            guard.step(step)
        asker = threading.Thread(target=guard.request_evacuation, args=("the scheduler wants this node",))
        asker.start()
        asker.join()
        guard.step(3)
    assert caught.value.code == 75 and caught.value.step == 3
    assert caught.value.decision.message == "the scheduler wants this node"
    with CheckpointStore(url) as store:
        latest = store.latest()
        assert latest is not None and (latest.step, latest.reason) == (3, "emergency")


def test_sigterm_chains_to_the_users_handler_and_is_restored(tmp_path: Path) -> None:
    seen: list[int] = []

    def users_handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    before = signal.signal(signal.SIGTERM, users_handler)
    try:
        url = f"file://{tmp_path}"
        with pytest.raises(Evacuation) as caught, guard_for(url, make_state(), checkpoint_every_s=0) as guard:
            state = guard.state
            for step in range(4):
                train_step(state["model"], state["optimizer"], state["scheduler"])
                if step == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)  # the handler runs between bytecodes, soon after
                guard.step(step)
        assert seen == [signal.SIGTERM]  # the user's handler ran too
        assert caught.value.code == 75 and caught.value.step == 2
        assert guard.last_evacuation is not None and guard.last_evacuation.signal == "SIGTERM"
        assert guard.last_evacuation.signal_to_durable_s is not None
        assert signal.getsignal(signal.SIGTERM) is users_handler  # ours is gone after close
    finally:
        signal.signal(signal.SIGTERM, before)


def test_off_the_main_thread_no_handler_is_installed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gpuguard")
    before = signal.getsignal(signal.SIGTERM)
    guards: list[Guard] = []

    def run() -> None:
        guard = guard_for(f"file://{tmp_path}", {"w": torch.ones(1)}).start()
        guards.append(guard)
        guard.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert guards and signal.getsignal(signal.SIGTERM) is before
    said = warnings_from(caplog, "cannot catch SIGTERM")
    assert len(said) <= 1  # said once per process (an earlier test may have said it)


def test_a_grace_period_shorter_than_the_deadline_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gpuguard")
    with guard_for("memory://grace", {"w": torch.ones(1)}, termination_grace_s=20, preemption_deadline_s=25):
        pass
    assert warnings_from(caplog, "preemption_deadline_s=25s does not fit in the pod's grace period of 20s")


def test_resume_after_steps_is_refused_instead_of_rolling_the_state_back(tmp_path: Path) -> None:
    """A second resume() mid-loop loaded the newest checkpoint over the trained state without a word."""
    w = torch.zeros(1)
    settings = {"checkpoint_every_steps": 1, "checkpoint_every_s": 0}
    with guard_for(f"file://{tmp_path}", {"w": w}, **settings) as guard:
        for step in range(guard.resume(), 2):
            w += 1
            guard.step(step)
    with guard_for(f"file://{tmp_path}", {"w": w}, **settings) as guard:
        start = guard.resume()
        assert guard.resume() == start  # again before any step: the same load, harmless
        for step in range(start, start + 3):
            w += 1
            guard.step(step)
        trained = w.clone()
        with pytest.raises(GpuGuardError, match=r"guard.resume\(\) called after guard.step\(4\): .* rolling training"):
            guard.resume()
        assert torch.equal(w, trained)  # the live state is untouched


def test_a_save_time_estimate_cut_short_by_close_is_not_reported_as_a_bug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that ends right after its first step closes the store under the background write-rate probe;
    that probe failing then is the close, not a bug (it logged "this is a bug" with a traceback)."""
    caplog.set_level(logging.DEBUG, "gpuguard")
    guard = guard_for(f"file://{tmp_path}", {"w": torch.ones(1)}, checkpoint_every_s=0).start()
    guard.step(0)
    guard.close()
    guard._estimate_save_time()  # the probe thread's work, finishing after close() as it does in a short run
    assert not [r for r in caplog.records if "this is a bug" in r.getMessage()]
    assert [r for r in caplog.records if "cut short by close()" in r.getMessage()]


class StuckFileSystem(MemoryFileSystem):
    """Writes block until released: an upload that hangs (a fake, not a mock)."""

    protocol = "stuck"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    release = threading.Event()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode:
            StuckFileSystem.release.wait(60)
        return super()._open(path, mode, **kwargs)

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        StuckFileSystem.release.wait(60)
        super().pipe_file(path, value, *args, **kwargs)


fsspec.register_implementation("stuck", StuckFileSystem, clobber=True)


def test_close_does_not_wait_forever_on_a_stuck_periodic_save(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "gpuguard")
    StuckFileSystem.release.clear()
    try:
        guard = guard_for("stuck://run", {"w": torch.ones(1)}, checkpoint_every_steps=2, checkpoint_every_s=0)
        guard.start()
        for step in range(3):
            guard.step(step)
        started = time.monotonic()
        guard.close(timeout_s=0.5)
        # 0.5 s for the save, 1 s for the store's close, and 3 s of slack for a loaded machine: far below the
        # 60 s the stuck write would hold a close that waited for it
        assert time.monotonic() - started < 0.5 + 1.0 + 3.0
        [message] = warnings_from(caplog, "not committed within")
        assert "step 2" in message and "no committed checkpoint: the next run starts from step 0" in message
    finally:
        StuckFileSystem.release.set()


def test_a_script_without_with_still_commits_its_last_periodic_save(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import logging, torch, gpuguard
        from gpuguard.fakenvml import FakeNvml
        logging.basicConfig(level=logging.WARNING)
        guard = gpuguard.Guard(checkpoint_dir={str(tmp_path)!r}, state={{"w": torch.ones(2 ** 20)}},
                               nvml=FakeNvml.replay(), devices="all", checkpoint_every_steps=10,
                               checkpoint_every_s=0)
        guard.start()
        for step in range(11):
            guard.step(step)
        # no close(), no with: the interpreter ends here
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cannot schedule new futures" not in result.stderr
    assert "the program is ending with the guard still open" in result.stderr
    with CheckpointStore(f"file://{tmp_path}") as store:
        latest = store.latest()
        assert latest is not None and latest.step == 10 and store.verify(latest.id).ok
    assert "the next run resumes from " + latest.id in result.stderr


def test_a_sigterm_after_the_last_step_is_not_swallowed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, torch, gpuguard
        from gpuguard.fakenvml import FakeNvml
        with gpuguard.Guard(checkpoint_dir={str(tmp_path)!r}, state={{"w": torch.ones(1)}},
                            nvml=FakeNvml.replay(), devices="all") as guard:
            for step in range(3):
                guard.step(step)
            os.kill(os.getpid(), signal.SIGTERM)  # the loop is over: no step() will act on it
        print("still running after close")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == -signal.SIGTERM, result.stderr[-3000:]
    assert "still running" not in result.stdout
    assert "SIGTERM came after the last step(); delivering it again" in result.stderr


def test_a_checkpoint_dir_in_process_memory_is_said_to_end_with_the_process(caplog: pytest.LogCaptureFixture) -> None:
    # memory:// checkpoints vanish with the process: an evacuation's "the next run resumes from ..." cannot hold
    caplog.set_level(logging.WARNING, "gpuguard")
    with guard_for("memory://misuse-ephemeral", {"w": torch.ones(1)}):
        pass
    said = [r.getMessage() for r in caplog.records if "in this process's memory" in r.getMessage()]
    assert len(said) == 1 and "starts from step 0" in said[0]


def test_a_gpu_named_by_a_uuid_nvml_does_not_know_is_said_to_be_unmonitored(caplog: pytest.LogCaptureFixture) -> None:
    # a mistyped UUID: the monitor watched nothing for it and said only "could not be opened" (a warning)
    caplog.set_level(logging.WARNING, "gpuguard")
    with Guard(
        checkpoint_dir="memory://misuse-uuid", state={"w": torch.ones(1)}, nvml=FakeNvml.replay(), devices=["GPU-nope"]
    ):
        pass
    said = [r for r in caplog.records if "is NOT monitored" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR, [r.getMessage() for r in caplog.records]
    assert "GPU-nope" in said[0].getMessage() and "fail_mode=closed" in said[0].getMessage()
