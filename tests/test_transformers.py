"""gpuguard.transformers.GpuGuardCallback: a Hugging Face Trainer that evacuates at an agreed optimizer step
and resumes bitwise through gpuguard's store.

In-process tests train a tiny GPT-2 (built from a config, dropout on) in one process; the DDP tests run
two real processes (gloo, CPU) under torchrun and gpuguard-run.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.hf_job import EvacuateAt, SigtermAt, Tokens, trainer_for, weights
from safetensors.torch import load_file
from transformers import TrainerCallback

import gpuguard
from gpuguard import CheckpointStore, ConfigError, Evacuation
from gpuguard.fakenvml import FakeNvml
from gpuguard.transformers import GpuGuardCallback

JOB = Path(__file__).parent / "helpers" / "hf_job.py"
ROOT = Path(__file__).parent.parent

# The fast configuration: 24 samples in batches of 4 with 2 accumulation steps make 3 optimizer steps
# an epoch; 2 epochs; an evaluation every 2 steps (its dataloader draws from the global generator).
FAST: dict[str, Any] = {"epochs": 2, "accumulate": 2, "evaluate_every": 2, "samples": 24}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """The tiny model trains in one intra-op thread, as each torchrun worker does (OMP_NUM_THREADS=1):
    on a loaded 2-core machine two threads made a 6-step run 5-15x slower (1.1 s against 7-20 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(
    folder: Path,
    *,
    samples: int = 48,
    evacuate_at: int | None = None,
    sigterm_at: int | None = None,
    resume: bool = True,
    hooks: tuple[Any, ...] = (),
    **options: Any,
) -> tuple[Any, GpuGuardCallback, Tokens]:
    """One ``train`` in this process with the documented resume line; returns (trainer, callback, data).
    Raises Evacuation as ``train`` does."""
    settings = {k: options.pop(k) for k in ("checkpoint_every_steps",) if k in options}
    callback = GpuGuardCallback(
        checkpoint_dir=f"file://{folder / 'checkpoints'}", nvml=FakeNvml.replay(), resume=resume, **settings
    )
    before: list[Any] = [type(hook)() for hook in hooks]  # a fresh one per run
    if evacuate_at is not None:
        before.append(EvacuateAt(callback, evacuate_at))
    if sigterm_at is not None:
        before.append(SigtermAt(sigterm_at))
    data = Tokens(samples)
    trainer = trainer_for(folder, callback, before=before, data=data, **options)
    trainer.train(resume_from_checkpoint=callback.resume_path())
    return trainer, callback, data


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def fast_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Tokens]:
    """An uninterrupted run of the fast configuration (6 optimizer steps)."""
    trainer, _, data = train(tmp_path_factory.mktemp("reference"), **FAST)
    assert trainer.state.global_step == 6
    return trainer, data


def evacuate_then_resume(folder: Path, reference: tuple[Any, Tokens], **config: Any) -> tuple[Evacuation, Any]:
    """Evacuate (``evacuate_at`` or ``sigterm_at`` in ``config``), then resume with the documented line:
    the final weights, the data read and the learning rate are an uninterrupted run's."""
    reference_trainer, reference_data = reference
    with pytest.raises(Evacuation) as caught:
        train(folder, **config)
    config = {k: v for k, v in config.items() if k not in ("evacuate_at", "sigterm_at")}
    trainer, callback, data = train(folder, **config)
    assert callback.resumed_from is not None and callback.resumed_from.step == caught.value.step
    assert trainer.state.global_step == reference_trainer.state.global_step
    assert data.read == reference_data.read[-len(data.read) :]  # the same samples, in the same order
    assert trainer.lr_scheduler.get_last_lr() == reference_trainer.lr_scheduler.get_last_lr()
    assert_identical(weights(trainer.model), weights(reference_trainer.model))
    return caught.value, trainer


def test_evacuation_exits_75_and_resumes_bitwise_with_accumulation_and_evaluation(
    tmp_path: Path, fast_reference: tuple[Any, Tokens]
) -> None:
    # The fast representative: mid-epoch (step 4 of 3-step epochs), gradient accumulation, an
    # evaluation due right after the evacuation's step, dropout.
    evacuation, trainer = evacuate_then_resume(tmp_path, fast_reference, evacuate_at=4, **FAST)
    assert (evacuation.code, evacuation.step) == (75, 4)
    assert evacuation.decision.action is gpuguard.Action.RESCHEDULE
    [info] = CheckpointStore(f"file://{tmp_path / 'checkpoints'}").list()
    assert (info.step, info.reason) == (4, "emergency")
    assert evacuation.checkpoint is not None and evacuation.checkpoint.id == info.id
    # The optimizer's state is stored keyed by parameter name (the resume mapped it back onto its groups).
    saved: dict[str, Any] = {}
    CheckpointStore(f"file://{tmp_path / 'checkpoints'}").load(saved, info.id, strict=False, no_dist=True)
    names = {name for group in saved["optimizer"]["param_groups"] for name in group["params"]}
    assert names == {f"model.{name}" for name, _ in trainer.model.named_parameters()}
    assert saved["trainer"]["trainer_state"]["global_step"] == 4
    # The Trainer's state came back: the history before the checkpoint, then the resumed run's. The
    # evacuation left before step 4's own evaluation, and the resumed run does not repeat it.
    reference_evaluations = [e["step"] for e in fast_reference[0].state.log_history if "eval_loss" in e]
    evaluations = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert reference_evaluations == [2, 4, 6] and evaluations == [2, 6]
    assert trainer.state.epoch == 2.0
    assert not (tmp_path / "trainer-output" / "checkpoint-4").exists()  # gpuguard's store, not Trainer's files


def test_train_without_the_resume_line_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with CheckpointStore(f"file://{tmp_path / 'checkpoints'}") as store:  # an earlier run's progress
        info = store.save({"model": torch.nn.Linear(2, 2)}, step=3).wait()
    assert info is not None
    callback = GpuGuardCallback(checkpoint_dir=f"file://{tmp_path / 'checkpoints'}", nvml=FakeNvml.replay())
    trainer = trainer_for(tmp_path, callback, data=Tokens(8), epochs=1)
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint=callback\.resume_path\(\)") as caught:
        trainer.train()  # forgot the resume line: would train from step 0 over the checkpoint
    assert info.id in str(caught.value)
    assert trainer.state.global_step == 0
    assert not callback.guard.running
    # resume=False starts over, saying so; resume_path() then gives nothing to resume from.
    callback = GpuGuardCallback(
        checkpoint_dir=f"file://{tmp_path / 'checkpoints'}", nvml=FakeNvml.replay(), resume=False
    )
    trainer = trainer_for(tmp_path, callback, data=Tokens(8), epochs=1)
    assert callback.resume_path() is None
    trainer.train()
    assert trainer.state.global_step == 1
    assert f"training starts from step 0 although checkpoint {info.id}" in caplog.text


def test_misuse_is_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="resume"):
        GpuGuardCallback(checkpoint_dir="memory://x", resume="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sync_every"):
        GpuGuardCallback(checkpoint_dir="memory://x", sync_every=0)
    callback = GpuGuardCallback(checkpoint_dir=f"file://{tmp_path}", nvml=FakeNvml.replay())
    with pytest.raises(gpuguard.GpuGuardError, match="create Trainer"):
        callback.resume_path()  # before the Trainer exists
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], enable_jit_checkpoint=True)
    with pytest.raises(ConfigError, match="enable_jit_checkpoint"):
        Trainer(model=torch.nn.Linear(2, 2), args=args, callbacks=[callback])
    # FSDP as `accelerate launch` passes it to its workers, in their environment.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ConfigError, match=r"ACCELERATE_USE_FSDP.*data parallelism"):
        Trainer(model=torch.nn.Linear(2, 2), args=args, callbacks=[callback])


def test_the_trainer_state_is_stored_as_trainer_writes_it(tmp_path: Path, fast_reference: tuple[Any, Tokens]) -> None:
    # What the checkpoint holds as the Trainer's state is Trainer's own trainer_state.json, which the
    # resume lays out for Trainer to read (gpuguard/integrations/transformers/_internals.py).
    from gpuguard.integrations.transformers._internals import TRAINER_STATE_FILE, trainer_state_dict

    trainer = fast_reference[0]
    state = copy.deepcopy(trainer.state)
    # As Trainer's own checkpoints write it: TrainerControl's exported state is the current one.
    state.stateful_callbacks["TrainerControl"] = trainer.control.state()
    state.save_to_json(str(tmp_path / TRAINER_STATE_FILE))
    written = json.loads((tmp_path / TRAINER_STATE_FILE).read_text())
    assert json.loads(json.dumps(trainer_state_dict(trainer.state, trainer.control))) == written
    assert written["global_step"] == 6 and written["epoch"] == 2.0


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_75(tmp_path: Path, fast_reference: tuple[Any, Tokens]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    evacuation, _ = evacuate_then_resume(tmp_path, fast_reference, sigterm_at=2, **FAST)
    assert (evacuation.code, evacuation.step) == (75, 2)  # one process: the step the signal came in
    assert evacuation.decision.evidence["signal"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before  # handlers put back
    [info] = CheckpointStore(f"file://{tmp_path / 'checkpoints'}").list()
    assert (info.step, info.reason) == (2, "emergency")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("at", "accumulate"),
    [(3, 2), (1, 2), (5, 1)],
    ids=["epoch-end", "first-step", "no-accumulation"],
)
def test_resume_bitwise_at_the_loops_corners(tmp_path: Path, at: int, accumulate: int) -> None:
    config = {**FAST, "accumulate": accumulate}
    reference = train(tmp_path / "reference", **config)
    evacuation, _ = evacuate_then_resume(tmp_path / "run", (reference[0], reference[2]), evacuate_at=at, **config)
    assert evacuation.step == at


class Fp16Scaler(TrainerCallback):  # type: ignore[misc]
    """Gives the optimizer a gradient scaler as accelerate does for fp16 on a GPU (accelerate makes none
    on the CPU): its ``AcceleratedOptimizer`` built again around the same optimizer with a CPU
    ``GradScaler`` that grows every 2 steps, so its state changes and a resume must bring it back."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        accelerated = kwargs["optimizer"]
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        scaler.scale(torch.ones(()))  # creates its scale tensor, as the first scaled loss would
        type(accelerated).__init__(accelerated, accelerated.optimizer, device_placement=False, scaler=scaler)


@pytest.mark.slow
def test_the_gradient_scaler_resumes(tmp_path: Path) -> None:
    reference = train(tmp_path / "reference", hooks=(Fp16Scaler(),), **FAST)
    _, trainer = evacuate_then_resume(
        tmp_path / "run", (reference[0], reference[2]), hooks=(Fp16Scaler(),), evacuate_at=4, **FAST
    )
    scale = trainer.optimizer.scaler.get_scale()
    assert scale == reference[0].optimizer.scaler.get_scale() and scale > 2.0**8  # it grew, and came back


# -- two processes, DDP, gloo ------------------------------------------------------------------

LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
    "gpuguard-run": [sys.executable, "-m", "gpuguard.integrations.torchrun"],
}


def launch(launcher: str, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Two ranks of tests/helpers/hf_job.py (3 epochs of 3 optimizer steps, 2 accumulation steps each)."""
    scenario = folder.parent / "two-healthy-gpus.json"
    scenario.write_text(json.dumps({"gpus": 2, "events": []}))
    env = {
        **os.environ,
        "GPUGUARD_FAKE_NVML": str(scenario),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [*LAUNCHERS[launcher], "--standalone", "--nproc-per-node=2", str(JOB), "--dir", str(folder), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=500, check=False)


def reports(folder: Path) -> list[dict[str, Any]]:
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("ddp-reference")
    done = launch("torchrun", folder, "--evaluate-every", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(folder / "final.safetensors")), reports(folder)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_ranks_evacuate_together_and_resume_bitwise(
    tmp_path: Path, launcher: str, ddp_reference: tuple[dict[str, torch.Tensor], list[dict[str, Any]]]
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    # A fault on rank 1's GPU after optimizer step 3: the ranks agree (sync_every=2) and both leave at step 5;
    # the job's clean-up raises then (a CUDA error on the failed GPU), and the processes still exit 75.
    args = ["--evaluate-every", "4", "--evacuate-at-step", "3", "--evacuate-on-rank", "1", "--raise-in-teardown"]
    done = launch(launcher, folder, *args)
    ranks = reports(folder)
    assert [r["exit_code"] for r in ranks] == [75, 75], done.stderr[-3000:]
    assert "RuntimeError raised while leaving after the evacuation at step 5" in done.stderr
    if launcher == "gpuguard-run":
        assert done.returncode == 75, done.stderr[-3000:]  # plain torchrun reports a failed worker as 1
    else:
        assert "exitcode  : 75" in done.stderr or "exitcode: 75" in done.stderr, done.stderr[-3000:]
    assert [r["global_step"] for r in ranks] == [5, 5]
    [info] = CheckpointStore(f"file://{folder / 'checkpoints'}").list()
    assert (info.step, info.reason, info.world_size) == (5, "emergency", 2)
    done = launch(launcher, folder, "--evaluate-every", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    final, expected = load_file(str(folder / "final.safetensors")), ddp_reference[0]
    for rank, report in enumerate(reports(folder)):
        assert report["resumed_from"] == info.id and report["global_step"] == 9
        tail = ddp_reference[1][rank]["read"][-len(report["read"]) :]
        assert report["read"] == tail  # each rank read the rest of its shard of the data, in order
    assert_identical(final, expected)


@pytest.mark.slow
def test_a_checkpoint_one_rank_cannot_read_is_skipped_by_every_rank(
    tmp_path: Path, ddp_reference: tuple[dict[str, torch.Tensor], list[dict[str, Any]]]
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    # Per-rank layout, a periodic checkpoint every 2 steps (2, 4) and the emergency one at 5.
    args = ["--evaluate-every", "4", "--per-rank", "--every", "2"]
    done = launch("torchrun", folder, *args, "--evacuate-at-step", "3")
    assert [r["exit_code"] for r in reports(folder)] == [75, 75], done.stderr[-3000:]
    committed = CheckpointStore(f"file://{folder / 'checkpoints'}").list()
    assert [(c.step, c.reason) for c in committed] == [(2, "periodic"), (4, "periodic"), (5, "emergency")]
    # Rank 1's shard of the newest checkpoint is damaged: rank 0 could read it, rank 1 cannot.
    shard = next((folder / "checkpoints" / committed[-1].id).glob("rank-00001-of-00002.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    done = launch("torchrun", folder, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    for report in reports(folder):  # both ranks resumed from step 4, none from step 5 or 0
        assert report["resumed_from"] == committed[1].id and report["global_step"] == 9
    assert_identical(load_file(str(folder / "final.safetensors")), ddp_reference[0])
