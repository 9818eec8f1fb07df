"""GpuGuardCallback: Lightning's own resume from gpuguard's checkpoints, evacuation through the trainer.

In-process tests drive a one-process Trainer with the fake NVML on a manual clock (the fault lands
at a chosen batch); tests/test_lightning_processes.py runs real processes (exit codes, 2-rank DDP).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.lightning_job import build

import gpuguard
from gpuguard import CheckpointStore, ConfigError, Evacuation
from gpuguard.fakenvml import FakeNvml
from gpuguard.lightning import GpuGuardCallback, GpuGuardCheckpointIO, load_lightning_checkpoint

JOB = Path(__file__).parent / "helpers" / "lightning_job.py"
XID48 = {"gpus": 1, "events": [{"at": 5.0, "gpu": 0, "xid": 48}]}


class FaultAt:
    """Moves the fake NVML's clock past the scenario's fault after batch ``batch`` of epoch ``epoch``,
    then waits (a hang guard only) until the guard has decided, so the evacuation step is known."""

    def __init__(self, fake: FakeNvml, guard: Any, epoch: int, batch: int) -> None:
        self.fake, self.guard, self.at = fake, guard, (epoch, batch)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if (trainer.current_epoch, args[-1]) == self.at:
            self.fake.clock.advance(10.0)
            deadline = time.monotonic() + 60
            while not self.guard.guard.decision.action and time.monotonic() < deadline:
                time.sleep(0.01)


class EvacuateAt:
    """Requests an evacuation at the start of batch ``batch`` of epoch ``epoch`` (in one process the
    guard acts at its next step: after this batch's optimizer step, or at the epoch's end for its last)."""

    def __init__(self, callback: Any, epoch: int, batch: int) -> None:
        self.callback, self.at = callback, (epoch, batch)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            self.callback.guard.request_evacuation("test: evacuate here")


def fit(
    folder: Path,
    *,
    package: str = "lightning",
    epochs: int = 3,
    max_steps: int = -1,
    fault_at: tuple[int, int] | None = None,
    evacuate_at: tuple[int, int] | None = None,
    extra_callbacks: tuple[Any, ...] | list[Any] = (),
    generator: bool = False,
    validation: bool = False,
    accumulate: int = 1,
    **settings: Any,
) -> tuple[Any, Any, GpuGuardCallback]:
    """One fit in this process; returns (trainer, model, callback). Raises Evacuation as fit does.

    ``fault_at``: an XID 48 from the fake NVML after that (epoch, batch); ``evacuate_at``: a
    `request_evacuation` at the start of that (epoch, batch) (the guard acts after its optimizer step).
    ``validation``: a validation loop every 5 training batches (and at each epoch's end).
    """
    pl, regression = build(package, 0.0, generator=generator, validation=validation)
    pl.seed_everything(0, workers=True)
    model = regression()
    fake = FakeNvml.from_scenario(XID48) if fault_at else FakeNvml.replay()
    guard = GpuGuardCallback(checkpoint_dir=f"file://{folder}", nvml=fake, **settings)
    callbacks: list[Any] = [guard, *extra_callbacks]
    if fault_at:
        hook = type("FaultHook", (FaultAt, pl.Callback), {})
        callbacks.append(hook(fake, guard, *fault_at))
    if evacuate_at:
        callbacks.append(type("EvacuateHook", (EvacuateAt, pl.Callback), {})(guard, *evacuate_at))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accumulate_grad_batches=accumulate,
        num_sanity_val_steps=0,
        **({"val_check_interval": 5} if validation else {}),
    )
    trainer.fit(model)
    return trainer, model, guard


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted 3-epoch run (16 batches an epoch, 48 steps)."""
    _, model, _ = fit(tmp_path_factory.mktemp("reference") / "ckpt")
    return weights(model)


def test_resumes_at_epoch_end_and_mid_epoch_bitwise_identical(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    folder = tmp_path / "ckpt"
    # Stop at an epoch's last batch (16), then twice mid-epoch (21, 37), each with a checkpoint there.
    firsts = []
    for stop in (16, 21, 37):
        trainer, model, guard = fit(folder, max_steps=stop, checkpoint_every_steps=stop)
        assert trainer.global_step == stop
        firsts.append((guard.resumed_from.step if guard.resumed_from else None, model.seen[0]))
    trainer, model, guard = fit(folder)
    firsts.append((guard.resumed_from.step if guard.resumed_from else None, model.seen[0]))
    # (resumed from step, (epoch, batch_idx, global step) of the first batch trained)
    assert firsts == [(None, (0, 0, 0)), (16, (1, 0, 16)), (21, (1, 5, 21)), (37, (2, 5, 37))]
    assert trainer.global_step == 48 and trainer.current_epoch == 3
    assert len(model.seen) == 48 - 37
    assert_identical(weights(model), reference)


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_evacuation_stops_the_trainer_and_exits_75(
    tmp_path: Path, reference: dict[str, torch.Tensor], package: str
) -> None:
    folder = tmp_path / "ckpt"
    with pytest.raises(Evacuation) as caught:
        fit(folder, package=package, fault_at=(1, 3))  # decided after batch 3 of epoch 1 (global step 20)
    evacuation = caught.value
    assert evacuation.code == 75 and evacuation.step == 21  # acts at the next step, on the trainer's terms
    assert evacuation.decision.action is gpuguard.Action.RESCHEDULE
    store = CheckpointStore(f"file://{folder}")
    [info] = store.list()
    assert (info.step, info.reason) == (21, "emergency")
    assert evacuation.checkpoint is not None and evacuation.checkpoint.id == info.id
    checkpoint, _ = load_lightning_checkpoint(f"file://{folder}")
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (21, 1)
    if package == "lightning":  # the other package trains the same model: one reference is enough
        trainer, model, guard = fit(folder, package=package)
        assert guard.resumed_from is not None and guard.resumed_from.id == info.id
        assert model.seen[0] == (1, 5, 21)
        assert trainer.global_step == 48
        assert_identical(weights(model), reference)


def test_sigterm_checkpoints_and_exits_75(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    import signal

    pl, _ = build("lightning", 0.0)

    class Terminate(pl.Callback):  # type: ignore[misc, name-defined]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 20:
                os.kill(os.getpid(), signal.SIGTERM)  # what a node drain sends

    folder = tmp_path / "ckpt"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Evacuation) as caught:
        fit(folder, extra_callbacks=[Terminate()])
    assert caught.value.code == 75
    assert signal.getsignal(signal.SIGTERM) == before  # handlers put back
    [info] = CheckpointStore(f"file://{folder}").list()
    assert info.reason == "emergency" and info.step == caught.value.step and info.step >= 20
    trainer, model, _ = fit(folder)
    assert model.seen[0][2] == info.step and trainer.global_step == 48
    assert_identical(weights(model), reference)


def test_given_ckpt_path_is_not_overridden(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    fit(folder, max_steps=5, checkpoint_every_steps=5)
    pl, regression = build("lightning", 0.0)
    model = regression()
    lightning_ckpt = tmp_path / "own.ckpt"
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(model)
    trainer.save_checkpoint(lightning_ckpt)
    guard = GpuGuardCallback(checkpoint_dir=f"file://{folder}", nvml=FakeNvml.replay())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        callbacks=[guard],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    model = regression()
    trainer.fit(model, ckpt_path=lightning_ckpt)
    assert guard.resumed_from is None
    assert model.seen[0][2] == 3  # from the user's checkpoint (step 3), not gpuguard's (step 5)


def test_fit_from_an_older_gpuguard_checkpoint_by_url(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    fit(folder, max_steps=10, checkpoint_every_steps=5)
    older = CheckpointStore(f"file://{folder}").list()[0]
    assert older.step == 5
    pl, regression = build("lightning", 0.0)
    pl.seed_everything(0)
    guard = GpuGuardCallback(checkpoint_dir=f"file://{folder}", nvml=FakeNvml.replay())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=12,
        callbacks=[guard],
        plugins=[GpuGuardCheckpointIO()],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    model = regression()
    trainer.fit(model, ckpt_path=older.url)  # read through gpuguard, not torch.load
    assert guard.resumed_from is None
    assert model.seen[0] == (0, 5, 5) and trainer.global_step == 12


def test_unstorable_entry_fails_at_fit_start(tmp_path: Path) -> None:
    pl, regression = build("lightning", 0.0)

    class Unstorable(regression):  # type: ignore[misc, valid-type]
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["hook"] = print

    guard = GpuGuardCallback(checkpoint_dir=f"file://{tmp_path}", nvml=FakeNvml.replay())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    model = Unstorable()
    with pytest.raises(gpuguard.CheckpointError, match=r"state\['lightning'\]\['hook'\]: cannot checkpoint a"):
        trainer.fit(model)
    assert model.seen == []  # nothing trained unprotected


def test_one_callback_per_fit(tmp_path: Path) -> None:
    _, model, guard = fit(tmp_path / "ckpt", max_steps=2)
    pl, _ = build("lightning", 0.0)
    again = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match=r"one callback serves one Trainer\.fit"):
        again.fit(model)


def test_bad_setting_fails_at_construction() -> None:
    with pytest.raises(ConfigError, match="sync_every"):
        GpuGuardCallback(checkpoint_dir="memory://x", sync_every=0)
    with pytest.raises(ConfigError, match="resume"):
        GpuGuardCallback(checkpoint_dir="memory://x", resume="yes")


# -- leaving at once; bitwise resumes across the loop's corners -----------------------------------


class Recorder:
    """What another callback sees when an evacuation ends the fit."""

    def __init__(self) -> None:
        self.exceptions: list[BaseException] = []
        self.status: list[str] = []
        self.train_end = 0
        self.model: Any = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.exceptions.append(exception)
        self.status.append(str(trainer.state.status.value))
        self.model = pl_module

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.train_end += 1


def recorder() -> Any:
    pl, _ = build("lightning", 0.0)
    return type("RecorderHook", (Recorder, pl.Callback), {})()


def test_evacuation_leaves_at_once_without_validation(tmp_path: Path) -> None:
    seen = recorder()
    with pytest.raises(Evacuation) as caught:
        fit(tmp_path / "ckpt", validation=True, evacuate_at=(1, 4), extra_callbacks=[seen])
    evacuation = caught.value
    assert (evacuation.code, evacuation.step) == (75, 21)  # batch 4 of epoch 1 ends global step 21
    # Validation ran every 5 batches up to here and not after the evacuation:
    # an uninterrupted run validates at step 21 too, right after this batch.
    model = seen.model
    assert model.validations == [5, 10, 15]
    _, uninterrupted, _ = fit(tmp_path / "reference", validation=True, max_steps=21)
    assert uninterrupted.validations == [5, 10, 15, 21]
    assert model.seen[-1] == (1, 4, 20)  # nothing trained after the evacuation's batch
    assert seen.exceptions == [evacuation] and seen.status == ["interrupted"]
    assert seen.train_end == 0
    [info] = CheckpointStore(f"file://{tmp_path / 'ckpt'}").list()
    assert (info.step, info.reason) == (21, "emergency")


CORNERS: dict[str, dict[str, Any]] = {
    # (epoch, batch) whose optimizer step the evacuation follows
    "mid-epoch": {"at": (1, 4)},
    "last-batch-of-epoch": {"at": (0, 15)},  # checkpointed at the epoch's end
    "last-batch-with-max-steps": {"at": (0, 15), "max_steps": 48},
    "last-batch-with-validation": {"at": (0, 15), "validation": True},
    "first-batch-of-next-epoch": {"at": (1, 0)},
    "accumulate-3": {"at": (1, 5), "accumulate": 3},  # batch 5 ends an accumulation: step 8
    "validation-after-the-batch": {"at": (1, 4), "validation": True},
    # A loader with a generator of its own (it draws each iterator's seed and the order from it).
    "own-generator-mid-epoch": {"at": (1, 4), "generator": True},
    "own-generator-at-epoch-end": {"at": (0, 15), "generator": True},
}
EXPECTED_STEP = {"accumulate-3": 8, "first-batch-of-next-epoch": 17}  # 21 mid-epoch (batch 4 of epoch 1), 16 at the end


def assert_resumes_bitwise(folder: Path, at: tuple[int, int], **config: Any) -> Evacuation:
    """Evacuate after batch ``at``, resume to the end: final weights and data order as an uninterrupted run's."""
    _, reference_model, _ = fit(folder / "reference", **config)
    with pytest.raises(Evacuation) as caught:
        fit(folder / "ckpt", evacuate_at=at, **config)
    trainer, model, guard = fit(folder / "ckpt", **config)
    assert guard.resumed_from is not None and guard.resumed_from.step == caught.value.step
    assert trainer.global_step == reference_model.trainer.global_step
    assert model.data == reference_model.data[-len(model.data) :]  # the same batches, in the same order
    assert_identical(weights(model), weights(reference_model))
    return caught.value


def test_resume_bitwise_at_an_epoch_end_with_accumulation_validation_and_an_own_generator(tmp_path: Path) -> None:
    # The fast representative: the evacuation follows an epoch's last batch (checkpointed at the
    # epoch's end; the next epoch's iterator is created again from the saved states), with gradient
    # accumulation, a validation loop right before the checkpoint, dropout, and a loader whose own
    # generator draws each epoch's order and seed.
    evacuation = assert_resumes_bitwise(tmp_path, (0, 15), accumulate=2, validation=True, generator=True)
    assert evacuation.step == 8  # 16 batches, 2 to a step


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CORNERS), ids=list(CORNERS))
def test_resume_bitwise_at_the_loops_corners(tmp_path: Path, case: str) -> None:
    config = dict(CORNERS[case])
    at = config.pop("at")
    evacuation = assert_resumes_bitwise(tmp_path, at, **config)
    assert evacuation.step == EXPECTED_STEP.get(case, 21 if at == (1, 4) else 16)


@pytest.mark.slow
def test_resume_across_max_epochs_is_bitwise(tmp_path: Path) -> None:
    # A run that ends at max_epochs=2 (its last step checkpointed at the epoch's end), continued to
    # max_epochs=3: every step once, from the next epoch's first batch, as a run of 3 epochs.
    _, reference_model, _ = fit(tmp_path / "reference", epochs=3)
    folder = tmp_path / "ckpt"
    trainer, _, _ = fit(folder, epochs=2, checkpoint_every_steps=32)
    assert trainer.global_step == 32
    trainer, model, guard = fit(folder, epochs=3)
    assert guard.resumed_from is not None and guard.resumed_from.step == 32
    assert model.seen[0] == (2, 0, 32) and trainer.global_step == 48
    assert model.data == reference_model.data[32:]
    assert_identical(weights(model), weights(reference_model))


def test_gpuguard_checkpoint_as_ckpt_path_without_the_plugin_names_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ckpt"
    fit(folder, max_steps=5, checkpoint_every_steps=5)
    [info] = CheckpointStore(f"file://{folder}").list()
    pl, regression = build("lightning", 0.0)
    guard = GpuGuardCallback(checkpoint_dir=f"file://{folder}", nvml=FakeNvml.replay())
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, callbacks=[guard], logger=False, enable_checkpointing=False)
    with pytest.raises(gpuguard.CheckpointError) as caught:
        trainer.fit(regression(), ckpt_path=info.url)  # Lightning's TorchCheckpointIO cannot read a folder
    assert "plugins=[gpuguard.lightning.GpuGuardCheckpointIO()]" in str(caught.value)
    assert f"fit(ckpt_path={info.url!r}) names a gpuguard checkpoint, which TorchCheckpointIO" in str(caught.value)
    assert isinstance(caught.value.__cause__, IsADirectoryError)  # Lightning's own error, kept as the cause
    assert "plugins=[gpuguard.lightning.GpuGuardCheckpointIO()]" in caplog.text


def test_a_lightning_release_older_than_the_oldest_supported_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning

    # 2.3 and 2.4 resume a checkpoint taken after a batch one batch early (Lightning-AI/pytorch-lightning#14579).
    monkeypatch.setattr(lightning, "__version__", "2.4.0")
    pl, regression = build("lightning", 0.0)
    model = regression()
    guard = GpuGuardCallback(checkpoint_dir=f"file://{tmp_path}", nvml=FakeNvml.replay())
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, callbacks=[guard], logger=False, enable_checkpointing=False)
    with pytest.raises(
        ConfigError, match=r"lightning\.pytorch: '2\.4\.0' is not valid; GpuGuardCallback needs lightning>=2\.5\.0"
    ):
        trainer.fit(model)
    assert model.seen == []
