"""A small but real training state: model, AdamW, LR scheduler, RNGs, extras."""

from __future__ import annotations

from typing import Any

import torch


def make_state(seed: int = 0, steps: int = 3, width: int = 32) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10_000)
    for _ in range(steps):
        train_step(model, optimizer, scheduler)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "extras": {"epoch": 2, "tokens_seen": 123_456_789_012, "best_loss": 0.125, "tags": ["a", "b"], 7: (1.5, None)},
    }


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    x = torch.randn(8, model[0].in_features)
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def fresh_like(seed: int = 99, width: int = 32) -> dict[str, Any]:
    """A differently initialised state of the same shape, to load into."""
    return make_state(seed=seed, steps=1, width=width) | {"extras": None}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bitwise equality of everything a checkpoint must bring back."""
    for (ka, ta), (kb, tb) in zip(a["model"].state_dict().items(), b["model"].state_dict().items(), strict=True):
        assert ka == kb and torch.equal(ta, tb), ka
    oa, ob = a["optimizer"].state_dict(), b["optimizer"].state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)
    assert a["scheduler"].state_dict() == b["scheduler"].state_dict()
    assert a["extras"] == b["extras"]
