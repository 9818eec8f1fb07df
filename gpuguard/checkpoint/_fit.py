"""Does a checkpoint fit the live state? Checked in full before a load writes anything.

``torch.nn.Module.load_state_dict`` copies matching tensors before it raises on a missing key or a
shape, and a load that restores the model and then fails on the optimizer leaves a half-loaded
state. So a load first compares every entry with the live objects (names, shapes, dtypes, types)
and writes nothing unless all of them fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gpuguard.checkpoint._optim_names import by_name, is_by_name, parameter_names
from gpuguard.checkpoint._optim_names import misfits as optimizer_misfits
from gpuguard.checkpoint._tree import RNG_KEY


def misfits(
    state: Mapping[str, Any], tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, strict: bool
) -> list[str]:
    """Every way the checkpoint (``tree`` over ``tensors``) does not fit ``state``; empty when it does."""
    problems: list[str] = []
    names: dict[int, str] | None = None
    if strict:
        problems += [f"state[{k!r}]: the checkpoint has no entry for it" for k in state if k not in tree]
    for key, encoded in tree.items():
        if key == RNG_KEY or state.get(key) is None:
            continue
        live = state[key]
        where = f"state[{key!r}]"
        stateful = _is(encoded, "$stateful")
        if hasattr(live, "load_state_dict") and not isinstance(live, type):
            if not stateful:
                problems.append(
                    f"{where}: the live {type(live).__name__} loads a state dict; the checkpoint holds {_kind(encoded)}"
                )
                continue
            saved = encoded["$stateful"]
            live_state = live.state_dict()
            if isinstance(live, torch.optim.Optimizer) and is_by_name(_plain_groups(saved)):
                # Keyed by parameter name: groups are matched by the names they hold, in any order.
                names = parameter_names(state) if names is None else names
                problems += optimizer_misfits(live, _plain_groups(saved)["param_groups"], names, where)
                live_state = {"state": by_name(live, live_state, names)["state"]}
                saved = {"state": saved.get("state", {})} if isinstance(saved, dict) else saved
            _compare(live_state, saved, tensors, where, isinstance(live, torch.nn.Module), problems)
        elif isinstance(live, torch.Tensor):
            _compare(live, encoded, tensors, where, True, problems)
    return problems


def _plain_groups(encoded: Any) -> dict[str, Any]:
    """An encoded optimizer state's ``param_groups`` as plain lists of parameter names (markers dropped)."""
    if not isinstance(encoded, dict) or not isinstance(encoded.get("param_groups"), list):
        return {}
    groups = []
    for group in encoded["param_groups"]:
        params = group.get("params") if isinstance(group, dict) else None
        groups.append({"params": params if isinstance(params, list) else []})
    return {"param_groups": groups}


def _compare(
    live: Any, encoded: Any, tensors: Mapping[str, torch.Tensor], where: str, exact_keys: bool, problems: list[str]
) -> None:
    if isinstance(live, torch.Tensor):
        if not _is(encoded, "$tensor"):
            problems.append(f"{where}: live is a tensor; the checkpoint holds {_kind(encoded)}")
            return
        saved = tensors.get(encoded["$tensor"])
        if saved is None:
            return  # reported as corrupt when decoded
        if tuple(saved.shape) != tuple(live.shape):
            problems.append(f"{where}: shape {tuple(saved.shape)} in the checkpoint, {tuple(live.shape)} live")
        elif saved.dtype != live.dtype:
            problems.append(f"{where}: dtype {saved.dtype} in the checkpoint, {live.dtype} live")
        return
    if _is(encoded, "$tensor"):
        problems.append(f"{where}: live is {type(live).__name__}; the checkpoint holds a tensor")
        return
    if isinstance(live, Mapping):
        saved_items = _mapping(encoded)
        if saved_items is None:
            problems.append(f"{where}: live is a mapping; the checkpoint holds {_kind(encoded)}")
            return
        if exact_keys:
            missing = [k for k in live if k not in saved_items]
            extra = [k for k in saved_items if k not in live]
            if missing:
                problems.append(f"{where}: the checkpoint lacks {', '.join(map(repr, missing))}")
            if extra:
                problems.append(
                    f"{where}: the checkpoint has entries the live state lacks: {', '.join(map(repr, extra))}"
                )
        for k, v in live.items():
            if k in saved_items:
                _compare(v, saved_items[k], tensors, f"{where}[{k!r}]", exact_keys, problems)
        return
    if isinstance(live, (list, tuple)):
        saved_list = encoded["$tuple"] if _is(encoded, "$tuple") else encoded
        if not isinstance(saved_list, list):
            problems.append(f"{where}: live is a {type(live).__name__}; the checkpoint holds {_kind(encoded)}")
            return
        if len(saved_list) != len(live):
            problems.append(f"{where}: {len(saved_list)} items in the checkpoint, {len(live)} live")
            return
        for i, (v, e) in enumerate(zip(live, saved_list, strict=True)):
            _compare(v, e, tensors, f"{where}[{i}]", exact_keys, problems)


def _is(encoded: Any, marker: str) -> bool:
    return isinstance(encoded, dict) and len(encoded) == 1 and marker in encoded


def _mapping(encoded: Any) -> dict[Any, Any] | None:
    if _is(encoded, "$dict"):
        return {k if not isinstance(k, list) else tuple(k): v for k, v in encoded["$dict"]}
    if isinstance(encoded, dict) and not any(str(k).startswith("$") for k in encoded):
        return dict(encoded)
    if isinstance(encoded, dict) and not encoded:
        return {}
    return None


def _kind(encoded: Any) -> str:
    if _is(encoded, "$tensor") or _is(encoded, "$ndarray"):
        return "a tensor"
    if _is(encoded, "$stateful"):
        return "a state dict"
    if isinstance(encoded, dict):
        return "a mapping"
    if isinstance(encoded, list):
        return "a list"
    return f"a {type(encoded).__name__}"
