"""A rank's own copy of its state as one process's checkpoint: the local tier's format (see `_tiered`).

Plain state is saved as it is. A DTensor (FSDP2, tensor parallelism) is saved as this rank's piece, a plain
tensor (``to_local()``), and the manifest's ``extra["local_dtensors"]`` records how the piece was cut: the
global shape, the mesh's shape, this rank's coordinate in it and the placements. A load puts each piece
back as a DTensor of the live layout, and only when the live layout is that one exactly: the copy is for a
restart of the same job on the same mesh (a container restarted in place). Any other layout is a mismatch,
and the restore takes the same checkpoint from object storage, which reshards.

No collective anywhere: a rank reads and writes only its own copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

from gpuguard.checkpoint._loading import Completion, Loader, PreparedLoad, _live_tensors
from gpuguard.checkpoint._manifest import Manifest
from gpuguard.checkpoint._pending import PendingSave
from gpuguard.checkpoint._reshard import _optimizer_param
from gpuguard.checkpoint._sharding import is_dtensor
from gpuguard.checkpoint._tree import FlatState
from gpuguard.checkpoint.store import CheckpointStore
from gpuguard.errors import CheckpointCorruptError, CheckpointMismatchError

EXTRA_KEY = "local_dtensors"


def layout_of(tensor: Any) -> dict[str, Any]:
    """How a DTensor is cut: what a rank's piece of it means."""
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    return {
        "shape": [int(d) for d in tensor.shape],
        "mesh": [int(d) for d in mesh.shape],
        "coordinate": None if coordinate is None else [int(c) for c in coordinate],
        "placements": [str(p) for p in tensor.placements],
    }


def as_local(flat: FlatState) -> dict[str, dict[str, Any]]:
    """Replace each DTensor of ``flat`` by this rank's piece (in place); returns their layouts by name."""
    layouts = {}
    for name, tensor in list(flat.tensors.items()):
        if is_dtensor(tensor):
            layouts[name] = layout_of(tensor)
            flat.tensors[name] = tensor.to_local()  # type: ignore[attr-defined]
    return layouts


def prepare_copy(store: CheckpointStore, state: Mapping[str, Any]) -> None:
    """Plan (and allocate in the background) the staging buffer of `save_copy`: no collective."""
    store._saver.prepare(state, background=True, rank=0, world_size=1, as_local=True)


def save_copy(
    store: CheckpointStore,
    state: FlatState,
    step: int,
    checkpoint_id: str,
    overlap_with: Sequence[torch.optim.Optimizer],
    extra: Mapping[str, Any] | None = None,
    *,
    lend: bool = False,
    started: float | None = None,
) -> PendingSave:
    """Snapshot this rank's whole part of ``state`` (taken apart by `flatten`, with its RNG states; left as
    it is) into ``store`` as one process's checkpoint; no collective. ``extra`` goes into its manifest beside
    the DTensor layouts (the guard's loss window). With ``lend``, the snapshot is lent (`Saver.save_flat`)."""
    flat = dataclasses.replace(state, tensors=dict(state.tensors))
    layouts = as_local(flat)
    return store._saver.save_flat(
        flat,
        step,
        reason="periodic",
        rank=0,
        world_size=1,
        checkpoint_id=checkpoint_id,
        extra={**(extra or {}), **({EXTRA_KEY: layouts} if layouts else {})},
        # A piece of a DTensor is a view the optimizer does not own by identity: copied now, not overlapped.
        overlap_with=() if layouts else overlap_with,
        lend=lend,
        started=started,
    )


def prepare_copy_load(loader: Loader, manifest: Manifest, state: MutableMapping[str, Any]) -> PreparedLoad:
    """Read and verify this rank's copy against ``state``; nothing applied yet.

    Raises:
        CheckpointCorruptError: a file or tensor fails its checksum.
        CheckpointMismatchError: the copy does not fit ``state`` (another DTensor layout, other shapes).
    """
    layouts: dict[str, dict[str, Any]] = dict(manifest.extra.get(EXTRA_KEY) or {})
    live = _live_tensors(state)
    if not layouts and not any(is_dtensor(t) for t in live.values()):
        return loader.prepare_one(manifest, state, 0, True, 1)
    from torch.distributed.tensor import DTensor

    doc, tensors = loader.read_whole(manifest, 0)  # every byte verified, into host memory
    for name, saved in layouts.items():
        stored = tensors.get(name)
        if stored is None:
            raise CheckpointCorruptError(f"{manifest.id}: tensor {name!r} is described but not stored", tensor=name)
        target: Any = live.get(name)
        if target is None:
            target = _optimizer_param(name, state)  # a fresh optimizer's state is cut like its parameter
        now = layout_of(target) if target is not None and is_dtensor(target) else None
        if now != saved or tuple(target.to_local().shape) != tuple(stored.shape):
            raise CheckpointMismatchError(
                f"{manifest.id}: tensor {name!r} was saved as this rank's piece of a DTensor laid out as {saved}; "
                f"the live state has {now or 'no DTensor there'}",
                entries=[name],
            )
        piece = stored.to(target.to_local().device)
        if stored.dtype != target.dtype:
            raise CheckpointMismatchError(
                f"{manifest.id}: tensor {name!r} saved as {stored.dtype}, live {target.dtype}", entries=[name]
            )
        tensors[name] = DTensor.from_local(
            piece, target.device_mesh, target.placements, run_check=False, shape=target.shape, stride=target.stride()
        )
    plain = sorted(n for n, t in live.items() if is_dtensor(t) and n in tensors and n not in layouts)
    if plain:
        raise CheckpointMismatchError(
            f"{manifest.id}: {', '.join(plain[:3])} saved as plain tensors; the live state holds DTensors there",
            entries=plain,
        )
    loader._check_fit(manifest, state, doc, tensors, True)
    return PreparedLoad(doc, tensors, True, Completion())
