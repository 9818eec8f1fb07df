"""The ranks that must agree on what they read from storage or decided alone, and the one collective they use.

`RankGroup.all_gather` gathers one JSON value from every rank: the bytes travel in uint8 tensors
(two ``all_gather`` calls: sizes, then the padded bytes), so nothing a peer sends is unpickled
(``all_gather_object`` would unpickle it). Every rank of the group must call it at the same point of
its program, like any collective: callers issue it only where every rank is by contract (a save every
rank makes, a load every rank makes, a step every rank reaches), never from a background thread.

`solo` stands in for a single process, so the code above it has one path.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any, Protocol

import torch


class RankGroup(Protocol):
    """The ranks of one job that act on the same answer."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def all_gather(self, value: Any) -> list[Any]:
        """``value`` (JSON-able) from every rank, in rank order. A collective."""
        ...

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """A few int64 values from every rank (the same count on each), in rank order: one collective."""
        ...


class _Solo:
    rank = 0
    size = 1

    def all_gather(self, value: Any) -> list[Any]:
        return [json.loads(json.dumps(value))]  # the same copy semantics as the collective

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        return [[int(v) for v in values]]


class TorchGroup:
    """A ``torch.distributed`` process group (the default one when ``group`` is None)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # NCCL moves CUDA tensors only; gloo (and a "cpu:gloo,cuda:nccl" group) CPU ones.
        backend = str(dist.get_backend(group))
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def all_gather(self, value: Any) -> list[Any]:
        data = json.dumps(value, separators=(",", ":")).encode()
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
        sizes = [torch.empty_like(size) for _ in range(self.size)]
        self._dist.all_gather(sizes, size, group=self._group)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        mine = torch.zeros(longest, dtype=torch.uint8, device=self._device)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._device)
        everyone = [torch.empty_like(mine) for _ in range(self.size)]
        self._dist.all_gather(everyone, mine, group=self._group)
        out = []
        for tensor, n in zip(everyone, lengths, strict=True):
            host = tensor[:n].cpu().contiguous()
            out.append(json.loads(ctypes.string_at(host.data_ptr(), n) if n else b"null"))
        return out

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        mine = torch.tensor(values, dtype=torch.int64, device=self._device)
        everyone = [torch.empty_like(mine) for _ in range(self.size)]
        self._dist.all_gather(everyone, mine, group=self._group)
        return [[int(v) for v in t.tolist()] for t in everyone]


solo: RankGroup = _Solo()


def default_group(world_size: int | None = None) -> RankGroup:
    """The default process group when one is initialized (and has ``world_size`` ranks, when given), else `solo`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return solo
    size = dist.get_world_size()
    if size == 1 or (world_size is not None and world_size != size):
        return solo
    return TorchGroup()
