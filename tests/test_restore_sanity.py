"""The sanity gate after a restore: a checkpoint holding NaN parameters or optimizer state is demoted, and
the job resumes from the next older verified one, saying so; never a silent start from step 0."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gpuguard import Guard
from gpuguard.errors import CheckpointCorruptError
from gpuguard.fakenvml import FakeNvml


def make_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    model.register_buffer("mask", torch.full((4,), float("-inf")))  # a buffer may hold -inf: not checked
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2)}


def train(url: str, state: dict[str, Any], steps: range, poison_at: int | None = None) -> dict[str, torch.Tensor]:
    """Train under a guard that checkpoints every 2 steps; at ``poison_at`` the weights turn NaN (a divergence)."""
    model, optimizer = state["model"], state["optimizer"]
    kept: dict[str, torch.Tensor] = {}
    settings: dict[str, Any] = {"checkpoint_every_steps": 2, "checkpoint_every_s": 0, "keep": 10}
    with Guard(checkpoint_dir=url, state=state, nvml=FakeNvml.replay(), devices="all", **settings) as guard:
        for step in steps:
            model(torch.randn(4, 8)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == poison_at:
                with torch.no_grad():
                    model[0].weight[0, 0] = float("nan")
            if step == 2:
                kept = {k: v.clone() for k, v in model.state_dict().items()}
            guard.step(step)
    return kept


def test_a_checkpoint_with_nan_parameters_is_demoted_and_the_older_one_resumes(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"file://{tmp_path}"
    good = train(url, make_state(), range(5), poison_at=3)  # step 2: good; step 4: NaN
    for _ in range(2):  # a second restart does the same, never loading the NaN one
        state = make_state()
        with Guard(checkpoint_dir=url, state=state, nvml=FakeNvml.replay(), devices="all") as guard:
            assert guard.resume() == 3
        for name, tensor in state["model"].state_dict().items():
            assert torch.equal(tensor, good[name]), name
        assert all(torch.isfinite(t).all() for s in state["optimizer"].state.values() for t in s.values())
    assert "(step 4) holds non-finite parameters or optimizer state after restore (rank(s) [0]" in caplog.text
    assert "model/0.weight" in caplog.text and "demoted" in caplog.text


def test_when_every_checkpoint_is_non_finite_resume_raises_instead_of_starting_over(tmp_path: Any) -> None:
    url = f"file://{tmp_path}"
    train(url, make_state(), range(5), poison_at=1)
    guard = Guard(checkpoint_dir=url, state=make_state(), nvml=FakeNvml.replay(), devices="all")
    with guard, pytest.raises(CheckpointCorruptError, match=r"every committed checkpoint .* was demoted"):
        guard.resume()
