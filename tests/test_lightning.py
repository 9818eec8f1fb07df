"""GpuGuardCallback: Lightning's own resume from gpuguard's checkpoints, evacuation through the trainer.

In-process tests drive a one-process Trainer with the fake NVML on a manual clock (the fault lands
at a chosen batch); the two-process DDP test runs real torchrun processes (gloo, CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.lightning_job import build
from safetensors.torch import load_file

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


def fit(
    folder: Path,
    *,
    package: str = "lightning",
    epochs: int = 3,
    max_steps: int = -1,
    fault_at: tuple[int, int] | None = None,
    extra_callbacks: tuple[Any, ...] | list[Any] = (),
    **settings: Any,
) -> tuple[Any, Any, GpuGuardCallback]:
    """One fit in this process; returns (trainer, model, callback). Raises Evacuation as fit does."""
    pl, regression = build(package, 0.0)
    pl.seed_everything(0, workers=True, verbose=False)
    model = regression()
    fake = FakeNvml.from_scenario(XID48) if fault_at else FakeNvml.replay()
    guard = GpuGuardCallback(checkpoint_dir=f"file://{folder}", nvml=fake, **settings)
    callbacks: list[Any] = [guard, *extra_callbacks]
    if fault_at:
        hook = type("FaultHook", (FaultAt, pl.Callback), {})
        callbacks.append(hook(fake, guard, *fault_at))
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
    pl.seed_everything(0, verbose=False)
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


# -- two processes, DDP, gloo ------------------------------------------------------------------


def launch(folder: Path, fault_gpu: int | None) -> subprocess.CompletedProcess[str]:
    """gpuguard-run (torchrun) with 2 ranks; a fault scenario on one rank's GPU, or healthy H200s."""
    env = {**os.environ, "GPUGUARD_FAKE_NVML": "h200", "OMP_NUM_THREADS": "1"}
    if fault_gpu is not None:
        scenario = folder / f"fault-{len(list(folder.glob('fault-*')))}.json"
        scenario.write_text(json.dumps({"gpus": 2, "events": [{"at": 1.0, "gpu": fault_gpu, "xid": 48}]}))
        env["GPUGUARD_FAKE_NVML"] = str(scenario)
    # --leave-grace-s: once one rank has left with 75, the other writes its report and leaves on its own
    cmd = [sys.executable, "-m", "gpuguard.integrations.torchrun", "--standalone", "--nproc-per-node=2"]
    cmd += ["--leave-grace-s=120", str(JOB), "--dir", str(folder), "--epochs", "4", "--sleep", "0.1"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280, check=False)


def rank_reports(folder: Path) -> list[dict[str, Any]]:
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_ddp_two_ranks_evacuate_together_and_resume_identical(tmp_path: Path) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    done = launch(ref, None)
    assert done.returncode == 0, done.stderr[-3000:]
    store = CheckpointStore(f"file://{run / 'checkpoints'}")
    steps = []
    for attempt in range(2):  # a fault on rank 1's GPU, then again in the resumed run
        done = launch(run, 1)
        assert done.returncode == 75, done.stderr[-3000:]
        reports = rank_reports(run)
        assert [r["exit_code"] for r in reports] == [75, 75]
        assert reports[0]["last_batch"] == reports[1]["last_batch"]  # both stopped after the same batch
        step = reports[0]["global_step"]
        assert reports[1]["global_step"] == step
        committed = store.list()
        assert len(committed) == attempt + 1 and committed[-1].step == step
        assert committed[-1].reason == "emergency" and committed[-1].world_size == 2
        if attempt:
            assert reports[0]["resumed_from"] == committed[0].id
            assert reports[0]["first_batch"][2] == steps[0]  # continued at that global step
        steps.append(step)
    assert steps[1] > steps[0]
    done = launch(run, None)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = rank_reports(run)
    assert reports[0]["resumed_from"] == store.list()[-1].id
    assert reports[0]["first_batch"][2] == steps[1] and reports[0]["global_step"] == 32
    final, expected = load_file(str(run / "final.safetensors")), load_file(str(ref / "final.safetensors"))
    assert_identical(final, expected)
