"""Which GPUs belong to this job, in every environment a job runs in.

NVML numbers GPUs its own way and ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers the GPUs it is allowed
to see, in its own order. Only the UUID names the same GPU in both. The job's GPUs are found, in this
order (the first that applies wins), and said once when the monitor starts:

1. CUDA's own device UUIDs, when the program has already initialised CUDA through torch (gpuguard
   never initialises CUDA itself: a process that forks data loader workers later must not have it);
2. ``CUDA_VISIBLE_DEVICES`` holding UUIDs (``GPU-...``, ``MIG-...``, or a unique prefix of one);
3. ``CUDA_VISIBLE_DEVICES`` holding indices, mapped the way CUDA maps them (below);
4. ``NVIDIA_VISIBLE_DEVICES`` (set by the NVIDIA container runtime and the Kubernetes device plugin);
5. none of these: every GPU this process can see, which is the whole node on a bare machine (said
   as a warning, never silently).

``LOCAL_RANK`` (torchrun, one process per GPU) then picks this process's GPU as an index *into the
visible list* above, never into NVML's numbering: with ``CUDA_VISIBLE_DEVICES=4,5`` and
``LOCAL_RANK=1`` the process watches GPU 5.

How CUDA orders indices. ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` numbers GPUs by PCI bus id, ascending;
gpuguard sorts NVML's GPUs by their PCI bus id and reads the indices against that. The default,
``FASTEST_FIRST``, ranks GPUs by a speed heuristic CUDA does not publish; GPUs of the same model tie
on it and keep PCI bus order. So gpuguard reproduces the default order only on a node whose GPUs are
all one model (every training node we know of), and says so; on a node with mixed models it cannot,
and watches every GPU with an error asking for ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.

Parsing follows CUDA's rules, as PyTorch mirrors them (``torch.cuda._parse_visible_devices``): the list
stops at the first entry that is not valid (a negative index, a non-number among indices, an entry
without the prefix among UUIDs), an index past the last GPU ends it too, a repeated entry makes the
list empty, and an empty ``CUDA_VISIBLE_DEVICES`` hides every GPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Kind = Literal["uuid", "cuda_index", "runtime_index", "all", "none"]
Level = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML shows it, for mapping CUDA's view onto NVML's (`JobScope.resolve`)."""

    index: int
    uuid: str
    pci_bus_id: str
    name: str


@dataclass(frozen=True)
class Resolved:
    """The job's GPUs as NVML targets (NVML indices or UUIDs; None: every GPU), and how they were found."""

    targets: list[int | str] | None
    description: str
    level: Level = "info"


@dataclass(frozen=True)
class JobScope:
    """Where this job's GPUs are said, read from the environment once; `resolve` maps them onto NVML.

    Attributes:
        kind: what ``entries`` hold: UUIDs, CUDA indices, indices from the container runtime, every
            GPU, or no GPU at all.
        entries: the visible list, in the process's own order.
        source: the variable (or CUDA) it came from, as it was set, for the log.
        order: ``CUDA_DEVICE_ORDER`` (``FASTEST_FIRST`` when unset).
        local_rank: ``LOCAL_RANK``, when set; picks one GPU of the visible list.
        local_world_size: ``LOCAL_WORLD_SIZE``, when set: processes on this node.
    """

    kind: Kind
    entries: tuple[int | str, ...] = ()
    source: str = ""
    order: str = "FASTEST_FIRST"
    local_rank: int | None = None
    local_world_size: int | None = None

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str] | None = None, cuda_uuids: Sequence[str] | None = None
    ) -> JobScope:
        """The scope this process's environment gives; ``cuda_uuids`` from `cuda_device_uuids` by default."""
        env = os.environ if env is None else env
        uuids = cuda_device_uuids() if cuda_uuids is None else list(cuda_uuids)
        rank = _whole(env.get("LOCAL_RANK"))
        world = _whole(env.get("LOCAL_WORLD_SIZE"))
        order = (env.get("CUDA_DEVICE_ORDER") or "FASTEST_FIRST").strip().upper()
        kind: Kind = "all"
        entries: tuple[int | str, ...] = ()
        source = ""
        visible, runtime = env.get("CUDA_VISIBLE_DEVICES"), env.get("NVIDIA_VISIBLE_DEVICES")
        if uuids:
            kind, entries, source = "uuid", tuple(uuids), "CUDA's devices (torch.cuda)"
        elif visible is not None:
            kind, entries = parse_cuda_visible(visible)
            source = f"CUDA_VISIBLE_DEVICES={visible}"
        elif runtime is not None:
            kind, entries = parse_runtime_visible(runtime)
            source = f"NVIDIA_VISIBLE_DEVICES={runtime}"
        return cls(kind, entries, source, order, rank, world)

    @property
    def needs_inventory(self) -> bool:
        """Whether `resolve` needs NVML's list of GPUs (not for full UUIDs alone)."""
        if self.kind in ("cuda_index", "runtime_index"):
            return True
        if self.kind == "all":
            return self.local_rank is not None
        if self.kind == "uuid":
            return any(not _full_uuid(str(e)) for e in self.entries)
        return False

    def resolve(self, inventory: Sequence[GpuInfo] | None) -> Resolved:
        """The NVML targets for this scope, given NVML's GPUs (those this process may open).

        Args:
            inventory: every GPU NVML lets this process open, with its PCI bus id and name; needed
                when `needs_inventory` (indices, UUID prefixes, LOCAL_RANK over every GPU).
        """
        gpus = list(inventory or [])
        if self.kind == "none":
            return Resolved([], f"{self.source} gives this process no GPU", "warning")
        if self.kind == "uuid":
            return self._pick([_match_uuid(str(e), gpus) for e in self.entries], self.source)
        if self.kind == "runtime_index":
            return self._runtime_indices(gpus)
        if self.kind == "all" and self.local_rank is None:
            if self.source:  # NVIDIA_VISIBLE_DEVICES=all: the container runtime decided which GPUs NVML shows
                return Resolved(None, f"every GPU this container has ({self.source})")
            return Resolved(
                None,
                "every GPU this process can see: no CUDA device list, CUDA_VISIBLE_DEVICES, "
                "NVIDIA_VISIBLE_DEVICES or LOCAL_RANK says which are this job's",
                "warning",
            )
        in_cuda_order, said, level = self._cuda_order(gpus)
        if in_cuda_order is None:
            what = f"{self.source}: {said}" if self.source else said
            return Resolved(None, f"every GPU on this node: {what}", "error")
        if self.kind == "all":
            return self._pick(in_cuda_order, f"every GPU in CUDA's order ({said})", level)
        visible: list[int | str] = []
        for entry in self.entries:
            index = int(entry)
            if index >= len(in_cuda_order):  # CUDA ends the list at an index past its last GPU
                break
            visible.append(in_cuda_order[index])
        return self._pick(visible, f"{self.source}, CUDA indices {said}", level)

    def _cuda_order(self, gpus: list[GpuInfo]) -> tuple[list[int | str] | None, str, Level]:
        """NVML's GPUs in CUDA's order, by UUID (by NVML index where NVML cannot read the UUID); None when
        that order cannot be known here."""
        if all(g.pci_bus_id for g in gpus):
            ordered = sorted(gpus, key=lambda g: (g.pci_bus_id.lower(), g.index))
        else:  # a GPU whose PCI bus id cannot be read: NVML's own enumeration is in PCI bus order
            ordered = sorted(gpus, key=lambda g: g.index)
        uuids: list[int | str] = [g.uuid or g.index for g in ordered]
        if self.order == "PCI_BUS_ID":
            return uuids, "in PCI bus order (CUDA_DEVICE_ORDER=PCI_BUS_ID)", "info"
        models = sorted({g.name for g in gpus if g.name})
        if len(models) <= 1:
            model = models[0] if models else "no GPU"
            said = (
                f"in PCI bus order: CUDA's default FASTEST_FIRST order is PCI bus order when every GPU is the "
                f"same model ({len(gpus)} x {model}); set CUDA_DEVICE_ORDER=PCI_BUS_ID to make it exact"
            )
            return uuids, said, "info"
        said = (
            f"CUDA's default FASTEST_FIRST order cannot be reproduced on a node with mixed GPU models "
            f"({', '.join(models)}): set CUDA_DEVICE_ORDER=PCI_BUS_ID so that indices name GPUs in PCI bus order"
        )
        return None, said, "error"

    def _runtime_indices(self, gpus: list[GpuInfo]) -> Resolved:
        """``NVIDIA_VISIBLE_DEVICES`` indices are the host's NVML indices. Inside the container the
        runtime mounts only those GPUs, so NVML shows exactly them (renumbered from 0); NVML showing
        more means it sees the host's GPUs, whose indices these are."""
        if len(gpus) <= len(self.entries):
            return self._pick(
                [g.uuid or g.index for g in sorted(gpus, key=lambda g: g.index)],
                f"{self.source}: the GPUs the NVIDIA container runtime gave this container",
            )
        by_index: dict[int, int | str] = {g.index: g.uuid or g.index for g in gpus}
        visible: list[int | str] = [by_index[int(e)] for e in self.entries if int(e) in by_index]
        return self._pick(visible, f"{self.source}, host indices (NVML sees the host's {len(gpus)} GPUs)")

    def _pick(self, visible: list[int | str], source: str, level: Level = "info") -> Resolved:
        """LOCAL_RANK as an index into the visible list, when it names one process per GPU."""
        targets = list(visible)
        rank, world = self.local_rank, self.local_world_size
        if not targets:
            return Resolved(targets, f"no GPU: {source}", "warning")
        if rank is None or len(targets) <= 1:
            return Resolved(targets, source, level)
        if world is not None and world < len(targets):
            # fewer processes than GPUs on this node: each process may use several; watch them all
            return Resolved(targets, f"{source} (LOCAL_WORLD_SIZE={world} < {len(targets)} GPUs: all of them)", level)
        if rank >= len(targets):
            return Resolved(
                targets,
                f"{source}: LOCAL_RANK={rank} is past the {len(targets)} visible GPUs, so all of them",
                "warning",
            )
        return Resolved([targets[rank]], f"LOCAL_RANK={rank} of {source}", level)


def parse_cuda_visible(value: str) -> tuple[Kind, tuple[int | str, ...]]:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it (PyTorch's ``_parse_visible_devices`` mirrors it)."""
    text = value.strip()
    if not text:
        return "none", ()
    items = [item.strip() for item in text.split(",")]
    for prefix in ("GPU-", "MIG-"):
        if text.startswith(prefix):
            uuids: list[int | str] = []
            for item in items:
                if not item.startswith(prefix):  # the list stops at the first entry of another kind
                    break
                if item in uuids:  # a repeated entry makes the list empty
                    return "none", ()
                uuids.append(item)
            return "uuid", tuple(uuids)
    indices: list[int | str] = []
    for item in items:
        number = _strtoul(item)
        if number < 0:  # "-1" or a non-number ends the list
            break
        if number in indices:
            return "none", ()
        indices.append(number)
    return ("cuda_index", tuple(indices)) if indices else ("none", ())


def parse_runtime_visible(value: str) -> tuple[Kind, tuple[int | str, ...]]:
    """``NVIDIA_VISIBLE_DEVICES``: ``all``; ``none``/``void``/empty (no GPU); indices; UUIDs.

    nvidia-container-toolkit's forms; ``GPU:MIG`` index pairs name a MIG device by indices and are
    watched through their parent GPU's index.
    """
    text = value.strip().lower()
    if text == "all":
        return "all", ()
    if text in ("", "none", "void"):
        return "none", ()
    items = [item.strip() for item in value.split(",") if item.strip()]
    if all(item.upper().startswith(("GPU-", "MIG-")) for item in items):
        return "uuid", tuple(items)
    indices: list[int | str] = []
    for item in items:
        head = item.split(":", 1)[0]
        if not head.isdigit():
            return "all", ()
        if int(head) not in indices:
            indices.append(int(head))
    return "runtime_index", tuple(indices)


def cuda_device_uuids() -> list[str] | None:
    """UUIDs of the CUDA devices this process sees, when the program has initialised CUDA; else None.

    Only asks torch when the program has already imported it and initialised CUDA: gpuguard never
    initialises CUDA itself. torch gives the UUID without its prefix (``19a36126-...``), for a MIG
    device too; the NVML source tries ``GPU-`` and then ``MIG-``.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    except Exception:  # an old torch without .uuid, or a broken CUDA setup: the environment tells instead
        return None


def _strtoul(item: str) -> int:
    """The number an entry starts with, as C's strtoul reads it (``1gpu`` is 1); -1 for none or negative."""
    digits = ""
    for i, c in enumerate(item):
        if c.isdigit() or (i == 0 and c in "+-"):
            digits += c
        else:
            break
    try:
        return int(digits)
    except ValueError:
        return -1


def _whole(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def _full_uuid(entry: str) -> bool:
    bare = entry.split("-", 1)[1] if entry.upper().startswith(("GPU-", "MIG-")) else entry
    return len(bare) == 36


def _match_uuid(entry: str, gpus: list[GpuInfo]) -> str:
    """A full UUID as it is (the NVML source opens it); a prefix as the one GPU it starts (CUDA accepts a
    unique prefix); an ambiguous or unknown prefix as it is, so that it shows as a GPU not found."""
    if _full_uuid(entry) or not gpus:
        return entry
    found = [g.uuid for g in gpus if g.uuid and g.uuid.startswith(entry)]
    return found[0] if len(found) == 1 else entry


def job_scope() -> JobScope:
    """This process's `JobScope`, from its environment and CUDA."""
    return JobScope.from_environment()
