"""Errors that surface: what gpuguard expects is caught and said in a line; a bug keeps its traceback;
a failure on a background thread is logged once, with its traceback, and its repeats are counted."""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any

import pytest
import torch
from helpers import flaky_fs
from helpers.flaky_fs import FlakyFileSystem
from helpers.training import make_state, train_step

import gpuguard
from gpuguard import Evacuation, Guard, StorageError
from gpuguard.fakenvml import FakeNvml
from gpuguard.guard._failures import BackgroundFailures


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 60  # a hang guard: the conditions are events
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.005)


def records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_a_failure_is_logged_once_with_its_traceback_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "gpuguard")
    failures = BackgroundFailures()
    for n in range(4):
        try:
            raise KeyError(f"missing {n}")
        except KeyError as exc:
            failures.failed("deciding", exc)
    failures.succeeded("deciding")
    failures.failed("pruning old checkpoints", StorageError("bucket gone"), expected=True)
    failures.summary()
    (first,) = [r for r in records(caplog, "deciding failed") if r.levelno == logging.ERROR]
    assert "KeyError: 'missing 0'" in first.getMessage() and "this is a bug" in first.getMessage()
    assert first.exc_info is not None and first.exc_info[1] is not None  # the traceback, in the record
    assert len(records(caplog, "deciding failed again")) == 3 and failures.counts["deciding"] == 4
    assert len(records(caplog, "deciding works again after 4 failures in a row")) == 1
    (storage,) = records(caplog, "pruning old checkpoints failed")
    assert storage.exc_info is None and "bucket gone" in storage.getMessage()  # expected: a line, no traceback
    assert len(records(caplog, "deciding failed 4 times while the guard ran")) == 1
    assert not records(caplog, "pruning old checkpoints failed 1 times")


class Broken:
    """A health-evidence plugin with a bug, until it is fixed."""

    def __init__(self) -> None:
        self.broken = False
        self.calls = 0

    @gpuguard.hookimpl
    def gpuguard_health_reasons(self, snapshot: Any) -> None:
        self.calls += 1
        if self.broken:
            raise ZeroDivisionError("division by zero in the site's probe")


def test_a_decision_loop_that_keeps_failing_says_it_once_and_training_goes_on(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "gpuguard")
    plugin, state = Broken(), make_state()
    nvml = FakeNvml.from_scenario({"gpus": 1, "events": []})
    with Guard(
        f"file://{tmp_path}", state, nvml=nvml, devices="all", plugins=[plugin], health={"poll_interval_s": 0.01}
    ) as guard:
        plugin.broken = True  # after the start, which would have failed on it
        step = 0
        while guard.failures.counts.get("deciding", 0) < 10:  # the guard's thread woke 10 times, failing
            train_step(state["model"], state["optimizer"], state["scheduler"])
            guard.step(step)  # the training thread never sees the plugin's error
            step += 1
        plugin.broken = False
        calls = plugin.calls
        wait_for(lambda: plugin.calls > calls + 1, "an evaluation that works")
    failed = [r for r in records(caplog, "deciding failed") if r.levelno == logging.ERROR]
    assert len(failed) == 1, [r.getMessage() for r in failed]  # once, not at every wake
    assert failed[0].exc_info is not None and isinstance(failed[0].exc_info[1], ZeroDivisionError)
    (recovered,) = records(caplog, "deciding works again after")
    count = int(recovered.getMessage().split("after ")[1].split()[0])
    assert count >= 10 and guard.failures.counts["deciding"] == count


def test_a_bug_in_the_emergency_checkpoint_is_logged_with_its_traceback_and_the_job_still_leaves(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "gpuguard")
    flaky_fs.reset()
    nvml = FakeNvml.from_scenario({"gpus": 1, "events": [{"at": 0.5, "gpu": 0, "xid": 48}]})
    state = make_state()
    FlakyFileSystem.failures[:] = [TypeError("a bytes-like object is required, not 'NoneType'")] * 10
    with pytest.raises(Evacuation) as caught, Guard("flaky://bug", state, nvml=nvml, devices="all") as guard:
        for step in range(1000):
            nvml.clock.set(step * 0.1)
            train_step(state["model"], state["optimizer"], state["scheduler"])
            time.sleep(0.003)
            guard.step(step)
    # the GPU is bad: the job leaves with 75 all the same, and the bug is not dressed up as a storage error
    assert caught.value.code == 75 and caught.value.checkpoint is None
    assert guard.last_evacuation is not None
    assert guard.last_evacuation.error == "TypeError: a bytes-like object is required, not 'NoneType'"
    assert "emergency checkpoint failed (TypeError: a bytes-like object" in caught.value.decision.message
    (logged,) = records(caplog, "emergency checkpoint at step")
    assert logged.exc_info is not None and isinstance(logged.exc_info[1], TypeError)


def test_an_expected_storage_failure_in_the_emergency_checkpoint_is_one_line(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "gpuguard")
    flaky_fs.reset()
    nvml = FakeNvml.from_scenario({"gpus": 1, "events": [{"at": 0.5, "gpu": 0, "xid": 48}]})
    state = {"w": torch.ones(4)}
    FlakyFileSystem.failures[:] = [PermissionError(errno.EACCES, "Access Denied")] * 10
    with pytest.raises(Evacuation), Guard("flaky://denied", state, nvml=nvml, devices="all") as guard:
        for step in range(1000):
            nvml.clock.set(step * 0.1)
            time.sleep(0.003)
            guard.step(step)
    (logged,) = records(caplog, "emergency checkpoint at step")
    assert logged.exc_info is None and "Access Denied" in logged.getMessage()


def test_a_plugin_that_fails_at_the_start_fails_the_start_and_leaves_no_thread(tmp_path: Any) -> None:
    plugin = Broken()
    plugin.broken = True
    guard = Guard(f"file://{tmp_path}", {"w": torch.ones(1)}, nvml=FakeNvml.replay(), devices="all", plugins=[plugin])
    before = set(threading.enumerate())
    with pytest.raises(ZeroDivisionError):
        guard.start()
    assert not guard.running

    def left() -> list[str]:
        return [t.name for t in threading.enumerate() if t not in before and t.name.startswith("gpuguard-")]

    wait_for(lambda: not left(), "the guard's and the monitor's threads end")
