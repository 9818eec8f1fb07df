"""Whether an overlapped snapshot is safe, checked rather than assumed.

Overlapping the copy of parameters and optimizer state with the next forward and backward is sound only
while those tensors change in ``optimizer.step()`` alone (which waits for the copy). Two things break it:

- an optimizer whose ``step()`` does not run step pre-hooks (a wrapper that never called
  ``Optimizer.__init__``, so torch never patched its class's ``step``): nothing would hold its step back.
  Such optimizers are left out of the overlap: their tensors are copied before ``save`` returns.
- a tensor changed outside ``optimizer.step()`` between the save and the next step (a clamp in the
  forward, a manual update, a second optimizer that is not in the state). Every in-place PyTorch op bumps
  the tensor's version counter (``Tensor._version``, shared by ``detach()`` and views), so the versions
  recorded when ``save`` returns are compared (1) on the copying thread, right after the deferred copy:
  a change there means the copy may hold a later step's values, and that save fails (nothing is
  committed); (2) at the first optimizer step after the save: a change there means the pattern is
  present even if this copy won the race. Either way overlap is turned off for the rest of the run, with
  one line naming the tensor.

Not seen by version counters, so not detected: writes through ``.data`` (its own counter) and writes
from outside PyTorch (NumPy or DLPack views, custom kernels given a ``data_ptr``). A job that updates
its parameters that way must set ``overlap_snapshot=False``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch

from gpuguard.errors import CheckpointError

log = logging.getLogger("gpuguard.checkpoint")


def hooks_run(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` runs step pre-hooks (torch patches a class's ``step`` in ``__init__``)."""
    return bool(getattr(type(optimizer).step, "hooked", False)) and hasattr(optimizer, "_optimizer_step_pre_hooks")


class Versions:
    """The version counters of the deferred tensors when ``save`` returned."""

    def __init__(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        self.step = step
        self.tensors = tensors
        self.versions = {name: t._version for name, t in tensors.items()}

    def changed(self) -> list[str]:
        return [name for name, t in self.tensors.items() if t._version != self.versions[name]]


class OverlapCheck:
    """Refuses overlap, once and for the rest of the run, at the first sign that it is not safe."""

    def __init__(self) -> None:
        self.refused: str | None = None  # why overlap is off, once it is
        self._lock = threading.Lock()
        self._watching: Versions | None = None
        self._told: set[int] = set()

    def usable(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
        """The optimizers whose tensors may be copied late: none once refused; never one that skips hooks."""
        if self.refused is not None:
            return []
        usable = []
        for optimizer in optimizers:
            if hooks_run(optimizer):
                usable.append(optimizer)
            elif id(optimizer) not in self._told:
                self._told.add(id(optimizer))
                log.warning(
                    "gpuguard: %s's step() does not run step pre-hooks (it never called Optimizer.__init__), so "
                    "nothing could hold its step back while a snapshot is copied: its tensors are copied before "
                    "each save returns",
                    type(optimizer).__name__,
                )
        return usable

    def watch(self, versions: Versions) -> None:
        """At ``save``: the versions the next optimizer step will compare."""
        with self._lock:
            self._watching = versions

    def after_copy(self, versions: Versions) -> None:
        """On the copying thread, once the deferred copy is done.

        Raises:
            CheckpointError: a deferred tensor changed before its copy finished: this save may hold a
                later step's values, so it must not commit.
        """
        changed = versions.changed()
        if changed:
            self.refuse(changed, versions.step, torn=True)
            raise CheckpointError(
                f"the checkpoint at step {versions.step} is not committed: {changed[0]!r} changed outside "
                "optimizer.step() while its copy was deferred, so the copy could hold a later step's values "
                "(overlap_snapshot is now off for this run; later saves copy before they return)"
            )

    def before_step(self) -> None:
        """At the first optimizer step after an overlapped save (its copy is done): nothing changed since."""
        with self._lock:
            versions, self._watching = self._watching, None
        if versions is not None:
            changed = versions.changed()
            if changed:
                self.refuse(changed, versions.step, torn=False)

    def refuse(self, changed: list[str], step: int, *, torn: bool) -> None:
        with self._lock:
            if self.refused is not None:
                return
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            self.refused = f"{changed[0]!r}{more} changed outside optimizer.step() after the save at step {step}"
        log.warning(
            "gpuguard: overlap_snapshot turned off for the rest of this run: %s, while its copy could still be "
            "pending; overlapping is safe only when parameters and optimizer state change in optimizer.step() "
            "alone. %s Later saves copy everything before they return.",
            self.refused,
            "That checkpoint is not committed."
            if torn
            else "That checkpoint is intact (its copy finished before the change).",
        )
