"""The policy ladder: from the job's GPUs' health to one action.

1. observe — HEALTHY, application XIDs, UNKNOWN under ``fail_open``: log, nothing stops;
2. node-local retry — a DEGRADED GPU is tolerated in place, and escalates to rescheduling when it
   stays DEGRADED past ``degraded_grace_s`` or turns DEGRADED ``retry_limit`` times within
   ``retry_window_s``;
3. restart in place — a fault the catalog clears by restarting the application (remedy
   ``RESTART_APP``, e.g. XID 94): emergency checkpoint, exit ``restart_exit_code`` (76);
4. reschedule — FAILING or LOST (reset, reboot, hardware), an escalated DEGRADED, UNKNOWN under
   ``fail_closed``: emergency checkpoint, exit ``reschedule_exit_code`` (75).

Actions are ordered so that the most severe wins, which is also how ranks agree: ``max``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gpuguard.guard.config import GuardConfig
from gpuguard.health.model import DeviceHealth, HealthSnapshot, HealthState, Reason, Remedy


class Action(enum.IntEnum):
    """What the job does; larger is more severe, and ranks agree on the largest."""

    CONTINUE = 0
    RESTART = 1
    RESCHEDULE = 2


@dataclass(frozen=True)
class Decision:
    """The policy's verdict, with what it rests on.

    Attributes:
        action: what to do.
        rung: the ladder's rung: ``observe``, ``retry``, ``restart``, ``reschedule``.
        message: one sentence for logs, Events and conditions.
        device: the GPU's UUID, when one GPU is the cause.
        evidence: the device's state and reasons, and the thresholds that escalated it.
    """

    action: Action
    rung: str
    message: str
    device: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.name,
            "rung": self.rung,
            "message": self.message,
            "device": self.device,
            "evidence": self.evidence,
        }


CONTINUE = Decision(Action.CONTINUE, "observe", "all watched GPUs are usable")

_LEAVE_REMEDIES = frozenset({Remedy.RESET_GPU, Remedy.REBOOT, Remedy.DRAIN_P2P, Remedy.CONTACT_SUPPORT})


class PolicyLadder:
    """Decides from health snapshots; keeps the history the retry rung needs. Thread-compatible, not safe."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self._episodes: dict[str, deque[float]] = {}  # uuid -> starts of DEGRADED episodes
        self._degraded_since: dict[str, float] = {}

    def decide(
        self, snapshot: HealthSnapshot, now: float, extra_reasons: dict[str, list[Reason]] | None = None
    ) -> Decision:
        """The action for the job now.

        Args:
            snapshot: the monitor's latest picture.
            now: the monitor's clock.
            extra_reasons: reasons from other sources (step time), by device UUID.
        """
        fail_closed = self.config.health.fail_mode == "closed"
        if not snapshot.available:
            if fail_closed:
                return Decision(
                    Action.RESCHEDULE,
                    "reschedule",
                    f"GPU health cannot be read ({snapshot.error}); fail_closed treats that as unusable",
                )
            return CONTINUE
        decisions = [
            self._decide_device(d, now, (extra_reasons or {}).get(d.uuid, []), fail_closed) for d in snapshot.devices
        ]
        return max(decisions, key=lambda d: d.action, default=CONTINUE)

    def _decide_device(self, device: DeviceHealth, now: float, extra: list[Reason], fail_closed: bool) -> Decision:
        reasons = sorted([*device.reasons, *extra], key=lambda r: -r.state.severity)
        state = max((r.state for r in reasons), key=lambda s: s.severity, default=HealthState.HEALTHY)
        evidence: dict[str, Any] = {
            "gpu_index": device.index,
            "uuid": device.uuid,
            "state": state.value,
            "reasons": [r.to_dict() for r in reasons],
        }
        top = reasons[0] if reasons else None
        self._track_episodes(device.uuid, state, now)
        if state in (HealthState.FAILING, HealthState.LOST):
            assert top is not None
            if all(r.remedy is Remedy.RESTART_APP for r in reasons if r.state.severity >= HealthState.FAILING.severity):
                return Decision(Action.RESTART, "restart", f"GPU {device.index}: {top.message}", device.uuid, evidence)
            return Decision(
                Action.RESCHEDULE,
                "reschedule",
                f"GPU {device.index} is {state.value}: {top.message}",
                device.uuid,
                evidence,
            )
        if state is HealthState.DEGRADED:
            assert top is not None
            degraded = [r for r in reasons if r.state is HealthState.DEGRADED]
            if any(r.remedy is Remedy.RESTART_APP for r in degraded):
                restart = next(r for r in degraded if r.remedy is Remedy.RESTART_APP)
                return Decision(
                    Action.RESTART, "restart", f"GPU {device.index}: {restart.message}", device.uuid, evidence
                )
            return self._retry_or_escalate(device, top, now, evidence)
        if state is HealthState.UNKNOWN and fail_closed:
            message = f"GPU {device.index}: health unknown ({top.message if top else 'no answer'}); fail_closed"
            return Decision(Action.RESCHEDULE, "reschedule", message, device.uuid, evidence)
        return Decision(Action.CONTINUE, "observe", f"GPU {device.index} is {state.value}", device.uuid, evidence)

    def _track_episodes(self, uuid: str, state: HealthState, now: float) -> None:
        if state is HealthState.DEGRADED:
            if uuid not in self._degraded_since:
                self._degraded_since[uuid] = now
                self._episodes.setdefault(uuid, deque()).append(now)
        else:
            self._degraded_since.pop(uuid, None)
        episodes = self._episodes.get(uuid)
        while episodes and now - episodes[0] > self.config.retry_window_s:
            episodes.popleft()

    def _retry_or_escalate(self, device: DeviceHealth, top: Reason, now: float, evidence: dict[str, Any]) -> Decision:
        c = self.config
        held = now - self._degraded_since[device.uuid]
        episodes = len(self._episodes.get(device.uuid, ()))
        evidence = {
            **evidence,
            "degraded_for_s": round(held, 3),
            "episodes_in_window": episodes,
            "degraded_grace_s": c.degraded_grace_s,
            "retry_limit": c.retry_limit,
            "retry_window_s": c.retry_window_s,
        }
        if held >= c.degraded_grace_s:
            return Decision(
                Action.RESCHEDULE,
                "reschedule",
                f"GPU {device.index} DEGRADED for {held:.0f}s (grace {c.degraded_grace_s:g}s): {top.message}",
                device.uuid,
                evidence,
            )
        if episodes >= c.retry_limit:
            return Decision(
                Action.RESCHEDULE,
                "reschedule",
                f"GPU {device.index} DEGRADED {episodes} times in {c.retry_window_s:g}s: {top.message}",
                device.uuid,
                evidence,
            )
        return Decision(
            Action.CONTINUE,
            "retry",
            f"GPU {device.index} DEGRADED, tolerated in place ({episodes}/{c.retry_limit}): {top.message}",
            device.uuid,
            evidence,
        )
