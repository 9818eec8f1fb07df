"""Resuming a Trainer from gpuguard's store: the ranks agree on a checkpoint, read it without unpickling,
and lay out the two files Trainer's own resume reads to find its place in the loop.

Trainer positions a resumed loop (the epoch to start in, the batches of that epoch to skip, the
callbacks' states) only from ``train(resume_from_checkpoint=<folder>)``: it reads the folder's
``trainer_state.json`` and requires model weights there (``Trainer._load_from_checkpoint``,
transformers 5.24). So the resume folder holds exactly those two files, in Trainer's public formats:
``trainer_state.json`` (JSON) and ``model.safetensors``. Optimizer, scheduler, gradient scaler and
random number generators are not written there: `GpuGuardCallback` puts them back itself from memory
(Trainer skips what the folder lacks), so nothing is pickled and the largest part of the state is read
once, from gpuguard's store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gpuguard.checkpoint._crc import crc32c
from gpuguard.checkpoint._optim_names import is_by_name, misfits, parameter_names, to_positions
from gpuguard.checkpoint._tree import capture_rng, restore_rng
from gpuguard.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from gpuguard.integrations.transformers._internals import MODEL_FILE, TRAINER_STATE_FILE

if TYPE_CHECKING:
    from gpuguard.checkpoint import CheckpointInfo, CheckpointStore

log = logging.getLogger("gpuguard")

ENTRIES = ("model", "optimizer", "lr_scheduler", "trainer")  # the guard's state entries (and "scaler")


@dataclass
class SavedRun:
    """A gpuguard checkpoint of a Trainer run, read into memory on this rank."""

    info: CheckpointInfo
    entries: dict[str, Any]  # model/optimizer/lr_scheduler/scaler state dicts, "trainer": TrainerProgress's
    rng: dict[str, Any]  # the saving rank's generator states, applied where the resumed loop needs them

    @property
    def trainer_state(self) -> dict[str, Any]:
        progress = self.entries.get("trainer")
        if not isinstance(progress, dict) or not isinstance(progress.get("trainer_state"), dict):
            raise CheckpointError(f"{self.info.url} holds no Trainer state (no 'trainer' entry): not a Trainer run's")
        state: dict[str, Any] = progress["trainer_state"]
        return state


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a small JSON-able value; one collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank when ``ok`` is True on every rank (one collective; also a barrier)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


def read_saved_run(store: CheckpointStore) -> SavedRun | None:
    """The newest checkpoint every rank could read, read on every rank (checksums checked, nothing
    unpickled); None on every rank when none is committed. Every rank calls it.

    `CheckpointStore.load` is the agreement: each rank reads and checks its own part, and the ranks
    load the newest checkpoint every rank could read, falling back together past one some rank
    cannot (corrupt, missing shard); when none is readable, or the storage fails, every rank raises.
    This process's random number generators are left as they were.
    """
    rank, _ = rank_and_world()
    entries: dict[str, Any] = {}
    ours = capture_rng()
    try:
        store.load(entries, rank=rank, fallback=True, strict=False)  # restores the saved RNG states as it loads...
        saved = capture_rng()
    except CheckpointNotFoundError:  # no rank lists any checkpoint: every rank starts from step 0
        return None
    finally:
        restore_rng(ours)  # ...which the callback applies later, where the resumed loop draws
    info = store.last_loaded
    assert info is not None, "set by the load that just returned"
    run = SavedRun(info, entries, saved)
    # The same checkpoint on every rank, so every rank raises here alike, before any file is written.
    _ = run.trainer_state
    if not isinstance(entries.get("model"), dict):
        raise CheckpointError(f"{info.url} holds no model entry: not a Trainer run's checkpoint")
    return run


def optimizer_state(optimizer: Any, model: torch.nn.Module, saved: dict[str, Any], url: str) -> dict[str, Any]:
    """The saved optimizer state in ``optimizer``'s own numbering, for its ``load_state_dict``.

    gpuguard's store keys an optimizer's state by parameter name (``model.<name>``: the model is the
    guard's ``"model"`` entry), so a run that builds its parameter groups in another order still gets
    each moment back on its own parameter; the groups must hold the same parameters as when saved.
    """
    if not is_by_name(saved):
        return saved
    names = parameter_names({"model": model})
    problems = misfits(optimizer, saved["param_groups"], names, "optimizer")
    if problems:
        raise CheckpointMismatchError(
            f"{url}: the optimizer's state does not fit this run's optimizer: {'; '.join(problems)}", entries=problems
        )
    return to_positions(optimizer, saved, names)


def resume_folder(checkpoint_dir: str, checkpoint_id: str) -> Path:
    """Where the resume files go: node-local, named after the run and checkpoint (all local ranks agree)."""
    # The host's name too: should nodes share a temporary folder, each still writes its own copy.
    run = f"{socket.gethostname()}-{crc32c(checkpoint_dir.encode()):08x}"
    return Path(tempfile.gettempdir()) / "gpuguard-resume" / run / checkpoint_id


def lay_out(folder: Path, run: SavedRun) -> None:
    """Write ``trainer_state.json`` and ``model.safetensors`` into ``folder`` (replacing a stale one).

    Written beside the folder and renamed into place, so a reader never sees half a folder.
    """
    from safetensors.torch import save_file

    weights = _weights(run)
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        text = json.dumps(run.trainer_state, indent=2, sort_keys=True) + "\n"
        (building / TRAINER_STATE_FILE).write_text(text, encoding="utf-8")
        save_file(weights, str(building / MODEL_FILE), metadata={"format": "pt"})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(building, folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _weights(run: SavedRun) -> dict[str, torch.Tensor]:
    """The model's tensors on the CPU, each with storage of its own (safetensors refuses shared
    storage; tied weights such as GPT-2's ``lm_head``/``wte`` come back as one tensor)."""
    weights: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in run.entries["model"].items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{run.info.url}: model entry {name!r} is a {type(value).__name__}, not a tensor; "
                "Trainer's resume reads model weights from safetensors"
            )
        tensor = value.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        weights[name] = tensor
    return weights


__all__ = [
    "ENTRIES",
    "SavedRun",
    "all_ranks_ok",
    "broadcast_from_zero",
    "lay_out",
    "optimizer_state",
    "rank_and_world",
    "read_saved_run",
    "resume_folder",
]
