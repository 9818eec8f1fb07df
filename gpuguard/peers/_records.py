"""Each rank's small per-rank state at every completed step, kept here and mirrored on the side channel.

Data-parallel replicas hold the same parameters and optimizer state, so a dead rank's copy of those
lives on. What is its own is small: its random number generators and the entries of the state that
are not modules, optimizers or schedulers (a data loader's position, a progress dict). At every
``guard.step`` that part is captured (the same JSON tree and tensors a checkpoint holds for it, the
tensors copied) and written to the side channel before ``step`` returns, so the state of every step a
rank completed is readable by the others after its death. The two newest steps are kept: a survivor
may be one step ahead of another.

A rank may also die inside its optimizer step, after its gradients were exchanged: its peers then
complete that step, and its record of the step never comes. So as each optimizer step begins, a
*provisional* record of the step is taken and mirrored too (``pre/<rank>``). It is the step's final
state unless the loop changes per-rank state after ``optimizer.step()``; whether it does is seen on
every survivor, which compares its own provisional record with its final one (`same_state`).

A record is a safetensors blob whose metadata holds the JSON tree: parsed without pickling.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from gpuguard.checkpoint._tree import flatten
from gpuguard.errors import CheckpointCorruptError, SideChannelError
from gpuguard.peers._channel import SideChannel

log = logging.getLogger("gpuguard.peers")

KEEP: Final = 2  # steps kept per rank: survivors are at most one step apart
_META: Final = "gpuguard_record"


@dataclass(frozen=True)
class StepRecord:
    """One rank's per-rank state after one completed step: JSON tree entries and the tensors they name."""

    rank: int
    step: int
    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        meta = json.dumps({"rank": self.rank, "step": self.step, "tree": self.tree, "devices": self.devices})
        return bytes(save(self.tensors, metadata={_META: meta}))

    @classmethod
    def from_bytes(cls, data: bytes) -> StepRecord:
        """Parse a record (safetensors; no pickling). Raises `CheckpointCorruptError` on anything malformed."""
        from safetensors.torch import load

        try:
            size = int.from_bytes(data[:8], "little")
            header = json.loads(bytes(data[8 : 8 + size]))
            meta = json.loads(header["__metadata__"][_META])
            tensors = load(bytes(data))
            return cls(int(meta["rank"]), int(meta["step"]), dict(meta["tree"]), tensors, dict(meta["devices"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointCorruptError(f"a mirrored per-rank state record is malformed ({exc})") from None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def capture(rank: int, step: int, entries: Mapping[str, Any], *, rng: bool = True) -> StepRecord:
    """The state of ``entries`` (and the RNGs) now, as a checkpoint would encode it, tensors copied.

    Runs on the training thread at a step boundary: it calls the entries' ``state_dict()``.
    """
    flat = flatten(entries, rng=rng)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in flat.tensors.items()}
    return StepRecord(rank, step, flat.tree, tensors, dict(flat.devices))


def same_state(a: StepRecord, b: StepRecord) -> bool:
    """The same per-rank state: tree, tensor names and every tensor's bytes."""
    return (
        a.tree == b.tree
        and a.tensors.keys() == b.tensors.keys()
        and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    )


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

    def keep(self, record: StepRecord) -> None:
        """Keep ``record`` and mirror it (synchronously: a completed step's state is out before ``step`` returns)."""
        self._mine[record.step] = record
        for old in sorted(self._mine)[:-KEEP]:
            del self._mine[old]
        provisional = self._provisional
        if provisional is not None and provisional.step == record.step:
            (self.exact if same_state(provisional, record) else self.differed).add(record.step)
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
        data = record.to_bytes()
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
