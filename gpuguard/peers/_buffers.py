"""Module buffers as they were at the last completed step.

A forward pass changes some buffers (BatchNorm's running statistics and ``num_batches_tracked``), so
a survivor interrupted inside the next step's forward or backward holds the parameters of the last
completed step but not its buffers. Before the first forward after each completed step, the buffers
of each module in the state are copied aside (a forward pre-hook, on the training thread, running
before DDP's or FSDP's own), and a survivor that had started a forward saves those copies instead.
Modules without buffers cost nothing: no hook is registered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import torch

log = logging.getLogger("gpuguard.peers")

MAX_BYTES: Final = 256 << 20  # buffers copied every step beyond this would cost more than they save


class _AsAtLastStep:
    """A module whose ``state_dict()`` has the buffers of the last completed step (for saving only)."""

    def __init__(self, module: torch.nn.Module, kept: Mapping[str, torch.Tensor]) -> None:
        self.module = module
        self.kept = kept

    def state_dict(self) -> dict[str, Any]:
        state = self.module.state_dict()
        for key, value in self.kept.items():
            state[key] = value
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # pragma: no cover - never loaded into
        raise TypeError("a saving view of a module; load into the module itself")


class BufferKeeper:
    """Copies the buffers of ``modules`` at the first forward after each completed step."""

    def __init__(self, modules: Mapping[str, torch.nn.Module]) -> None:
        self._live: dict[str, dict[str, torch.Tensor]] = {}
        self._kept: dict[str, dict[str, torch.Tensor]] = {}
        self.forwarded = False
        total = 0
        for key, module in modules.items():
            state = module.state_dict(keep_vars=True)
            buffers = {id(b) for b in module.buffers()}
            live = {name: v for name, v in state.items() if isinstance(v, torch.Tensor) and id(v) in buffers}
            if not live:
                continue
            total += sum(t.numel() * t.element_size() for t in live.values())
            self._live[key] = live
            self._kept[key] = {name: t.detach().clone() for name, t in live.items()}
            module.register_forward_pre_hook(self._before_forward, prepend=True)
        if total > MAX_BYTES:
            log.warning(
                "gpuguard: the modules' buffers hold %d MiB: not copied at each step; a survivor interrupted inside "
                "a forward pass saves them as that forward left them",
                total >> 20,
            )
            self._live.clear()
            self._kept.clear()

    def completed(self) -> None:
        self.forwarded = False

    def _before_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self.forwarded:
            return
        self.forwarded = True
        with torch.no_grad():
            for key, live in self._live.items():
                kept = self._kept[key]
                for name, tensor in live.items():
                    kept[name].copy_(tensor)

    def as_at_last_step(self, view: Mapping[str, Any]) -> dict[str, Any]:
        """``view`` with each module replaced by one whose buffers are the last completed step's."""
        if not self.forwarded:
            return dict(view)
        return {
            key: _AsAtLastStep(value, self._kept[key]) if key in self._kept else value for key, value in view.items()
        }
