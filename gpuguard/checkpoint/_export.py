"""Export: a checkpoint (plain, replicated or sharded) as a ``torch.save`` file, a safetensors file, or a
torch.distributed.checkpoint (DCP) folder, so that a team can always take its weights elsewhere.

Every tensor is read whole (a sharded tensor's chunks assembled into its global shape) and verified
against its checksums; the JSON tree is decoded into plain Python (dicts, lists, tuples, numbers,
strings, tensors). What each format holds is documented in docs/FORMAT.md ("Export").
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, Final, Literal

import torch

from gpuguard.checkpoint._catalog import Catalog
from gpuguard.checkpoint._loading import Loader
from gpuguard.checkpoint._optim_names import encoded_in_saved_order
from gpuguard.checkpoint._tree import RNG_KEY, decode, escape_key
from gpuguard.errors import CheckpointError, CheckpointNotFoundError, ConfigError

Format = Literal["torch", "safetensors", "dcp"]
FORMATS: Final = ("torch", "safetensors", "dcp")


def export(
    catalog: Catalog,
    loader: Loader,
    to: str,
    out: str,
    *,
    checkpoint_id: str | None = None,
    key: str | None = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Write checkpoint ``checkpoint_id`` (the newest committed one when None) to the local path ``out``.

    Args:
        to: ``torch`` (one file, ``torch.load(out, weights_only=True)`` reads it), ``safetensors`` (one
            file of tensors; the rest of the state as JSON in its metadata) or ``dcp`` (a folder that
            ``torch.distributed.checkpoint.load`` reads).
        key: export only ``state[key]`` (e.g. ``model``: the safetensors file is then the module's
            ``state_dict``, and ``model.load_state_dict(safetensors.torch.load_file(out))`` works).
        rank: whose per-rank state (RNG states, unsharded tensors of a per-rank checkpoint) to take.

    Returns:
        What was written: id, step, format, path, tensors, bytes.

    Raises:
        ConfigError: an unknown format, a ``key`` the checkpoint lacks, or a dtype the format cannot hold.
        CheckpointNotFoundError, CheckpointCorruptError, StorageError: as for a load.
    """
    if to not in FORMATS:
        raise ConfigError("to", to, "allowed: " + ", ".join(FORMATS))
    _check_out(to, out)
    if checkpoint_id is None:
        manifests = catalog.manifests()
        if not manifests:
            raise CheckpointNotFoundError(f"no committed checkpoint under {catalog.url}")
        manifest = manifests[-1]
    else:
        found = catalog.manifest(checkpoint_id)
        assert found is not None
        manifest = found
    if not 0 <= rank < manifest.world_size:
        raise ConfigError("rank", rank, f"from 0 to {manifest.world_size - 1}: {manifest.id} has that many ranks")
    doc, tensors = loader.read_whole(manifest, rank)
    # Optimizer state keyed by parameter name (see _optim_names) is exported in the saving optimizer's
    # own numbering, which torch's load_state_dict and DCP read.
    tree = dict(doc.tree)
    for name in list(tree):
        tree[name], tensors = encoded_in_saved_order(name, tree[name], tensors)
    state = {k: decode(v, tensors) for k, v in tree.items()}
    names = list(tensors)
    prefix = ""
    if key is not None:
        if key not in state:
            raise ConfigError("key", key, "one of " + ", ".join(repr(k) for k in state if k != RNG_KEY))
        state = state[key]
        prefix = escape_key(key) + "/"
        names = [n for n in names if n.startswith(prefix)]
    if to in ("torch", "safetensors"):
        # Written beside, then renamed: a crash or a full disk mid-export leaves no file that looks whole.
        partial = f"{out}.partial-{os.getpid()}"
        try:
            if to == "torch":
                torch.save(_loadable(state), partial)
            else:
                chosen = {n[len(prefix) :]: tensors[n] for n in names}
                _save_safetensors(chosen, tree, manifest.id, manifest.step, key, partial)
            os.replace(partial, out)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    else:
        _save_dcp(state if isinstance(state, dict) else {"value": state}, out)
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) if to == "dcp" else 0
    return {
        "id": manifest.id,
        "step": manifest.step,
        "format": to,
        "path": out,
        "tensors": len(names),
        "bytes": written or os.path.getsize(out),
    }


def _loadable(value: Any) -> Any:
    """What ``torch.load(weights_only=True)`` accepts: numpy arrays (the numpy RNG state) become tensors."""
    if isinstance(value, dict):
        return {k: _loadable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_loadable(v) for v in value]
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(_loadable(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        return torch.from_numpy(value.copy())
    return value


def _save_safetensors(
    tensors: Mapping[str, torch.Tensor], tree: Mapping[str, Any], checkpoint: str, step: int, key: str | None, out: str
) -> None:
    from safetensors.torch import save_file

    from gpuguard.checkpoint._layout import DTYPE_CODES

    standard = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "F8_E4M3", "F8_E5M2"}
    standard |= {"F8_E8M0", "U16", "U32", "U64"}
    for name, tensor in tensors.items():
        if DTYPE_CODES[tensor.dtype] not in standard:
            raise ConfigError(
                "to", "safetensors", f"tensor {name!r} is {tensor.dtype}, which safetensors has no code for; use torch"
            )
    metadata = {
        "format": "pt",
        "gpuguard_checkpoint": checkpoint,
        "gpuguard_step": str(step),
        "gpuguard_tree": json.dumps(tree if key is None else tree[key]),
    }
    save_file({n: t.contiguous() for n, t in tensors.items()}, out, metadata=metadata)


def _check_out(to: str, out: str) -> None:
    """Refuse an output path that cannot be written before a byte of the checkpoint is read.

    Otherwise torch, safetensors or DCP fail only after the whole checkpoint was read and verified, with a
    traceback of their own that names no option (and the CLI's exit code then said "corruption").
    """
    path = os.path.abspath(out)
    if to == "dcp":
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError("out", out, "an empty or new folder for the DCP checkpoint; this is a file")
        if os.path.isdir(path) and os.listdir(path):
            raise ConfigError("out", out, "an empty or new folder for the DCP checkpoint; this one holds files")
        above = os.path.dirname(path)
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise ConfigError("out", out, f"an empty or new folder for the DCP checkpoint; {above} is a file")
        return
    if os.path.isdir(path):
        raise ConfigError("out", out, f"a file to write the {to} export to; this is a folder")
    if os.path.exists(path):  # as the DCP export refuses a folder with files: nothing is overwritten unasked
        raise ConfigError("out", out, f"a new file for the {to} export; it exists (remove it to export again)")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ConfigError("out", out, f"a file in an existing folder; {folder} is not a folder")


def _save_dcp(state: dict[str, Any], out: str) -> None:
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    if os.path.exists(out) and os.listdir(out):
        raise ConfigError("out", out, "an empty or new folder for the DCP checkpoint")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: as intended
        try:
            dcp_save(state, checkpoint_id=out, no_dist=True)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"DCP could not write the state: {exc}") from exc
