"""Who owns which tensor: the optimizers whose step changes it, the rank that writes it."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from gpuguard.checkpoint._tree import RNG_KEY, escape_key


def owned_by(optimizers: Sequence[torch.optim.Optimizer], tensors: dict[str, torch.Tensor]) -> set[str]:
    """Names of the tensors that only these optimizers' ``step()`` changes: parameters and their state."""
    owned: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            owned.update(p.data_ptr() for p in group["params"])
        for per_param in optimizer.state.values():
            owned.update(v.data_ptr() for v in per_param.values() if isinstance(v, torch.Tensor))
    return {name for name, t in tensors.items() if t.numel() and t.data_ptr() in owned}


def partition(
    tensors: dict[str, torch.Tensor], rank: int, world_size: int, per_rank: Collection[str] = (RNG_KEY,)
) -> dict[str, torch.Tensor]:
    """This rank's share of a replicated state: largest tensors first, each to the least loaded rank.

    Deterministic from names and sizes alone, so every rank computes the same split. The tensors of the
    ``per_rank`` top-level keys (`FlatState.per_rank`: the RNGs, generators, data loaders, plain tensors)
    differ between ranks, so each rank keeps its own: split between the ranks, one rank's copy would be
    loaded into every rank.
    """
    own = {escape_key(key) for key in per_rank}
    loads = [0] * world_size
    mine = {}
    for name in sorted(tensors, key=lambda n: (-tensors[n].numel() * tensors[n].element_size(), n)):
        if name.split("/", 1)[0] in own:
            owner = rank
        else:
            owner = min(range(world_size), key=lambda r: (loads[r], r))
            loads[owner] += tensors[name].numel() * tensors[name].element_size()
        if owner == rank:
            mine[name] = tensors[name]
    return mine
