"""The staging pool: a save that comes before the background allocation of its buffer waits for that buffer
instead of allocating a second one on the training thread (found from outside: with a checkpoint every one
or two steps, the first save raced the prepare thread and stalled training on its own allocation)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from gpuguard.checkpoint._layout import plan
from gpuguard.checkpoint._staging import StagingPool

LAYOUT = plan([("w", torch.float32, (1024, 256))], metadata={"format": "pt"})


def test_a_save_before_the_background_allocation_takes_the_prepared_buffer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gpuguard")
    pool = StagingPool()
    pool.expect(LAYOUT)  # as Saver.prepare(background=True) does before starting its thread
    prepared: list[object] = []

    def late_prepare() -> None:  # the prepare thread, held up (a loaded machine) until after the save asked
        time.sleep(0.3)
        prepared.append(pool.prepare(LAYOUT, pin=False, expected=True))

    thread = threading.Thread(target=late_prepare)
    thread.start()
    buffer = pool.acquire(LAYOUT, pin=False, timeout_s=30)
    thread.join()
    assert prepared == [buffer]  # one allocation, the background one
    assert not [r for r in caplog.records if "no staging buffer was prepared" in r.getMessage()]


def test_an_announced_preparation_that_never_comes_does_not_hang_a_save() -> None:
    pool = StagingPool()
    pool.expect(LAYOUT)
    started = time.monotonic()
    buffer = pool.acquire(LAYOUT, pin=False, timeout_s=0.2)  # waits its bound, then allocates itself
    assert buffer.layout.signature == LAYOUT.signature and buffer.in_use
    assert time.monotonic() - started < 10

    pool = StagingPool()
    pool.expect(LAYOUT)
    threading.Timer(0.1, pool.unexpect, args=(LAYOUT,)).start()  # the thread could not start: said so
    assert pool.acquire(LAYOUT, pin=False).layout.signature == LAYOUT.signature  # no deadline: no hang either


def test_an_unprepared_buffer_is_warned_about_only_where_training_waits(caplog: pytest.LogCaptureFixture) -> None:
    # The survivors of a lost peer save a layout no periodic save prepared (every rank's files, written by
    # one), with training stopped: "stalls training" would be wrong there.
    caplog.set_level(logging.DEBUG, "gpuguard")
    StagingPool().acquire(LAYOUT, pin=False, training=False)
    said = [r for r in caplog.records if "no staging buffer was prepared" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG]
    caplog.clear()
    StagingPool().acquire(LAYOUT, pin=False)
    said = [r for r in caplog.records if "no staging buffer was prepared" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING]
