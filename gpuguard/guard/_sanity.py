"""The sanity gate after a restore: a checkpoint whose parameters or optimizer state hold NaN or inf is
demoted, and every rank loads the next older verified one instead.

A checksum proves the bytes are the ones written, not that they are worth training from: a step that
diverged writes NaNs with perfect checksums, and a job that restores them fails again, restarts, and
restores them again (Megatron-LM #5281 looped 44 times on one such local checkpoint). So after a load
every rank checks its parameters and optimizer state, the ranks agree (one small gather), and a
checkpoint that fails on any rank is left out of every later choice in this resume: never a loop on it.
Buffers are not checked: some legitimately hold -inf (attention masks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gpuguard.checkpoint._collective import RankGroup


def non_finite(state: Mapping[str, Any]) -> list[str]:
    """Paths of the parameters and optimizer state tensors in ``state`` (this rank's part) holding NaN or inf."""
    found = []
    for key, value in state.items():
        if isinstance(value, torch.nn.Module):
            found += [f"{key}/{name}" for name, p in value.named_parameters() if not _finite(p)]
        elif isinstance(value, torch.optim.Optimizer):
            names = {id(p): name for name, p in _named_params(state)}
            for param, per_param in value.state.items():
                label = names.get(id(param), "?")
                found += [
                    f"{key}/{label}/{k}" for k, t in per_param.items() if isinstance(t, torch.Tensor) and not _finite(t)
                ]
    return found


def ranks_failing(group: RankGroup, failing: bool) -> list[int]:
    """Every rank's answer, on every rank: the ranks whose check failed."""
    return [rank for rank, row in enumerate(group.all_gather_ints([int(failing)])) if row[0]]


def _named_params(state: Mapping[str, Any]) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for v in state.values() if isinstance(v, torch.nn.Module) for name, p in v.named_parameters()]


def _finite(tensor: torch.Tensor) -> bool:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor: this rank's shard
    if not (local.is_floating_point() or local.is_complex()) or local.numel() == 0:
        return True
    return bool(torch.isfinite(local.detach()).all())
