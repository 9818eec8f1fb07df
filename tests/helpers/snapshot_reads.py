"""Counting how often a save reads the live training state, and on which thread.

Two counters, each able to show two snapshots where there should be one:

- `Counted`, an entry of the state whose ``state_dict()`` counts its calls and records the calling thread;
- `LiveReads`, which watches the one function through which every snapshot of host tensors copies bytes
  (the private seam ``gpuguard.checkpoint._staging.host_copy``: a snapshot into a staging buffer, an
  overlapped copy finishing on its thread, a copy from one tier's staging buffer into another's) and counts,
  per thread, the copies whose source is the live state's memory.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch

from gpuguard.checkpoint import _staging


class Counted:
    """A stateful entry: ``state_dict()`` counts its calls (``calls``) and records each caller's thread."""

    def __init__(self) -> None:
        self.value = torch.arange(16, dtype=torch.float32)
        self.calls = 0
        self.threads: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value.copy_(state["value"])


def live_pointers(state: dict[str, Any]) -> set[int]:
    """The addresses of every tensor of ``state``'s modules and optimizers (they stay put while training)."""
    pointers: set[int] = set()
    for value in state.values():
        if isinstance(value, torch.nn.Module):
            pointers.update(t.data_ptr() for t in value.state_dict().values() if t.numel())
        elif isinstance(value, torch.optim.Optimizer):
            for per_param in value.state.values():
                pointers.update(v.data_ptr() for v in per_param.values() if isinstance(v, torch.Tensor) and v.numel())
        elif isinstance(value, Counted):
            pointers.add(value.value.data_ptr())
    return pointers


class LiveReads:
    """Counts the staging copies that read ``live`` memory, by thread; installed with ``with``."""

    def __init__(self, live: Iterable[int]) -> None:
        self.live = set(live)
        self.reads: Counter[tuple[str, int]] = Counter()  # (thread, live address) -> copies from it
        self.other: Counter[str] = Counter()  # thread -> calls that copied memory other than the live state
        self._lock = threading.Lock()
        self._original = _staging.host_copy

    def __enter__(self) -> LiveReads:
        original = self._original

        def watched(pairs: Any, *args: Any, **kwargs: Any) -> None:
            pairs = list(pairs)
            thread = threading.current_thread().name
            with self._lock:
                for _, src in pairs:
                    if src.numel() and src.data_ptr() in self.live:
                        self.reads[(thread, src.data_ptr())] += 1
                if any(src.numel() and src.data_ptr() not in self.live for _, src in pairs):
                    self.other[thread] += 1
            original(pairs, *args, **kwargs)

        _staging.host_copy = watched
        return self

    def __exit__(self, *exc: object) -> None:
        _staging.host_copy = self._original

    def per_tensor(self) -> dict[int, int]:
        """How many times each live tensor was read, all threads together."""
        out: Counter[int] = Counter()
        for (_, pointer), n in self.reads.items():
            out[pointer] += n
        return {p: out[p] for p in self.live}

    def threads(self) -> set[str]:
        """The threads that read live memory."""
        return {thread for thread, _ in self.reads}
