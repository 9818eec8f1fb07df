"""Overlapping the snapshot with the next forward and backward: only the optimizer step waits."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from gpuguard import CheckpointStore
from gpuguard.checkpoint._staging import StagingBuffer


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
