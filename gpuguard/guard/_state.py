"""What the guard hands the checkpoint store: the user's state, with a few kinds made checkpointable.

- ``torch.Generator`` has ``get_state``/``set_state``, not ``state_dict``: wrapped.
- A plain dict is restored *in place*, so references the training loop holds stay live (the store
  alone would replace the value under its key).
- Data loaders and samplers with ``state_dict``/``load_state_dict`` (``torchdata``'s
  ``StatefulDataLoader``) need nothing: the store saves their position like any stateful object.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from gpuguard.checkpoint._tree import flatten


class GeneratorState:
    """A ``torch.Generator`` as a stateful object."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["state"].clone())


class InPlaceDict:
    """A plain dict of the user's, saved like any value and restored into the same dict object."""

    def __init__(self, target: MutableMapping[Any, Any]) -> None:
        self.target = target

    def state_dict(self) -> dict[Any, Any]:
        return {k: _wrap(v) for k, v in self.target.items()}

    def load_state_dict(self, state: Mapping[Any, Any]) -> None:
        restore_in_place(self.target, state)


def _wrap(value: Any) -> Any:
    if isinstance(value, torch.Generator):
        return GeneratorState(value)
    if isinstance(value, dict):
        return {k: _wrap(v) for k, v in value.items()}
    return value


def restore_in_place(target: MutableMapping[Any, Any], saved: Mapping[Any, Any]) -> None:
    """Make ``target`` equal ``saved`` while keeping the objects it holds where they can take it."""
    for key in [k for k in target if k not in saved]:
        del target[key]
    for key, value in saved.items():
        live = target.get(key)
        if isinstance(live, torch.Generator) and isinstance(value, Mapping):
            live.set_state(value["state"].clone())
        elif isinstance(live, dict) and isinstance(value, Mapping):
            restore_in_place(live, value)
        elif (
            live is not None
            and hasattr(live, "load_state_dict")
            and isinstance(value, Mapping)
            and not isinstance(live, type)
        ):
            live.load_state_dict(value)
        elif isinstance(live, torch.Tensor) and isinstance(value, torch.Tensor) and live.shape == value.shape:
            with torch.no_grad():
                live.copy_(value)
        else:
            target[key] = _owned(value)


def _owned(value: Any) -> Any:
    """Restored values must not alias the shard's read buffer."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_owned(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_owned(v) for v in value)
    return value


def checkpointable(state: Mapping[str, Any]) -> dict[str, Any]:
    """The view of ``state`` the store saves and loads (built fresh each time: cheap, top level only)."""
    view: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Generator):
            view[key] = GeneratorState(value)
        elif type(value) is dict:
            view[key] = InPlaceDict(value)
        else:
            view[key] = value
    return view


def write_back(state: MutableMapping[str, Any], view: Mapping[str, Any], loaded: Mapping[str, Any]) -> None:
    """After a load into ``view``: values the store replaced go back to the user's mapping.

    A checkpoint written before dicts were wrapped holds a plain dict, which the store puts in the
    view in place of the wrapper: that one is restored into the user's dict too.
    """
    for key, value in loaded.items():
        before = view.get(key)
        if value is before:
            continue
        if isinstance(before, InPlaceDict) and isinstance(value, Mapping):
            restore_in_place(before.target, value)
        elif isinstance(before, GeneratorState) and isinstance(value, Mapping) and "state" in value:
            before.generator.set_state(value["state"].clone())
        else:
            state[key] = value


def check_state(state: Mapping[str, Any]) -> None:
    """A dry flatten: walks ``state`` (calls ``state_dict()``, copies no tensor data).

    Raises:
        UnsupportedStateError: naming the path of the first value a checkpoint could not hold.
    """
    flatten(checkpointable(state), rng=False)
