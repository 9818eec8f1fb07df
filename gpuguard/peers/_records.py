"""Each rank's small per-rank state at every completed step, kept here and mirrored on the side channel.

Data-parallel replicas hold the same parameters and optimizer state, so a dead rank's copy of those
lives on. What is its own is small: its random number generators and the entries of the state that
are not modules, optimizers or schedulers (a data loader's position, a progress dict). At every
``guard.step`` that part is captured and written to the side channel before ``step`` returns, so the
state of every step a rank completed is readable by the others after its death. The two newest steps
are kept: a survivor may be one step ahead of another.

A rank may also die inside its optimizer step, after its gradients were exchanged: its peers then
complete that step, and its record of the step never comes. So as each optimizer step begins, a
*provisional* record of the step is taken and mirrored too (``pre/<rank>``). It is the step's final
state unless the loop changes per-rank state after ``optimizer.step()``; whether it does is seen on
every survivor, which compares its own provisional record with its final one (`same_state`).

This runs on the training thread every step, so a record is compact: the entries as the checkpoint's
JSON tree encodes them (small), and the RNG states raw — Python's 625-word Mersenne Twister and numpy's
as packed integers, not 625 JSON numbers. The format is this module's own: an 8-byte little-endian
header length, a JSON header naming each blob's dtype, shape and place, then the blobs. Nothing is
unpickled; dtypes come from the checkpoint format's own table.
"""

from __future__ import annotations

import array
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from gpuguard.checkpoint._layout import DTYPE_CODES, DTYPES_BY_CODE
from gpuguard.checkpoint._tree import FlatState, capture_rng, escape_key, flatten
from gpuguard.errors import CheckpointCorruptError, SideChannelError
from gpuguard.peers._channel import SideChannel

log = logging.getLogger("gpuguard.peers")

KEEP: Final = 2  # steps kept per rank: survivors are at most one step apart
FORMAT: Final = "gpuguard-step-record-1"


@dataclass(frozen=True)
class StepRecord:
    """One rank's per-rank state after one completed step: its entries (JSON tree and the tensors it names)
    and its RNG states as `capture_rng` returns them."""

    rank: int
    step: int
    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)

    def checkpoint_part(self) -> FlatState:
        """The entries and RNGs as a checkpoint of this rank holds them (tree, tensors, devices)."""
        part = flatten({}, rng=True, rng_state=self.rng)
        part.tree = {**self.tree, **part.tree}
        part.tensors = {**self.tensors, **part.tensors}
        part.devices = {**self.devices, **part.devices}
        return part

    def to_bytes(self, cache: dict[str, Any] | None = None) -> bytes:
        """The record's bytes. ``cache`` (one per writer) keeps the packed RNG words of the last record: most
        loops draw nothing from Python's or numpy's generator, and repacking 625 unchanged words each step
        would cost more than comparing them."""
        cache = {} if cache is None else cache
        blobs: list[tuple[str, str, list[int], bytes]] = []
        for name, tensor in self.tensors.items():
            blobs.append((f"t/{name}", DTYPE_CODES[tensor.dtype], list(tensor.shape), _raw(tensor)))
        rng = self.rng
        blobs.append(("rng/torch", "U8", list(rng["torch"].shape), _raw(rng["torch"])))
        for i, state in enumerate(rng.get("cuda", [])):
            blobs.append((f"rng/cuda/{i}", "U8", list(state.shape), _raw(state)))
        version, internal, gauss = rng["python"]
        if cache.get("python", (None,))[0] != internal:
            cache["python"] = (internal, array.array("q", internal).tobytes())
        blobs.append(("rng/python", "I64", [len(internal)], cache["python"][1]))
        numpy_meta = None
        if "numpy" in rng:
            name, key, pos, has_gauss, cached = rng["numpy"]
            last = cache.get("numpy")
            if last is None or last[0].shape != key.shape or not (last[0] == key).all():
                cache["numpy"] = (key, key.astype("<u4").tobytes())
            blobs.append(("rng/numpy", "U32", [len(key)], cache["numpy"][1]))
            numpy_meta = [str(name), int(pos), int(has_gauss), float(cached)]
        places, offset = [], 0
        for blob_name, code, shape, data in blobs:
            places.append([blob_name, code, shape, offset, len(data)])
            offset += len(data)
        header = {
            "format": FORMAT,
            "rank": self.rank,
            "step": self.step,
            "tree": self.tree,
            "devices": self.devices,
            "python": [version, gauss],
            "numpy": numpy_meta,
            "blobs": places,
        }
        encoded = json.dumps(header, separators=(",", ":")).encode()
        return b"".join([len(encoded).to_bytes(8, "little"), encoded, *(data for *_, data in blobs)])

    @classmethod
    def from_bytes(cls, data: bytes) -> StepRecord:
        """Parse a record. Raises `CheckpointCorruptError` on anything malformed."""
        try:
            size = int.from_bytes(data[:8], "little")
            header = json.loads(bytes(data[8 : 8 + size]))
            if header["format"] != FORMAT:
                raise ValueError(f"format {header['format']!r}")
            base = 8 + size
            blobs: dict[str, torch.Tensor] = {}
            for name, code, shape, offset, nbytes in header["blobs"]:
                start = base + int(offset)
                if start + int(nbytes) > len(data):
                    raise ValueError(f"blob {name!r} runs past the end")
                flat = torch.frombuffer(bytearray(data[start : start + int(nbytes)]), dtype=DTYPES_BY_CODE[code])
                blobs[str(name)] = flat.reshape([int(d) for d in shape])
            rng: dict[str, Any] = {"torch": blobs["rng/torch"]}
            cuda = sorted((n for n in blobs if n.startswith("rng/cuda/")), key=lambda n: int(n.rsplit("/", 1)[1]))
            if cuda:
                rng["cuda"] = [blobs[n] for n in cuda]
            version, gauss = header["python"]
            rng["python"] = (int(version), tuple(int(v) for v in blobs["rng/python"].tolist()), gauss)
            if header["numpy"] is not None:
                import numpy

                name, pos, has_gauss, cached = header["numpy"]
                key = numpy.asarray(blobs["rng/numpy"].numpy(), dtype=numpy.uint32)
                rng["numpy"] = (str(name), key, int(pos), int(has_gauss), float(cached))
            tensors = {n[2:]: t for n, t in blobs.items() if n.startswith("t/")}
            tree, devices = dict(header["tree"]), dict(header["devices"])
            return cls(int(header["rank"]), int(header["step"]), tree, tensors, devices, rng)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise CheckpointCorruptError(f"a mirrored per-rank state record is malformed ({exc})") from None


def _raw(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def capture(rank: int, step: int, entries: Mapping[str, Any], *, rng: bool = True) -> StepRecord:
    """The state of ``entries`` (and the RNGs) now, as a checkpoint would encode it, tensors copied.

    Runs on the training thread at a step boundary: it calls the entries' ``state_dict()``.
    """
    flat = flatten(entries, rng=False)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in flat.tensors.items()}
    return StepRecord(rank, step, flat.tree, tensors, dict(flat.devices), capture_rng() if rng else {})


def same_state(a: StepRecord, b: StepRecord) -> bool:
    """The same per-rank state: entries (tree and every tensor's bytes) and every RNG."""
    return (
        a.tree == b.tree
        and a.tensors.keys() == b.tensors.keys()
        and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        and _same_rng(a.rng, b.rng)
    )


def changed_entries(before: StepRecord, after: StepRecord) -> list[str]:
    """The per-rank entries (and ``the RNGs``) that differ between two records of one rank, named."""
    names = sorted(set(before.tree) | set(after.tree))
    changed = []
    for key in names:
        prefix = escape_key(key) + "/"
        mine = {n for n in before.tensors if n.startswith(prefix)} | {n for n in after.tensors if n.startswith(prefix)}
        if before.tree.get(key) != after.tree.get(key) or any(
            n not in before.tensors or n not in after.tensors or not torch.equal(before.tensors[n], after.tensors[n])
            for n in mine
        ):
            changed.append(repr(key))
    if not _same_rng(before.rng, after.rng):
        changed.append("the RNGs")
    return changed


def _same_rng(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if a.keys() != b.keys() or not torch.equal(a["torch"], b["torch"]) or a["python"] != b["python"]:
        return False
    if len(a.get("cuda", [])) != len(b.get("cuda", [])):
        return False
    if not all(torch.equal(x, y) for x, y in zip(a.get("cuda", []), b.get("cuda", []), strict=True)):
        return False
    if "numpy" in a:
        numpy = sys.modules["numpy"]
        (n1, k1, *r1), (n2, k2, *r2) = a["numpy"], b["numpy"]
        return bool(n1 == n2 and numpy.array_equal(k1, k2) and r1 == r2)
    return True


class StepRecords:
    """This rank's records of its last completed steps, and the others' from the side channel.

    Args:
        channel: the side channel.
        rank: this rank.
        max_bytes: a record larger than this is kept here but not mirrored (said once): the job's
            per-rank state would cost the store too much every step, and this rank's sudden loss
            then cannot be saved from the others.
    """

    def __init__(self, channel: SideChannel, rank: int, *, max_bytes: int = 4 << 20) -> None:
        self.channel = channel
        self.rank = rank
        self.max_bytes = max_bytes
        self.mirrored = True  # False once a push failed or a record was too big: said once
        self.exact: set[int] = set()  # steps whose provisional record equalled the final one, here
        self.differed: set[int] = set()  # steps whose provisional record did not
        self._mine: dict[int, StepRecord] = {}
        self._provisional: StepRecord | None = None
        self._said_changed = False
        self._packed: dict[str, Any] = {}  # the last packed RNG words (see StepRecord.to_bytes)

    def keep(self, record: StepRecord) -> None:
        """Keep ``record`` and mirror it (synchronously: a completed step's state is out before ``step`` returns)."""
        self._mine[record.step] = record
        for old in sorted(self._mine)[:-KEEP]:
            del self._mine[old]
        provisional = self._provisional
        if provisional is not None and provisional.step == record.step:
            same = same_state(provisional, record)
            (self.exact if same else self.differed).add(record.step)
            if not same and not self._said_changed:
                self._said_changed = True  # said at the first step, before any loss, where it can be fixed
                log.warning(
                    "gpuguard: per-rank state changes between optimizer.step() and guard.step() (%s): a rank lost "
                    "in between cannot be saved from its peers, and the next run resumes from the newest checkpoint; "
                    "a loop that changes it before optimizer.step() closes that window",
                    ", ".join(changed_entries(provisional, record)),
                )
        self.exact.intersection_update(self._mine)
        self.differed.intersection_update(self._mine)
        self._mirror(f"rec/{self.rank}/{record.step % KEEP}", record)

    def keep_provisional(self, record: StepRecord) -> None:
        """Keep and mirror the state as an optimizer step begins (see the module docstring)."""
        self._provisional = record
        self._mirror(f"pre/{self.rank}", record)

    def _mirror(self, key: str, record: StepRecord) -> None:
        if not self.mirrored:
            return
        data = record.to_bytes(self._packed)
        if len(data) > self.max_bytes:
            self.stop_mirroring(f"its per-rank state is {len(data)} bytes, over the mirror's {self.max_bytes}")
            return
        try:
            self.channel.set(key, data)
        except SideChannelError as exc:
            self.stop_mirroring(str(exc))

    def stop_mirroring(self, why: str) -> None:
        if self.mirrored:
            self.mirrored = False
            log.warning(
                "gpuguard: rank %d's per-rank state is no longer mirrored (%s): if this rank dies without warning, "
                "the survivors cannot save its state and the next run resumes from the last periodic checkpoint",
                self.rank,
                why,
            )

    def held(self) -> tuple[int, ...]:
        """The steps of this rank's own records."""
        return tuple(sorted(self._mine))

    def mine(self, step: int) -> StepRecord | None:
        return self._mine.get(step)

    def mirrored_records(self, rank: int) -> dict[int, StepRecord]:
        """Another rank's records on the side channel, by step (unreadable ones are skipped, said once)."""
        found = {}
        for slot in range(KEEP):
            data = self.channel.get(f"rec/{rank}/{slot}")
            if data is None:
                continue
            try:
                record = StepRecord.from_bytes(data)
            except CheckpointCorruptError as exc:
                log.error("gpuguard: rank %d's mirrored state in slot %d: %s", rank, slot, exc)
                continue
            if record.rank == rank:
                found[record.step] = record
        return found

    def provisional(self) -> StepRecord | None:
        """This rank's provisional record (of the step whose optimizer step it began last)."""
        return self._provisional

    def mirrored_provisional(self, rank: int) -> StepRecord | None:
        data = self.channel.get(f"pre/{rank}")
        if data is None:
            return None
        try:
            record = StepRecord.from_bytes(data)
        except CheckpointCorruptError as exc:
            log.error("gpuguard: rank %d's mirrored provisional state: %s", rank, exc)
            return None
        return record if record.rank == rank else None

    def record(self, rank: int, step: int, *, provisional: bool = False) -> StepRecord | None:
        """``rank``'s record of ``step``: this rank's own, or the mirror's; with ``provisional``, the one
        taken as that step's optimizer step began when there is no final one."""
        if rank == self.rank and step in self._mine:
            return self._mine[step]
        found = self.mirrored_records(rank).get(step) if rank != self.rank else None
        if found is None and provisional:
            pre = self._provisional if rank == self.rank else self.mirrored_provisional(rank)
            found = pre if pre is not None and pre.step == step else None
        return found
