"""Optimizer state is found by parameter name, not by position, as DCP's get_state_dict/set_state_dict do.

A job that lists its parameter groups in another order (no-decay first) must get each moment back on
its own parameter; with positions it would get another parameter's (silently, where shapes agree).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gpuguard import CheckpointMismatchError, CheckpointStore


class Tied(torch.nn.Module):
    """Tied embeddings and layers of one shape: positions would swap moments without a shape error."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.tanh(self.a(self.emb(x)))))


def build(order: str, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Tied()
    named = dict(model.named_parameters())
    decay = [named[n] for n in ("emb.weight", "a.weight", "b.weight")]
    rest = [named[n] for n in ("a.bias", "b.bias")]
    groups = {
        "decay-first": [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        "rest-first": [{"params": rest, "weight_decay": 0.0}, {"params": decay[::-1], "weight_decay": 0.1}],
    }[order]
    return {"model": model, "optimizer": torch.optim.AdamW(groups, lr=0.01)}


def train(state: dict[str, Any], steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 10, (4, 5), generator=generator)
        state["model"](tokens).logsumexp(-1).mean().backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad()


def moments(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in state["model"].named_parameters()}
    optimizer = state["optimizer"]
    return {
        f"{names[id(p)]}.{key}": value.clone()
        for group in optimizer.param_groups
        for p in group["params"]
        for key, value in optimizer.state[p].items()
    }


def test_groups_listed_in_another_order_get_their_own_moments_back(tmp_path: Path) -> None:
    saved = build("decay-first")
    train(saved, 3)
    with CheckpointStore(str(tmp_path)) as store:
        store.save(saved, 3).wait()
        loaded = build("rest-first", seed=5)
        assert store.load(loaded) == 3
    expected, got = moments(saved), moments(loaded)
    assert sorted(expected) == sorted(got) and all(torch.equal(expected[k], got[k]) for k in expected)
    # each live group kept its own hyperparameters and members
    assert [g["weight_decay"] for g in loaded["optimizer"].param_groups] == [0.0, 0.1]
    # and training goes on exactly as the saved job's would
    train(saved, 2, seed=9)
    train(loaded, 2, seed=9)
    for (name, a), (_, b) in zip(saved["model"].named_parameters(), loaded["model"].named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # the checkpoint names parameters, once each (the tied head is the embedding)
    tree = json.loads(next(tmp_path.glob("step-*/rank-00000-of-00001.json")).read_text())["tree"]
    groups = tree["optimizer"]["$stateful"]["param_groups"]
    assert sorted(n for g in groups for n in g["params"]) == sorted(
        ["model.emb.weight", "model.a.weight", "model.b.weight", "model.a.bias", "model.b.bias"]
    )


def test_groups_that_split_parameters_differently_are_refused_before_anything_changes(tmp_path: Path) -> None:
    saved = build("decay-first")
    train(saved, 2)
    torch.manual_seed(3)
    other = Tied()
    optimizer = torch.optim.AdamW(other.parameters(), lr=0.01)  # one group holding everything
    with CheckpointStore(str(tmp_path)) as store:
        store.save(saved, 2).wait()
        before = [p.detach().clone() for p in other.parameters()]
        with pytest.raises(
            CheckpointMismatchError, match=r"live group of 'model\.emb\.weight' holds parameters of 2 saved"
        ):
            store.load({"model": other, "optimizer": optimizer})
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))


def test_an_optimizer_without_its_module_in_the_state_keeps_positions(tmp_path: Path) -> None:
    saved = build("decay-first")
    train(saved, 2)
    with CheckpointStore(str(tmp_path)) as store:
        store.save({"optimizer": saved["optimizer"]}, 2).wait()
        loaded = build("decay-first", seed=4)
        store.load({"optimizer": loaded["optimizer"]})
    tree = json.loads(next(tmp_path.glob("step-*/rank-00000-of-00001.json")).read_text())["tree"]
    assert tree["optimizer"]["$stateful"]["param_groups"][0]["params"] == [0, 1, 2]
    assert all(torch.equal(a, b) for a, b in zip(moments(saved).values(), moments(loaded).values(), strict=True))
