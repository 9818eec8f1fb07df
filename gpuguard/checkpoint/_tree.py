"""Training state ↔ (tensors, JSON tree), with no pickling in either direction.

A state is a mapping of names to objects with ``state_dict()``/``load_state_dict()`` (modules,
optimizers, schedulers), tensors, and JSON-able values. Flattening walks it and replaces every tensor
with a reference to a named entry in the shard; everything else must be representable in JSON, with
markers for what JSON lacks (int keys, tuples, non-finite floats). Anything else is refused at save
time with the path to it, rather than pickled.
"""

from __future__ import annotations

import functools
import math
import random
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gpuguard.checkpoint._layout import DTYPE_CODES
from gpuguard.checkpoint._optim_names import by_name, is_by_name, parameter_names, to_positions
from gpuguard.errors import CheckpointCorruptError, CheckpointError, UnsupportedStateError

RNG_KEY = "__gpuguard_rng__"
_ALLOWED = "allowed: objects with state_dict()/load_state_dict(), tensors, numpy arrays, dicts, lists, tuples, "
_ALLOWED += "str, int, float, bool, None"


@dataclass
class FlatState:
    """A state taken apart: live tensors by name, the JSON tree that refers to them, their devices."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tree: dict[str, Any] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    # Tensors that are views of one storage, so that a load gives them one storage again: a list of
    # {"bytes": span, "views": {name: {"offset": bytes from the span's start, "stride": [...]}}}.
    storages: list[dict[str, Any]] = field(default_factory=list)
    # Top-level keys whose tensors are this rank's own even in a replicated save: every entry that is not a
    # module, optimizer or LR scheduler (a generator, a data loader, a plain tensor: `is_replicated_entry`)
    # and the RNGs. A replicated save splits only the other entries' tensors between the ranks.
    per_rank: frozenset[str] = frozenset({RNG_KEY})


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

# The entries that data-parallel replicas hold alike: their values are the same on every replica and change
# only in ``optimizer.step()`` and ``scheduler.step()`` (buffers also in forward). Everything else (a
# ``torch.Generator``, a data loader, a plain tensor or value) is each rank's own. One rule for the replicated
# save (`_owners.partition`) and the survivors' save (`gpuguard.peers._layout`).
_REPLICATED_TYPES: tuple[type, ...] = (
    torch.nn.Module,
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LRScheduler,
    torch.optim.lr_scheduler.ReduceLROnPlateau,
)


def is_replicated_entry(value: object) -> bool:
    """Whether a state entry is the same on every data-parallel replica (a module, optimizer or scheduler)."""
    return isinstance(value, _REPLICATED_TYPES)


@functools.lru_cache(maxsize=4096)  # the same keys recur in every save ("model", "state", "0", ...)
def escape_key(key: str) -> str:
    """A state key as it begins its tensors' names (``<key>/...``): "~" and "/" escaped."""
    return key.replace("~", "~0").replace("/", "~1")


class _Flattener:
    def __init__(self, names: Mapping[int, str] | None = None) -> None:
        self.flat = FlatState()
        self.aliases: dict[tuple[Any, ...], str] = {}
        self.plain: list[str] = []  # plain tensors under "$tensor": the ones whose storage sharing is kept
        self.names = names or {}  # parameter names, for top-level optimizers (see _optim_names)

    def tensor(self, value: torch.Tensor, path: list[str], marker: str = "$tensor") -> dict[str, str]:
        # This runs on the training thread for every tensor of every save: a few hundred per model, so
        # each property read counts (see benchmarks/checkpoint.py's stall).
        layout, device, dtype = value.layout, value.device, value.dtype
        if layout != torch.strided or value.is_quantized:  # sparse layouts are not strided
            raise UnsupportedStateError(f"{_where(path)}: {layout} tensors cannot be checkpointed; dense only")
        if device.type == "meta":
            raise UnsupportedStateError(f"{_where(path)}: a meta tensor holds no data to checkpoint; materialize it")
        if dtype not in DTYPE_CODES:
            allowed = ", ".join(sorted(str(d).removeprefix("torch.") for d in DTYPE_CODES))
            raise UnsupportedStateError(f"{_where(path)}: dtype {dtype} cannot be stored; allowed: {allowed}")
        if marker == "$tensor":
            # The same tensor under two names in a plain container (aliasing) comes back as one tensor.
            # A DTensor is a wrapper without storage of its own: its local shard's memory says what it aliases.
            # data_ptr() is the storage's address plus the view's offset: equal pointers, shapes, strides
            # and dtypes are one view of the same bytes.
            plain = type(value) in _PLAIN_TENSORS
            local = value if plain or not hasattr(value, "to_local") else value.to_local()
            key = (local.device, local.data_ptr(), tuple(value.shape), local.stride(), dtype)
            if key in self.aliases and value.numel():
                return {marker: self.aliases[key]}
        name = "/".join(escape_key(p) for p in path)
        if name in self.flat.tensors:
            raise UnsupportedStateError(f"{_where(path)}: two entries map to the tensor name {name!r}")
        if marker == "$tensor":
            self.aliases[key] = name
            if plain:
                self.plain.append(name)
        self.flat.tensors[name] = value.detach()
        if device.type != "cpu":
            self.flat.devices[name] = str(device)
        return {marker: name}

    def encode(self, value: Any, path: list[str]) -> Any:
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if hasattr(value, "state_dict") and hasattr(value, "load_state_dict") and not isinstance(value, type):
            inner = value.state_dict()
            if len(path) == 1 and isinstance(value, torch.optim.Optimizer):
                inner = by_name(value, inner, self.names)  # keyed by parameter name when all have one
            return {"$stateful": self.encode(inner, path)}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, Mapping):
            items = list(value.items())
            if all(isinstance(k, str) and not k.startswith("$") for k, _ in items):
                return {k: self.encode(v, [*path, k]) for k, v in items}
            for k, _ in items:
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise UnsupportedStateError(
                        f"{_where(path)}: key {k!r} of type {type(k).__name__}; "
                        "keys must be str, int, float, bool or None"
                    )
            return {"$dict": [[k, self.encode(v, [*path, str(k)])] for k, v in items]}
        if isinstance(value, (list, tuple)) and _plain_ints(value):
            # Python's RNG state is 625 ints: encoded at every step for the sudden-loss mirror (gpuguard.peers).
            return list(value) if isinstance(value, list) else {"$tuple": list(value)}
        if isinstance(value, list):
            return [self.encode(v, [*path, str(i)]) for i, v in enumerate(value)]
        if isinstance(value, torch.Size):
            return {"$size": list(value)}
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, [*path, str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            if isinstance(value, numpy.ndarray):
                return self.tensor(torch.from_numpy(value.copy()), path, marker="$ndarray")
            if isinstance(value, numpy.generic):
                return self.encode(value.item(), path)
        raise UnsupportedStateError(
            f"{_where(path)}: cannot checkpoint a {type(value).__name__} without pickling it; {_ALLOWED}"
        )


def _plain_ints(values: list[Any] | tuple[Any, ...]) -> bool:
    """Every item an int (not a bool, not a subclass): JSON holds them as they are."""
    return len(values) > 8 and all(type(v) is int for v in values)


def _where(path: list[str]) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


def capture_rng() -> dict[str, Any]:
    """Every RNG the training loop may draw from: torch (CPU and each CUDA device), Python, numpy."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        rng["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        rng["numpy"] = numpy.random.get_state()
    return rng


def restore_rng(rng: Mapping[str, Any]) -> None:
    # A copy of its own: torch's generators read the state from the start of its storage.
    torch.set_rng_state(rng["torch"].cpu().clone())
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu().clone() for s in states])
    numpy = sys.modules.get("numpy")
    if "numpy" in rng and numpy is not None:
        numpy.random.set_state(tuple(rng["numpy"]))


def flatten(
    state: Mapping[str, Any],
    *,
    rng: bool = True,
    rng_state: Mapping[str, Any] | None = None,
    names: Mapping[int, str] | None = None,
) -> FlatState:
    """Take a training state apart. Calls ``state_dict()``; copies no tensor data.

    ``rng_state``: RNG states captured earlier (`capture_rng`) to store instead of the current ones.
    ``names``: the parameters' names (`parameter_names`) when ``state`` holds stand-ins for its modules
    (a survivor's modules as at the last step): the optimizers' state is keyed by the real modules' names,
    as every other rank's save keys it.

    Raises:
        UnsupportedStateError: naming the path of the first value that cannot be stored.
    """
    if not isinstance(state, Mapping):
        raise UnsupportedStateError(f"state: a {type(state).__name__}; must be a mapping of names to objects")
    has_optimizer = any(isinstance(v, torch.optim.Optimizer) for v in state.values())
    if names is None and has_optimizer:
        names = parameter_names(state)
    flattener = _Flattener(names if has_optimizer else None)
    per_rank = {RNG_KEY}
    for key, value in state.items():
        if not isinstance(key, str) or key == RNG_KEY:
            raise UnsupportedStateError(f"state key {key!r}: must be a str other than {RNG_KEY!r}")
        flattener.flat.tree[key] = flattener.encode(value, [key])
        if not is_replicated_entry(value):
            per_rank.add(key)
    flattener.flat.per_rank = frozenset(per_rank)
    if rng:
        flattener.flat.tree[RNG_KEY] = flattener.encode(capture_rng() if rng_state is None else rng_state, [RNG_KEY])
    flattener.flat.storages = _shared_storages(flattener.flat.tensors, flattener.plain)
    return flattener.flat


def _shared_storages(tensors: Mapping[str, torch.Tensor], names: list[str]) -> list[dict[str, Any]]:
    """Groups of saved tensors that are views of one storage (each is saved as its own bytes; the group
    tells a load to put them back into one storage, so that writing one is seen through the others)."""
    by_storage: dict[tuple[torch.device, int], list[str]] = {}
    for name in names:
        t = tensors[name]
        if t.numel():
            base = int(t.data_ptr() - t.storage_offset() * t.element_size())
            by_storage.setdefault((t.device, base), []).append(name)
    groups = []
    for members in by_storage.values():
        if len(members) < 2:
            continue
        spans = {}
        for name in members:
            t = tensors[name]
            start = t.storage_offset() * t.element_size()
            extent = (sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()
            spans[name] = (start, start + extent)
        low = min(a for a, _ in spans.values()) // 16 * 16  # keeps every view's offset a multiple of its itemsize
        high = max(b for _, b in spans.values())
        views = {n: {"offset": spans[n][0] - low, "stride": list(tensors[n].stride())} for n in members}
        groups.append({"bytes": high - low, "views": views})
    return groups


def decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of encoding: tensors come from ``tensors`` (views over the shard's bytes)."""
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((marker, inner),) = value.items()
        if marker in ("$tensor", "$ndarray"):
            if inner not in tensors:
                raise CheckpointCorruptError(
                    f"the state refers to tensor {inner!r}, which the shard lacks", tensor=inner
                )
            t = tensors[inner]
            return t.numpy() if marker == "$ndarray" else t
        if marker == "$stateful":
            return decode(inner, tensors)
        if marker == "$float":
            return float(inner)
        if marker == "$tuple":
            return tuple(decode(v, tensors) for v in inner)
        if marker == "$dict":
            return {k: decode(v, tensors) for k, v in inner}
        if marker == "$dtype":
            return getattr(torch, inner)
        if marker == "$size":
            return torch.Size(inner)
    return {k: decode(v, tensors) for k, v in value.items()}


def restore(
    state: MutableMapping[str, Any],
    tree: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    devices: Mapping[str, str],
    *,
    strict: bool = True,
    storages: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Load a decoded checkpoint into live objects.

    Objects with ``load_state_dict`` receive theirs (they copy onto their own devices); live tensors
    are overwritten in place; other entries are replaced, with tensors moved back to the device they
    were saved from when it exists here, and views of one storage (``storages``) put back into one.
    ``tensors`` are the load's own (no other reference to their memory is kept): they are used as they
    are, not copied.

    Raises:
        CheckpointError: with ``strict``, when the live state has a key the checkpoint lacks.
    """
    missing = [k for k in state if k not in tree]
    if strict and missing:
        raise CheckpointError(f"the checkpoint has no entry for state key(s) {', '.join(map(repr, missing))}")
    # Decode everything first: a reference to a tensor the shard lacks fails before any write.
    decoded = {key: decode(encoded, tensors) for key, encoded in tree.items()}
    memo = _Owner(devices, storages)
    names: dict[int, str] | None = None
    for key, encoded in tree.items():
        if key == RNG_KEY:
            continue
        live = state.get(key)
        value = decoded[key]
        if (
            live is not None
            and hasattr(live, "load_state_dict")
            and isinstance(encoded, dict)
            and "$stateful" in encoded
        ):
            if isinstance(live, torch.optim.Optimizer) and is_by_name(value):
                value = to_positions(live, value, names if names is not None else (names := parameter_names(state)))
            live.load_state_dict(value)
        elif isinstance(live, torch.Tensor) and isinstance(value, torch.Tensor):
            if live.shape != value.shape:
                raise CheckpointError(f"state[{key!r}]: saved shape {tuple(value.shape)}, live {tuple(live.shape)}")
            with torch.no_grad():
                live.copy_(value)
        else:
            state[key] = memo.own(value, encoded)
    if RNG_KEY in tree:
        restore_rng(decoded[RNG_KEY])


class _Owner:
    """Puts restored values in place: tensors on their devices, aliases kept aliased (one tensor for the
    entries that referred to one when saved), views of one storage back in one storage."""

    def __init__(self, devices: Mapping[str, str], storages: Sequence[Mapping[str, Any]]) -> None:
        self.devices = devices
        self.memo: dict[str, torch.Tensor] = {}
        self.groups: dict[str, tuple[int, Mapping[str, Any]]] = {}
        for index, group in enumerate(storages):
            for name in group.get("views", {}):
                self.groups[name] = (index, group)
        self.built: dict[int, Any] = {}

    def own(self, value: Any, encoded: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = encoded.get("$tensor") if isinstance(encoded, dict) else None
            if name is not None and name in self.memo:
                return self.memo[name]
            device = self.devices.get(name or "", "cpu")
            if device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"
            owned = value.to(device)
            if name is not None and name in self.groups:
                owned = self._view(name, owned)
            if name is not None:
                self.memo[name] = owned
            return owned
        if isinstance(value, dict) and isinstance(encoded, dict):
            inner = encoded.get("$dict")
            if inner is not None:
                return {k: self.own(v, e) for (k, v), (_, e) in zip(value.items(), inner, strict=True)}
            return {k: self.own(v, encoded.get(k)) for k, v in value.items()}
        if isinstance(value, list) and isinstance(encoded, list):
            return [self.own(v, e) for v, e in zip(value, encoded, strict=True)]
        if isinstance(value, tuple) and isinstance(encoded, dict) and "$tuple" in encoded:
            return tuple(self.own(v, e) for v, e in zip(value, encoded["$tuple"], strict=True))
        return value

    def _view(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` copied into its place in the storage it shared when saved (built at its first view)."""
        index, group = self.groups[name]
        try:
            nbytes = int(group["bytes"])
            where = group["views"][name]
            offset, stride = int(where["offset"]), [int(s) for s in where["stride"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointCorruptError(f"the shared storage of tensor {name!r} is malformed", tensor=name) from None
        storage = self.built.get(index)
        if storage is None:
            storage = self.built[index] = torch.empty(nbytes, dtype=torch.uint8, device=value.device).untyped_storage()
        extent = (sum((n - 1) * s for n, s in zip(value.shape, stride, strict=False)) + 1) * value.element_size()
        if (
            len(stride) != value.dim()
            or min(stride, default=0) < 0
            or offset % value.element_size()
            or offset + extent > nbytes
            or storage.device != value.device
        ):
            raise CheckpointCorruptError(f"the shared storage of tensor {name!r} does not fit it", tensor=name)
        view = torch.empty(0, dtype=value.dtype, device=value.device)
        view.set_(storage, offset // value.element_size(), value.shape, stride)
        with torch.no_grad():
            view.copy_(value)
        return view
