"""Optimizer state keyed by parameter name, not by position, as DCP's ``get_state_dict`` keys it.

``Optimizer.state_dict()`` numbers parameters by their position across ``param_groups``. A job that
builds its groups in another order (weight decay first, or last) would map a saved moment onto the
wrong parameter on load: silently, where shapes agree. So when every parameter of a top-level
optimizer in the state belongs to a module in the same state, the checkpoint keys its per-parameter
state and its groups' ``params`` by the parameter's name, ``<state key>.<name in the module>`` (the
first name ``named_parameters()`` gives a tied parameter), and a load maps them back through the live
optimizer's own groups, in whatever order they are. This mirrors
``torch.distributed.checkpoint.state_dict.get_state_dict``/``set_state_dict``, which key optimizer
state by fully qualified name. An optimizer with a parameter outside every module of the state keeps
torch's positional form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def parameter_names(state: Mapping[str, Any]) -> dict[int, str]:
    """``id(parameter)`` → ``"<state key>.<name>"`` for the parameters of the top-level modules in ``state``."""
    names: dict[int, str] = {}
    for key, value in state.items():
        if isinstance(value, torch.nn.Module):
            for name, param in value.named_parameters():
                names.setdefault(id(param), f"{key}.{name}")
    return names


def _named_params(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> list[str] | None:
    """The names of the optimizer's parameters in its own order, or None if one has none (or two share one)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or any(id(p) not in names for p in params):
        return None
    found = [names[id(p)] for p in params]
    return found if len(set(found)) == len(found) else None


def by_name(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], names: Mapping[int, str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (``saved``) keyed by parameter name; unchanged when names do not cover it."""
    fqns = _named_params(optimizer, names)
    if fqns is None or not isinstance(saved.get("state"), Mapping) or not isinstance(saved.get("param_groups"), list):
        return dict(saved)
    out = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    out["state"] = {fqns[int(index)]: value for index, value in saved["state"].items()}
    out["param_groups"] = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [fqns[int(i)] for i in group["params"]]}
        for group in saved["param_groups"]
    ]
    return out


def is_by_name(saved: Any) -> bool:
    """Whether a saved optimizer state keys its groups' parameters by name (strings), not by position."""
    if not isinstance(saved, Mapping):
        return False
    groups = saved.get("param_groups")
    return (
        isinstance(groups, list)
        and any(isinstance(g, Mapping) and g.get("params") for g in groups)
        and all(isinstance(p, str) for g in groups if isinstance(g, Mapping) for p in g.get("params", []))
    )


def misfits(optimizer: torch.optim.Optimizer, groups: list[Any], names: Mapping[int, str], where: str) -> list[str]:
    """How the saved groups (``param_groups`` keyed by name) do not fit the live optimizer's; empty when they do."""
    fqns = _named_params(optimizer, names)
    if fqns is None:
        return [
            f"{where}: the checkpoint keys the optimizer's state by parameter name, and the live optimizer has a "
            "parameter outside every module of the state (or two with one name): put its module in the state"
        ]
    saved_group: dict[str, int] = {}
    for index, group in enumerate(groups):
        for name in group.get("params", []) if isinstance(group, Mapping) else []:
            saved_group[str(name)] = index
    problems = []
    missing = [n for n in fqns if n not in saved_group]
    if missing:
        problems.append(f"{where}: the checkpoint has no parameter group for {', '.join(map(repr, missing))}")
    extra = sorted(set(saved_group) - set(fqns))
    if extra:
        lacks = ", ".join(map(repr, extra))
        problems.append(f"{where}: the checkpoint has parameters the live optimizer lacks: {lacks}")
    for group in optimizer.param_groups:
        live = [names[id(p)] for p in group["params"]]
        homes = {saved_group[n] for n in live if n in saved_group}
        if len(homes) > 1:
            problems.append(f"{where}: the live group of {live[0]!r} holds parameters of {len(homes)} saved groups")
        elif homes:
            saved = {n for n, g in saved_group.items() if g == next(iter(homes))}
            if saved != set(live):
                problems.append(
                    f"{where}: the group of {live[0]!r} holds {sorted(saved)} in the checkpoint, {sorted(live)} live"
                )
    return problems


def to_positions(
    optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], names: Mapping[int, str]
) -> dict[str, Any]:
    """A by-name saved state in the live optimizer's own numbering and group order, for its ``load_state_dict``.

    The groups must fit (`misfits` is empty): each live group takes the hyperparameters of the saved
    group that holds its parameters.
    """
    fqns = _named_params(optimizer, names)
    assert fqns is not None, "checked by misfits before anything is loaded"
    position = {name: i for i, name in enumerate(fqns)}
    home = {str(name): group for group in saved["param_groups"] for name in group["params"]}
    spare = iter([g for g in saved["param_groups"] if not g["params"]])  # empty groups keep their order
    groups = []
    for group in optimizer.param_groups:
        live = [names[id(p)] for p in group["params"]]
        source = home[live[0]] if live else next(spare)
        groups.append({**{k: v for k, v in source.items() if k != "params"}, "params": [position[n] for n in live]})
    out = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    out["state"] = {position[str(name)]: value for name, value in saved["state"].items()}
    out["param_groups"] = groups
    return out


def encoded_in_saved_order(
    key: str, encoded: Any, tensors: Mapping[str, torch.Tensor]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """An encoded optimizer entry keyed by name (``{"$stateful": {"state": {name: ...}, "param_groups":
    [...]}}`` as stored) numbered as the saving optimizer's own ``state_dict()`` numbered it: each name
    takes its position in the order the saved groups list them, and its tensors are renamed to match
    (``<key>/state/<name>/exp_avg`` → ``<key>/state/<position>/exp_avg``). For an export that torch's own
    ``load_state_dict`` and DCP read back; other entries, and ``tensors`` beside them, come back as they are.
    """
    inner = encoded.get("$stateful") if isinstance(encoded, dict) and len(encoded) == 1 else None
    if not isinstance(inner, dict) or not isinstance(inner.get("state"), dict) or "$dict" in inner["state"]:
        return encoded, dict(tensors)
    groups = inner.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        return encoded, dict(tensors)
    order = [p for g in groups for p in g["params"]]
    if not order or not all(isinstance(p, str) for p in order):
        return encoded, dict(tensors)
    position = {name: i for i, name in enumerate(order)}
    prefix = key.replace("~", "~0").replace("/", "~1") + "/state/"
    renamed: dict[str, str] = {}

    def rename(value: Any) -> Any:
        if isinstance(value, list):
            return [rename(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1 and "$tensor" in value and isinstance(value["$tensor"], str):
            name = value["$tensor"]
            return {"$tensor": renamed.get(name, name)}
        return {k: rename(v) for k, v in value.items()}

    for name in inner["state"]:
        escaped = prefix + str(name).replace("~", "~0").replace("/", "~1") + "/"
        for tensor in tensors:
            if tensor.startswith(escaped):
                renamed[tensor] = f"{prefix}{position[name]}/{tensor[len(escaped) :]}"
    state = {"$dict": [[position[name], rename(value)] for name, value in inner["state"].items()]}
    param_groups = [{**g, "params": [position[p] for p in g["params"]]} for g in groups]
    out = {**inner, "state": state, "param_groups": param_groups}
    return {"$stateful": out}, {renamed.get(n, n): t for n, t in tensors.items()}
