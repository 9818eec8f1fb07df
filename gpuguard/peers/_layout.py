"""Which parts of the state are replicated across ranks, and which ranks hold the same tensors.

- Replicated entries: modules (parameters and buffers), optimizers and learning-rate schedulers. Under
  DDP and HSDP their values are the same on every replica, they change only in ``optimizer.step()``
  and ``scheduler.step()`` (buffers also in forward: see `BufferKeeper`), and the survivors save a
  dead rank's from their own copy.
- Per-rank entries: everything else (data loaders, progress dicts, generators, plain values) and the
  RNGs: each rank's own, mirrored every step (`gpuguard.peers._records`).

Replica groups: every rank under DDP with ``replicated=True``; the ranks at one coordinate of the
``Shard`` mesh dimensions for DTensors (HSDP's replicas of one shard); each rank alone otherwise.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import torch

from gpuguard.checkpoint._optim_names import parameter_names
from gpuguard.checkpoint._sharding import is_dtensor
from gpuguard.checkpoint._tree import FlatState, escape_key, flatten, is_replicated_entry

if TYPE_CHECKING:
    from gpuguard.peers._buffers import BufferKeeper


def split(view: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(replicated keys, per-rank keys) of the guard's view of the state, in its order."""
    replicated = [k for k, v in view.items() if is_replicated_entry(v)]
    return replicated, [k for k in view if k not in replicated]


def replicated_state(view: Mapping[str, Any], buffers: BufferKeeper | None) -> FlatState:
    """A survivor's replicated entries as at its last completed step, flattened as every rank flattens them.

    Wherever the lost peer interrupted it, the survivor's files must fit the other survivors': its FSDP2
    modules get their sharded parameters back (`reshard_interrupted`), its modules' buffers are the
    copies kept before the forward (`BufferKeeper`), and the optimizers' state is keyed by the live
    modules' parameter names — the stand-ins that carry the kept buffers have no parameters to name, and
    a survivor keying by position beside one keying by name would leave every tensor half covered.
    """
    replicated = {k: v for k, v in view.items() if is_replicated_entry(v)}
    reshard_interrupted(replicated)
    saving = buffers.as_at_last_step(replicated) if buffers is not None else replicated
    return flatten(saving, rng=False, names=parameter_names(replicated))


def plain_tensors(tensors: Mapping[str, Any], modules: Collection[str]) -> list[str]:
    """The modules' tensors that are not DTensors in a state that has DTensors (FSDP2's buffers, a module
    left unsharded), sorted; empty when there are no DTensors.

    Their replica groups are taken from the DTensors' meshes, as the ranks at one shard coordinate, but
    nothing keeps them equal across those ranks: a lost rank's are written from its writer's copy. (The
    optimizers' plain tensors, their step counts, are equal on every rank by construction.)
    """
    if not any(is_dtensor(t) for t in tensors.values()):
        return []
    prefixes = tuple(escape_key(key) + "/" for key in modules)
    return sorted(name for name, t in tensors.items() if name.startswith(prefixes) and not is_dtensor(t))


def replica_groups(tensors: Mapping[str, Any], world_size: int, replicated: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(label, ranks) of each group of ranks that hold the same tensors; the groups cover every rank once.

    Args:
        tensors: the flattened replicated entries (DTensors decide the groups when there are any).
        replicated: the guard's ``replicated`` setting (plain data parallelism).
    """
    layouts: dict[tuple[int, tuple[str, ...]], tuple[str, Any]] = {}
    for name, tensor in tensors.items():
        if is_dtensor(tensor):
            key = (id(tensor.device_mesh), tuple(repr(p) for p in tensor.placements))
            layouts.setdefault(key, (name, tensor))
    if not layouts:
        if replicated:
            return [("the replicated state (parameters, optimizer state)", tuple(range(world_size)))]
        per_rank = "(the state is per rank: set replicated=True for data-parallel replicas)"
        return [(f"rank {r}'s tensors {per_rank}", (r,)) for r in range(world_size)]
    keys: dict[int, list[Any]] = {r: [] for r in range(world_size)}
    words: dict[int, list[str]] = {r: [] for r in range(world_size)}
    for name, tensor in layouts.values():
        from torch.distributed.tensor import Shard

        mesh = tensor.device_mesh
        dims = mesh.mesh_dim_names or tuple(f"dim{d}" for d in range(mesh.ndim))
        sharded = [d for d, p in enumerate(tensor.placements) if isinstance(p, Shard)]
        ranks = mesh.mesh
        coordinate_of = {int(ranks[index].item()): index for index in _indices(tuple(ranks.shape))}
        for rank in range(world_size):
            where = coordinate_of.get(rank)
            keys[rank].append(None if where is None else tuple(where[d] for d in sharded))
            at = "outside the mesh" if where is None else ", ".join(f"{dims[d]}={where[d]}" for d in sharded)
            words[rank].append(f"{at} of {name!r} on mesh {tuple(dims)}")
    groups: dict[tuple[Any, ...], list[int]] = {}
    for rank in range(world_size):
        groups.setdefault(tuple(keys[rank]), []).append(rank)
    return [(f"the shard at {'; '.join(words[members[0]])}", tuple(members)) for members in groups.values()]


def _indices(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for size in shape:
        out = [(*prefix, i) for prefix in out for i in range(size)]
    return out


def reshard_interrupted(modules: Mapping[str, Any]) -> None:
    """Register the sharded parameters again on the FSDP2 modules a lost peer interrupted.

    FSDP2 registers a module's unsharded parameters from its forward until its backward is done (the
    root's until the whole backward is). A survivor whose collective was abandoned in between holds
    modules whose ``named_parameters()`` are those unsharded tensors, not the sharded ones its optimizer
    steps, so the optimizer's state could not be named by parameter (as every other rank names it) and
    the survivors' files would not fit together. ``FSDPModule.reshard()`` is not enough: it leaves a
    module interrupted inside its own forward that keeps its parameters for the backward (the root) as
    it is (torch 2.13, ``FSDPParamGroup.reshard``). FSDP2's pre-save hook is what registers every group's
    sharded parameters whatever the training state (``_register_state_dict_hooks``: ``_to_sharded``), so
    ``state_dict()`` is called on each module that holds FSDP2 modules, as any save of it would: no
    collective, no copy. The sharded parameters themselves change only in ``optimizer.step()``, which
    no survivor is inside.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2: nothing of it in the state either
        return
    for module in modules.values():
        if isinstance(module, torch.nn.Module) and any(isinstance(sub, FSDPModule) for sub in module.modules()):
            module.state_dict()
