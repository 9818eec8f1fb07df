"""The loss check after a restore in a Lightning run: GpuGuardCallback hands the guard the loss Lightning
already holds (on_train_batch_end's ``outputs["loss"]``), the checkpoints record the window, Lightning's own
resume arms the check, and a run whose every checkpoint is demoted raises instead of starting over."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_lightning import fit

from gpuguard import CheckpointCorruptError, CheckpointStore


def test_the_callback_records_the_window_and_a_resume_is_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ckpt"
    fit(folder, max_steps=20, checkpoint_every_steps=20)
    info = CheckpointStore(f"file://{folder}").latest()
    assert info is not None and info.step == 20
    window = info.extra["loss_window"]  # every optimizer step's loss, the epoch's last batch's too (step 16)
    assert window["count"] == 20 and window["first_step"] == 1 and window["last_step"] == 20, window
    caplog.set_level(logging.INFO, "gpuguard")
    _, _, callback = fit(folder, epochs=3, loss_check_steps=5)
    assert callback.resumed_from is not None and callback.resumed_from.id == info.id
    assert f"loss check after the resume from {info.id} passed at step 25" in caplog.text


def test_every_checkpoint_demoted_the_trainer_raises_rather_than_starting_over(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    fit(folder, max_steps=10, checkpoint_every_steps=5)
    store = CheckpointStore(f"file://{folder}")
    for info in store.list():
        store.demote(info.id, "loss")
    with pytest.raises(CheckpointCorruptError, match=r"every committed checkpoint .* was demoted"):
        fit(folder)
