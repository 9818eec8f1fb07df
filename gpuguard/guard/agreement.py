"""Cross-rank agreement: every rank acts on the same decision at the same step.

Every ``sync_every`` steps each rank puts its local view into a tiny tensor and starts an
``all_reduce(MAX)`` with ``async_op=True``; the result is read at the rank's next ``step()`` call,
one training step later, when the 32-byte collective has long finished (a step takes milliseconds
to seconds; the collective, tens of microseconds). Every rank reads the same value at the same
step, so all of them checkpoint that step and none enters a collective the others skip.

Latency: a decision first visible at step ``d`` is contributed at the next sync step ``S >= d``
(at most ``sync_every - 1`` steps later) and acted on at ``S + 1``: at most ``sync_every`` steps.
(Reading the result at the *next sync point* instead would cost up to ``2 x sync_every``.) The cost
is one collective per ``sync_every`` steps and a wait that is almost always already satisfied.

The tensor carries: the most severe action with the rank that decided it (``action << 16 | rank``),
whether a time-based periodic checkpoint is due, the slowest step time with the rank that took it
(``microseconds << 16 | rank``), and the fastest, negated so that MAX finds it
(``-microseconds << 16 | rank``): a slowdown counts against a GPU only on a rank slower than its peers.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Agreed:
    """What every rank agreed on at a sync point."""

    action: int
    decided_by: int
    periodic_due: bool
    slowest_rank: int
    slowest_step_s: float
    fastest_rank: int = -1
    fastest_step_s: float = 0.0


NOTHING = Agreed(0, -1, False, -1, 0.0)


class Agreement:
    """Agreement across the ranks of the default process group; local when there is none."""

    def __init__(self) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self._work: Any = None
        self._buffer: torch.Tensor | None = None
        if self.distributed:
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            self._buffer = torch.zeros(4, dtype=torch.int64, device=device)

    def run_token(self) -> str:
        """A token all ranks share for this launch (one collective, at start-up only)."""
        token = [secrets.token_hex(4)]
        if self.distributed:
            dist.broadcast_object_list(token, src=0)
        return str(token[0])

    @property
    def pending(self) -> bool:
        """An agreement was started and not yet read."""
        return self._work is not None

    def begin(self, action: int, periodic_due: bool, step_s: float) -> None:
        """Start agreeing on this rank's view. Every rank must call it at the same steps."""
        if not self.distributed:
            return
        assert self._buffer is not None and self._work is None, "read the previous agreement first"
        micros = int(step_s * 1e6)
        values = [
            (action << 16) | self.rank,
            int(periodic_due),
            (micros << 16) | self.rank,
            (-micros << 16) | self.rank,
        ]
        self._buffer.copy_(torch.tensor(values, dtype=torch.int64))
        self._work = dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, async_op=True)

    def finish(self) -> Agreed:
        """What every rank agreed on (waits for the collective; it has normally finished)."""
        if self._work is None:
            return NOTHING
        assert self._buffer is not None
        self._work.wait()
        self._work = None
        decided, periodic, slowest, fastest = (int(v) for v in self._buffer.tolist())
        return Agreed(
            decided >> 16,
            decided & 0xFFFF,
            bool(periodic),
            slowest & 0xFFFF,
            (slowest >> 16) / 1e6,
            fastest & 0xFFFF,
            -(fastest >> 16) / 1e6,
        )

    def close(self) -> None:
        if self._work is not None:
            with contextlib.suppress(Exception):  # a peer is gone: nothing left to agree on
                self._work.wait()
            self._work = None
