"""What gpuguard knows about a GPU: its state, and the reasons for it with their evidence."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class HealthState(enum.Enum):
    """How usable a GPU is, ordered from best to worst (``UNKNOWN`` sits between, see `severity`)."""

    HEALTHY = "HEALTHY"
    """Nothing wrong that gpuguard can see."""
    UNKNOWN = "UNKNOWN"
    """gpuguard cannot tell (NVML missing or not answering); ``fail_open``/``fail_closed`` decides."""
    DEGRADED = "DEGRADED"
    """Works, but slower or at rising risk."""
    FAILING = "FAILING"
    """Needs a GPU reset or node reboot soon; results may already be wrong."""
    LOST = "LOST"
    """NVML says the GPU is gone."""

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    def __str__(self) -> str:
        return self.value


_SEVERITY: dict[HealthState, int] = {
    HealthState.HEALTHY: 0,
    HealthState.UNKNOWN: 1,
    HealthState.DEGRADED: 2,
    HealthState.FAILING: 3,
    HealthState.LOST: 4,
}


class Remedy(enum.Enum):
    """What would clear a reason, from cheapest to most disruptive."""

    OBSERVE = "OBSERVE"
    """Nothing to do now; record it."""
    RESTART_APP = "RESTART_APP"
    """Restarting the training process on the same GPU clears it."""
    DRAIN_P2P = "DRAIN_P2P"
    """Stop peer-to-peer traffic to the GPU, then reset it."""
    RESET_GPU = "RESET_GPU"
    """The GPU needs a reset: the job must move off it."""
    REBOOT = "REBOOT"
    """The node needs a reboot: the job must move off the node."""
    CONTACT_SUPPORT = "CONTACT_SUPPORT"
    """Hardware investigation; the job should move off it meanwhile."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Reason:
    """One piece of evidence about a GPU.

    Attributes:
        code: stable identifier of the rule that fired, e.g. ``ECC_DBE_VOLATILE`` or ``XID``.
        state: the state this reason alone implies for the device.
        message: one human sentence.
        remedy: what would clear it.
        evidence: the values behind it: readings, thresholds, windows, the XID number.
        since: when it was first seen, in the monitor's clock (seconds).
        clears: how this reason goes away without a restart: the reading that clears it (a counter
            back to 0 after a GPU reset, a remap no longer pending), or the hold time of an event.
    """

    code: str
    state: HealthState
    message: str
    remedy: Remedy
    evidence: Mapping[str, Any] = field(default_factory=dict)
    since: float = 0.0
    clears: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "state": self.state.value,
            "message": self.message,
            "remedy": self.remedy.value,
            "evidence": dict(self.evidence),
            "since": round(self.since, 3),
            "clears": self.clears,
        }


@dataclass(frozen=True)
class DeviceHealth:
    """A GPU's health at one moment.

    Attributes:
        index: NVML index (PCI bus order; NVML ignores ``CUDA_VISIBLE_DEVICES``); -1 when a GPU opened by
            UUID could not tell it.
        uuid: ``GPU-...``, the identity that survives renumbering; CUDA devices are mapped by it. Empty
            when NVML could not read it (a GPU lost at start: ``pci_bus_id`` and ``index`` name it).
        pci_bus_id: e.g. ``00000000:00:06.0``.
        name: the product name.
        state: the worst state any reason implies (``HEALTHY`` with no reasons).
        reasons: every active reason, worst first.
        readings: the latest raw readings, by readable name (see `gpuguard.fakenvml.FIELD_NAMES`).
        signals_off: signals this GPU does not support (NVML answered NOT_SUPPORTED or
            FUNCTION_NOT_FOUND), so their rules are off.
        signals_unreadable: signals whose last read failed, with the NVML error; retried every poll.
            A critical one (ECC, row remap, NVLink, XID events) makes the GPU ``UNKNOWN``.
        mig_mode: ``"enabled"``, ``"disabled"`` (``"enabled (pending disable)"`` and the like while a
            change waits for a reset), or None where the GPU has no MIG.
        mig_devices: the MIG devices on this GPU that are watched through it: the job's own instances
            when it runs on MIG (``MIG-... (GPU instance 1, compute instance 0)``), every instance in a
            node-wide view. Health, XIDs and ECC are per GPU, so they are judged on this parent.
        updated_at: the monitor clock at the last evaluation.
    """

    index: int
    uuid: str
    pci_bus_id: str
    name: str
    state: HealthState
    reasons: tuple[Reason, ...] = ()
    readings: Mapping[str, Any] = field(default_factory=dict)
    signals_off: tuple[str, ...] = ()
    signals_unreadable: Mapping[str, str] = field(default_factory=dict)
    mig_mode: str | None = None
    mig_devices: tuple[str, ...] = ()
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "pci_bus_id": self.pci_bus_id,
            "name": self.name,
            "state": self.state.value,
            "reasons": [reason.to_dict() for reason in self.reasons],
            "readings": dict(self.readings),
            "signals_off": list(self.signals_off),
            "signals_unreadable": dict(self.signals_unreadable),
            "mig_mode": self.mig_mode,
            "mig_devices": list(self.mig_devices),
            "updated_at": round(self.updated_at, 3),
        }


@dataclass(frozen=True)
class HealthChange:
    """What subscribers receive when a device's state or reasons change."""

    previous: DeviceHealth | None
    current: DeviceHealth

    @property
    def state_changed(self) -> bool:
        return self.previous is None or self.previous.state is not self.current.state


@dataclass(frozen=True)
class HealthSnapshot:
    """Every watched GPU at one moment, plus whether the source itself works.

    Attributes:
        devices: one entry per watched GPU, by NVML index.
        available: False when NVML could not be used; ``error`` then says why.
        error: the source's last error, if any.
        taken_at: the monitor clock when the snapshot was made.
        skipped: GPUs NVML counts but denies this process (NO_PERMISSION), one line each; not watched.
        watching: which GPUs are watched and how they were chosen (the job's scope), one line.
        notes: what NVML said about GPUs that are not watched (another GPU on the node lost, say).
    """

    devices: tuple[DeviceHealth, ...]
    available: bool = True
    error: str | None = None
    taken_at: float = 0.0
    skipped: tuple[str, ...] = ()
    watching: str = ""
    notes: tuple[str, ...] = ()

    @property
    def worst(self) -> HealthState:
        if not self.available and not self.devices:
            return HealthState.UNKNOWN
        return max((d.state for d in self.devices), key=lambda s: s.severity, default=HealthState.HEALTHY)

    def by_uuid(self, uuid: str) -> DeviceHealth | None:
        return next((d for d in self.devices if d.uuid == uuid), None)

    def states(self) -> dict[str, str]:
        """Each watched GPU's state name, by UUID (by ``index N`` or PCI bus id where the UUID is unknown).

        The verdict a node-level check needs: it follows the hardware, so a GPU that was FAILING reads
        HEALTHY again once a reset has cleared what failed it (see `Reason.clears`).
        """
        out: dict[str, str] = {}
        for d in self.devices:
            key = d.uuid or d.pci_bus_id or f"index {d.index}"
            out[key] = d.state.value
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"devices": [d.to_dict() for d in self.devices]}
        if not self.available:
            out["available"] = False
        if self.error:
            out["error"] = self.error
        if self.skipped:
            out["skipped"] = list(self.skipped)
        if self.watching:
            out["watching"] = self.watching
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def worst_state(reasons: tuple[Reason, ...] | list[Reason]) -> HealthState:
    """The state a set of reasons implies: the worst of them, ``HEALTHY`` when there are none."""
    return max((r.state for r in reasons), key=lambda s: s.severity, default=HealthState.HEALTHY)
