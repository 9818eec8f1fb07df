"""Overlapping the snapshot with the next forward and backward: only the optimizer step waits."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from gpuguard import CheckpointStore
from gpuguard.checkpoint._staging import StagingBuffer
from gpuguard.errors import CheckpointError


def model_with_buffers() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, optimizer)
    return model, optimizer


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(32, 64)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()},
    }


def test_the_checkpoint_holds_the_state_of_the_save_not_of_later_steps(tmp_path: Any) -> None:
    model, optimizer = model_with_buffers()
    expected = snapshot(model, optimizer)
    with CheckpointStore(str(tmp_path)) as store:
        pending = store.save({"model": model, "optimizer": optimizer}, step=1, rng=False, overlap_with=[optimizer])
        # Training goes on at once: the forward changes BatchNorm's running stats (copied before save
        # returned), and the optimizer step waits until parameters and moments are copied.
        for _ in range(3):
            step(model, optimizer)
        pending.wait()
        restored_model, restored_optimizer = model_with_buffers()
        with torch.no_grad():
            for p in restored_model.parameters():
                p.add_(1)
        store.load({"model": restored_model, "optimizer": restored_optimizer})
    got = snapshot(restored_model, restored_optimizer)
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
    for index, per_param in expected["optimizer"].items():
        for name, tensor in per_param.items():
            assert torch.equal(tensor, got["optimizer"][index][name]), (index, name)
    assert not torch.equal(expected["model"]["1.running_mean"], model.state_dict()["1.running_mean"])


def test_the_optimizer_step_waits_only_while_a_copy_is_in_flight(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deferred copy is held until the test lets it finish (the one private seam here: without it,
    # whether the copy is still running when step() is called would be a matter of timing).
    release, order = threading.Event(), []
    deferred = StagingBuffer.snapshot_deferred

    def held(self: StagingBuffer, tensors: Any, later: Any) -> Any:
        finish = deferred(self, tensors, later)

        def when_released() -> None:
            release.wait(60)
            finish()
            order.append("copy done")

        return when_released

    monkeypatch.setattr(StagingBuffer, "snapshot_deferred", held)
    model, optimizer = model_with_buffers()
    with CheckpointStore(str(tmp_path)) as store:
        pending = store.save({"model": model, "optimizer": optimizer}, step=1, overlap_with=[optimizer])
        optimizer.register_step_pre_hook(lambda *_: order.append("step proceeds"))  # runs after gpuguard's hook
        store.last_step_wait_s = -1.0
        stepping = threading.Thread(target=step, args=(model, optimizer))
        stepping.start()
        stepping.join(0.2)  # a step that did not wait would be done by now, on most machines
        release.set()
        stepping.join(60)
        assert order == ["copy done", "step proceeds"]  # the step waited for the copy
        assert store.last_step_wait_s > 0
        assert pending.wait() is not None
        store.last_step_wait_s = -1.0
        step(model, optimizer)  # no copy in flight: the hook returns without waiting, and records no wait
        assert store.last_step_wait_s == -1.0 and order[-1] == "step proceeds"
        # registering again for the next save does not stack hooks: gpuguard's and the test's
        store.save({"model": model, "optimizer": optimizer}, step=2, overlap_with=[optimizer]).wait()
        assert len(optimizer._optimizer_step_pre_hooks) == 2


def held_copies(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Deferred copies wait for the returned event (the private seam: otherwise whether a change lands
    before or after the copy would be a matter of timing)."""
    release = threading.Event()
    deferred = StagingBuffer.snapshot_deferred

    def held(self: StagingBuffer, tensors: Any, later: Any) -> Any:
        finish = deferred(self, tensors, later)

        def when_released() -> None:
            release.wait(60)
            finish()

        return when_released

    monkeypatch.setattr(StagingBuffer, "snapshot_deferred", held)
    return release


def test_a_parameter_changed_outside_step_before_its_copy_fails_that_save_and_stops_overlap(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = held_copies(monkeypatch)
    model, optimizer = model_with_buffers()
    state = {"model": model, "optimizer": optimizer}
    with CheckpointStore(str(tmp_path)) as store:
        pending = store.save(state, step=1, rng=False, overlap_with=[optimizer])
        with torch.no_grad():
            model[0].weight.clamp_(-0.01, 0.01)  # a change outside optimizer.step(), while the copy is pending
        release.set()
        with pytest.raises(CheckpointError, match=r"step 1 is not committed: '.*0\.weight' changed outside"):
            pending.wait()
        assert store.latest() is None  # nothing committed
        assert store.overlap_refused is not None and "0.weight" in store.overlap_refused
        assert "overlap_snapshot turned off for the rest of this run" in caplog.text
        # From now on overlap_with is ignored: the snapshot is whole when save returns.
        expected = snapshot(model, optimizer)
        later = store.save(state, step=2, rng=False, overlap_with=[optimizer])
        with torch.no_grad():
            model[0].weight.add_(1.0)
        assert later.wait().step == 2
        restored_model, restored_optimizer = model_with_buffers()
        store.load({"model": restored_model, "optimizer": restored_optimizer})
    assert torch.equal(snapshot(restored_model, restored_optimizer)["model"]["0.weight"], expected["model"]["0.weight"])


def test_a_change_after_the_copy_keeps_that_checkpoint_and_stops_overlap_at_the_next_step(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model, optimizer = model_with_buffers()
    state = {"model": model, "optimizer": optimizer}
    expected = snapshot(model, optimizer)
    with CheckpointStore(str(tmp_path)) as store:
        info = store.save(state, step=1, rng=False, overlap_with=[optimizer]).wait()  # the copy is done
        assert store.overlap_refused is None
        with torch.no_grad():
            model[2].bias.mul_(2.0)  # outside optimizer.step(), after the copy
        step(model, optimizer)  # its pre-hook compares the versions
        assert store.overlap_refused is not None and "2.bias" in store.overlap_refused
        assert "That checkpoint is intact" in caplog.text
        restored_model, restored_optimizer = model_with_buffers()
        assert store.load({"model": restored_model, "optimizer": restored_optimizer}) == info.step
    assert torch.equal(snapshot(restored_model, restored_optimizer)["model"]["2.bias"], expected["model"]["2.bias"])


def test_a_loop_that_changes_state_only_in_step_keeps_overlapping(tmp_path: Any) -> None:
    model, optimizer = model_with_buffers()
    with CheckpointStore(str(tmp_path), keep=1) as store:
        for s in range(1, 4):
            pending = store.save({"model": model, "optimizer": optimizer}, step=s, rng=False, overlap_with=[optimizer])
            step(model, optimizer)  # BatchNorm's running stats change in the forward: not deferred, not a change
            pending.wait()
        assert store.overlap_refused is None


class Unhooked(torch.optim.Optimizer):
    """A wrapper that never calls Optimizer.__init__ (so torch never patches its step with hooks)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner

    @property
    def param_groups(self) -> Any:  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> Any:  # type: ignore[override]
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: Any) -> None:  # type: ignore[override]
        self.inner.load_state_dict(state_dict)


def test_an_optimizer_whose_step_runs_no_hooks_is_copied_before_save_returns(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model, inner = model_with_buffers()
    optimizer = Unhooked(inner)
    expected = snapshot(model, inner)
    with CheckpointStore(str(tmp_path)) as store:
        pending = store.save({"model": model, "optimizer": optimizer}, step=1, rng=False, overlap_with=[optimizer])
        step(model, optimizer)  # nothing holds this step back: the copy must already be whole
        pending.wait()
        assert "does not run step pre-hooks" in caplog.text and store.overlap_refused is None
        restored_model, restored_optimizer = model_with_buffers()
        store.load({"model": restored_model, "optimizer": restored_optimizer})
    got = snapshot(restored_model, restored_optimizer)
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, got["model"][name]), name


def test_the_guard_overlaps_by_default_and_a_loop_that_clips_weights_turns_it_off(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from gpuguard import Guard
    from gpuguard.fakenvml import FakeNvml

    model, optimizer = model_with_buffers()
    state = {"model": model, "optimizer": optimizer}
    url = f"file://{tmp_path}"
    settings: dict[str, Any] = {"checkpoint_every_steps": 2, "checkpoint_every_s": 0, "keep": 5}
    with Guard(checkpoint_dir=url, state=state, nvml=FakeNvml.replay(), devices="all", **settings) as guard:
        assert guard.config.overlap_snapshot is True  # the default
        for s in range(7):
            with torch.no_grad():  # weight clipping before the forward (WGAN-style): outside optimizer.step()
                for p in model.parameters():
                    p.clamp_(-0.5, 0.5)
            step(model, optimizer)
            guard.step(s)
            if s == 6:
                expected = snapshot(model, optimizer)
        assert guard.store is not None and guard.store.overlap_refused is not None
    assert "overlap_snapshot turned off for the rest of this run" in caplog.text
    with CheckpointStore(url) as store:
        latest = store.latest()
        assert latest is not None and latest.step == 6  # saves after the refusal copy before returning
        restored_model, restored_optimizer = model_with_buffers()
        store.load({"model": restored_model, "optimizer": restored_optimizer})
    got = snapshot(restored_model, restored_optimizer)
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
