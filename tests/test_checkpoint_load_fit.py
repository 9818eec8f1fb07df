"""A load is transactional: a checkpoint that does not fit the live state changes none of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from gpuguard import CheckpointMismatchError, CheckpointStore


def _model(out: int = 4, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, out)).to(dtype)


def _trained(model: torch.nn.Module, groups: int = 1) -> dict[str, Any]:
    params = list(model.parameters())
    if groups == 1:
        optimizer = torch.optim.AdamW(params, lr=1e-2)
    else:
        optimizer = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 1e-3}], lr=1e-2)
    model(torch.randn(2, 4, dtype=next(model.parameters()).dtype)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def _fingerprint(state: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every tensor and value of the live state, copied, to compare bitwise later."""
    out: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            out.append((prefix, value.detach().clone()))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        else:
            out.append((prefix, value))

    for key, obj in state.items():
        walk(key, obj.state_dict() if hasattr(obj, "state_dict") else obj)
        out.append((f"{key}#type", type(obj)))
    return out


def _same(a: list[tuple[str, Any]], b: list[tuple[str, Any]]) -> bool:
    if [k for k, _ in a] != [k for k, _ in b]:
        return False
    for (_, x), (_, y) in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


CASES: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[], dict[str, Any]], str]] = {
    "shape": (
        lambda: _trained(_model()),
        lambda: _trained(_model(out=5)),
        r"shape \(4, 8\) in the checkpoint, \(5, 8\)",
    ),
    "dtype": (
        lambda: _trained(_model()),
        lambda: _trained(_model(dtype=torch.float64)),
        r"dtype torch.float32 in the checkpoint, torch.float64 live",
    ),
    "optimizer after a fitting model": (
        lambda: _trained(_model()),
        lambda: _trained(_model(), groups=2),
        # optimizer state is matched by parameter name: the groups differ in which parameters they hold
        r"state\['optimizer'\]: the group of 'model.0.weight' holds \['model.0.bias', 'model.0.weight', "
        r"'model.2.bias', 'model.2.weight'\] in the checkpoint, \['model.0.bias', 'model.0.weight'\] live",
    ),
    "missing module keys": (
        lambda: {"model": torch.nn.Sequential(torch.nn.Linear(4, 8))},
        lambda: {"model": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8))},
        r"the checkpoint lacks '1.weight', '1.bias'",
    ),
    "a tensor where a module lives": (
        lambda: {"model": torch.ones(3)},
        lambda: {"model": _model()},
        r"state\['model'\]: the live Sequential loads a state dict; the checkpoint holds a tensor",
    ),
    "a plain tensor's shape": (
        lambda: {"model": _model(), "ema": torch.ones(3)},
        lambda: {"model": _model(), "ema": torch.zeros(4)},
        r"state\['ema'\]: shape \(3,\) in the checkpoint, \(4,\) live",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_mismatch_leaves_the_live_state_bitwise_unchanged(case: str) -> None:
    saved, live, message = CASES[case]
    with CheckpointStore("memory://fit-" + case.replace(" ", "-")) as store:
        store.save(saved(), step=3).wait()
        target = live()
        objects = {k: id(v) for k, v in target.items()}
        before = _fingerprint(target)
        rng_before = torch.get_rng_state()
        torch.manual_seed(1234)  # the checkpoint's RNG state must not be restored either
        rng_moved = torch.get_rng_state()
        with pytest.raises(CheckpointMismatchError, match=message) as caught:
            store.load(target)
        assert caught.value.entries
        assert {k: id(v) for k, v in target.items()} == objects  # nothing rebound
        assert _same(before, _fingerprint(target))  # nothing written
        assert torch.equal(torch.get_rng_state(), rng_moved)
        del rng_before


def test_a_fitting_load_still_restores_everything() -> None:
    with CheckpointStore("memory://fit-ok") as store:
        source = _trained(_model())
        store.save(source, step=3).wait()
        target = _trained(_model())
        assert store.load(target) == 3
        assert _same(_fingerprint(source), _fingerprint(target))


def test_a_per_rank_checkpoint_is_refused_on_another_world_size() -> None:
    name = "step-000000000009-00c0ffee"
    with CheckpointStore("memory://fit-world") as store:
        first = store.save({"w": torch.full((4,), 0.0)}, step=9, rank=0, world_size=2, checkpoint_id=name)
        store.save({"w": torch.full((4,), 1.0)}, step=9, rank=1, world_size=2, checkpoint_id=name).wait(30)
        assert first.wait(30) is not None
        target = {"w": torch.full((4,), 7.0)}
        with pytest.raises(CheckpointMismatchError, match=r"per-rank state of 2 rank\(s\); this job has 1"):
            store.load(target)  # one process, no process group: a world of 1
        assert torch.equal(target["w"], torch.full((4,), 7.0))
        assert store.load(target, world_size=2) == 9 and torch.equal(target["w"], torch.zeros(4))
