"""`SuddenLoss`: one rank's part in surviving a peer that dies without warning.

In steady state it costs each ``guard.step`` the capture of this rank's small per-rank state (RNGs,
data position) and one write of it to the side channel, and a background thread's heartbeat. When a
peer dies, every survivor's collectives are abandoned (`gpuguard.peers._abandon`), and the training
thread — at its next ``guard.step``, or as the abandoned collective's error leaves the guard's
``with`` block — runs `SuddenLoss.survive`: agree with the other survivors on the last step every rank
completed, write the checkpoint of that step from the replicas, and report what happened. The guard
then leaves with the reschedule code, as on any evacuation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gpuguard.checkpoint._tree import RNG_KEY, FlatState
from gpuguard.errors import CheckpointError, GpuGuardError, SideChannelError, UnsupportedStateError
from gpuguard.peers import _agree
from gpuguard.peers._abandon import abandon_collectives
from gpuguard.peers._buffers import BufferKeeper
from gpuguard.peers._channel import SideChannel, connect
from gpuguard.peers._layout import plain_tensors, replica_groups, replicated_state, split
from gpuguard.peers._plan import Cannot, CheckIn, Plan
from gpuguard.peers._records import StepRecords, capture
from gpuguard.peers._watch import Alarm, PeerWatch

log = logging.getLogger("gpuguard.peers")

MAX_CAPTURE_S = 0.05  # a capture of the per-rank state slower than this at start: not done every step


@dataclass
class SurvivorOutcome:
    """What the survivors did, for the log, the Event, the launcher and benchmarks.

    ``result`` is ``saved`` (a checkpoint of ``step`` committed), ``cannot`` (no complete copy of some
    piece survived: ``message`` names it), ``excluded`` (this rank checked in too late to take part) or
    ``failed`` (the save itself failed). Times are wall-clock seconds since the epoch.
    """

    result: str
    message: str
    alarm: Alarm
    step: int | None = None
    checkpoint_id: str | None = None
    checkpoint: Any = None  # the CheckpointInfo, on the committing rank
    members: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()
    steps_replayed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "message": self.message,
            "lost": list(self.lost),
            "members": list(self.members),
            "step": self.step,
            "checkpoint_id": self.checkpoint_id,
            "steps_replayed": self.steps_replayed,
            "alarm": {"lost": self.alarm.lost, "by": self.alarm.by, "why": self.alarm.why, "at": self.alarm.at},
            "timings": dict(self.timings),
        }


class SuddenLoss:
    """Sudden-loss protection for one rank (built by the guard with `start`; None when it cannot run).

    Obligations: `completed` on the training thread at every completed step (after the optimizer
    step); `survive` on the training thread once `alarmed`, and never again after it.
    """

    def __init__(
        self,
        channel: SideChannel,
        watch: PeerWatch,
        records: StepRecords,
        *,
        rank: int,
        world_size: int,
        replicated: bool,
        checkpoint_id: Callable[[int], str],
    ) -> None:
        self.channel = channel
        self.watch = watch
        self.records = records
        self.rank = rank
        self.world_size = world_size
        self.replicated = replicated
        self.checkpoint_id = checkpoint_id
        self.last_step = -1
        self.in_optimizer_step = False
        self.abandoned: str | None = None
        self.buffers: BufferKeeper | None = None
        self._per_rank: list[str] = []
        self._view: Mapping[str, Any] | None = None
        self._on_alarm: list[Callable[[Alarm], None]] = []
        self._abandoning = threading.Lock()  # the watch thread and the training thread both may

    @classmethod
    def start(
        cls,
        view: Mapping[str, Any],
        *,
        rank: int,
        world_size: int,
        prefix: str,
        replicated: bool,
        heartbeat_s: float,
        timeout_s: float,
        checkpoint_id: Callable[[int], str],
        health: Callable[[], str] | None = None,
    ) -> SuddenLoss | None:
        """Connect to the side channel, hook the optimizers and modules in ``view``, start the watch.

        Returns None (said once) when there is no side channel to use: protection is then off.
        """
        try:
            channel = connect(prefix, timeout_s=max(2.0, timeout_s))
        except SideChannelError as exc:
            log.warning("gpuguard: sudden-loss protection is off: %s", exc)
            return None
        if channel is None:
            log.warning(
                "gpuguard: sudden-loss protection is off: no side channel (MASTER_ADDR/MASTER_PORT unset); "
                "launch with torchrun or gpuguard-run"
            )
            return None
        if not channel.outlives_every_rank:
            log.warning(
                "gpuguard: the side channel is the store in rank 0's process (not launched by torchrun): "
                "a sudden loss of rank 0 cannot be saved from the others"
            )
        import os

        keep = {int(os.environ["MASTER_PORT"])} if os.environ.get("MASTER_PORT", "").isdigit() else set()
        watch = PeerWatch(
            channel, rank, world_size, heartbeat_s=heartbeat_s, timeout_s=timeout_s, keep_ports=keep, health=health
        )
        part = cls(
            channel,
            watch,
            StepRecords(channel, rank),
            rank=rank,
            world_size=world_size,
            replicated=replicated,
            checkpoint_id=checkpoint_id,
        )
        refusal = part._check_per_rank(view) or _unhookable(view)
        if refusal:
            log.warning("gpuguard: sudden-loss protection is off: %s", refusal)
            return None
        part._hook(view)
        watch.subscribe(part._alarm)
        watch.start()
        return part

    def _check_per_rank(self, view: Mapping[str, Any]) -> str:
        """Why this state's per-rank part cannot be mirrored every step ("" when it can): it is captured once
        now, and must be small and quick, or every step would pay for it."""
        _, per_rank = split(view)
        entries = {k: view[k] for k in per_rank}
        try:
            capture(self.rank, -1, entries).to_bytes()  # the first one pays for what happens once
            started = time.perf_counter()
            size = len(capture(self.rank, -1, entries).to_bytes())
        except GpuGuardError as exc:
            return f"its per-rank state cannot be captured ({exc})"
        took = time.perf_counter() - started
        if size > self.records.max_bytes or took > MAX_CAPTURE_S:
            return (
                f"the state entries {', '.join(map(repr, per_rank))} (neither modules, optimizers nor schedulers) "
                f"are this rank's own and would be written to the store at every step: {size} bytes in "
                f"{took * 1000:.0f} ms (at most {self.records.max_bytes} bytes and {MAX_CAPTURE_S * 1000:.0f} ms)"
            )
        return ""

    def _hook(self, view: Mapping[str, Any]) -> None:
        self._view = view
        replicated, self._per_rank = split(view)
        for value in view.values():
            if isinstance(value, torch.optim.Optimizer):
                _steps_of(value).register_step_pre_hook(self._optimizer_starting)
        modules = {k: view[k] for k in replicated if isinstance(view[k], torch.nn.Module)}
        self.buffers = BufferKeeper(modules)

    def _optimizer_starting(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # From here until the next completed step, this rank's parameters are no completed step's. Its
        # gradients are exchanged: should it die now, its peers complete this step without it, so its
        # state as the step began goes out first (see gpuguard.peers._records).
        if self.in_optimizer_step:  # a second optimizer in the same step
            return
        self.in_optimizer_step = True
        if self._view is not None:
            entries = {k: self._view[k] for k in self._per_rank if k in self._view}
            self.records.keep_provisional(capture(self.rank, self.last_step + 1, entries))

    def subscribe(self, callback: Callable[[Alarm], None]) -> None:
        """``callback(alarm)`` on the watch thread when a peer is lost (the guard wakes its training thread)."""
        self._on_alarm.append(callback)
        if self.watch.alarm is not None:
            callback(self.watch.alarm)

    def _alarm(self, alarm: Alarm) -> None:
        log.error("gpuguard: peer rank %d lost (%s): abandoning every collective", alarm.lost, alarm.why)
        self._abandon()
        for callback in self._on_alarm:
            callback(alarm)

    def _abandon(self) -> None:
        with self._abandoning:
            if self.abandoned is not None:
                return
            self.abandoned = abandon_collectives(
                set(self.watch.listeners), self.watch.peer_listeners(), self.watch.keep_ports
            )
            log.warning("gpuguard: collectives abandoned (%s)", self.abandoned)

    @property
    def alarmed(self) -> bool:
        return self.watch.alarm is not None

    def stop(self, *, goodbye: bool = True) -> None:
        """Stop watching; ``goodbye`` unless this rank is leaving on an error of its own (see `PeerWatch.stop`)."""
        self.watch.stop(goodbye=goodbye)

    # -- the training thread --------------------------------------------------------------------

    def completed(self, step: int, view: Mapping[str, Any]) -> bool:
        """This rank completed ``step``: keep and mirror its per-rank state (before `guard.step` returns).

        Returns whether a peer is lost (the guard leaves through `survive` then).
        """
        try:
            self.records.keep(capture(self.rank, step, {k: view[k] for k in self._per_rank if k in view}))
        except UnsupportedStateError as exc:  # the state changed since the guard checked it: said once
            if self.records.mirrored:
                self.records.stop_mirroring(str(exc))
        self._view = view
        self.last_step = step
        self.in_optimizer_step = False
        self.watch.step = step
        if self.buffers is not None:
            self.buffers.completed()
        return self.watch.alarm is not None

    def lost_a_peer(self, wait_s: float) -> bool:
        """Whether a peer is lost, waiting up to ``wait_s`` for the watch to tell (after a collective's error)."""
        return self.watch.wait_for_alarm(wait_s) is not None

    def survive(
        self,
        store: Any,
        view: Mapping[str, Any],
        *,
        budget_s: float,
        evidence: Mapping[str, Any] | None = None,
    ) -> SurvivorOutcome:
        """Agree with the other survivors and write (or not) the checkpoint of the last completed step.

        Never raises for what the survivors cannot do: the outcome says it.
        """
        started = time.time()
        alarm = self.watch.wait_for_alarm(0) or Alarm(-1, self.rank, "unknown", started)
        deadline = time.monotonic() + budget_s
        self._abandon()
        abandoned = store.abandon_in_flight()
        if abandoned:
            log.warning("gpuguard: saves in flight that will never commit: %s", ", ".join(abandoned))
        holds = None if self.in_optimizer_step else self.last_step
        pre = self.records.provisional()
        checkin = CheckIn(
            self.rank,
            self.last_step,
            holds,
            self.records.held(),
            None if pre is None else pre.step,
            tuple(sorted(self.records.exact)),
            tuple(sorted(self.records.differed)),
        )
        timings = {"alarm_at": alarm.at, "survive_at": started}
        try:
            flat = replicated_state(view, self.buffers)
            groups = replica_groups(flat.tensors, self.world_size, self.replicated)
        except Exception as exc:  # a framework's state_dict() on a state the loss interrupted: say it, leave 75
            log.exception("gpuguard: this survivor could not take its state apart")
            message = f"{_peers((alarm.lost,))} lost; this survivor could not take its state apart: {exc!r}"
            return SurvivorOutcome("failed", message, alarm, timings=timings)
        try:
            decision = _agree.agree(
                self.channel,
                self.watch,
                self.records,
                checkin,
                world_size=self.world_size,
                groups=groups,
                checkpoint_id=self.checkpoint_id,
                checkin_s=max(5.0, 2 * self.watch.timeout_s),
                deadline=deadline,
            )
        except (SideChannelError, TimeoutError, GpuGuardError) as exc:
            return SurvivorOutcome("failed", f"the survivors could not agree: {exc}", alarm, timings=timings)
        timings["agreed_at"] = time.time()
        if isinstance(decision, Cannot):
            message = f"{_peers(decision.lost)} lost; no survivor checkpoint: {decision.reason}"
            return SurvivorOutcome(
                "cannot", message, alarm, members=decision.members, lost=decision.lost, timings=timings
            )
        if self.rank not in decision.members:
            message = f"{_peers(decision.lost)} lost; this rank checked in too late to take part"
            return SurvivorOutcome("excluded", message, alarm, lost=decision.lost, timings=timings)
        modules = [k for k, v in view.items() if isinstance(v, torch.nn.Module)]
        return self._write(store, decision, flat, list(view), modules, alarm, timings, deadline, evidence)

    def _write(
        self,
        store: Any,
        plan: Plan,
        flat: FlatState,
        order: list[str],
        modules: list[str],
        alarm: Alarm,
        timings: dict[str, float],
        deadline: float,
        evidence: Mapping[str, Any] | None,
    ) -> SurvivorOutcome:
        replayed = self._steps_replayed(plan)
        facts = {
            "sudden_loss": {
                "lost": list(plan.lost),
                "survivors": list(plan.members),
                "step": plan.step,
                "alarm": alarm.why,
            },
            **dict(evidence or {}),
        }
        if plan.provisional:
            log.warning(
                "gpuguard: rank(s) %s left step %d inside its optimizer step: their per-rank state is the copy taken "
                "as that optimizer step began, which on every survivor equalled the state at the step's end",
                _ranks(plan.provisional),
                plan.step,
            )
        others = [v for v in plan.assigned(self.rank) if v != self.rank]
        unsharded = plain_tensors(flat.tensors, modules) if others and not self.replicated else []
        if unsharded:
            log.warning(
                "gpuguard: the tensors of rank(s) %s that are not DTensors (%s%s) are written from rank %d's copy: "
                "FSDP2 keeps buffers such as BatchNorm's statistics per rank, so rank(s) %s resume with rank %d's",
                _ranks(others),
                ", ".join(unsharded[:3]),
                f" and {len(unsharded) - 3} more" if len(unsharded) > 3 else "",
                self.rank,
                _ranks(others),
                self.rank,
            )
        info = None
        try:
            pendings = []
            for virtual in plan.assigned(self.rank):
                record = self.records.record(virtual, plan.step, provisional=virtual in plan.provisional)
                if record is None:
                    raise CheckpointError(f"rank {virtual}'s per-rank state at step {plan.step} is not readable")
                part = record.checkpoint_part()
                tree: dict[str, Any] = {}
                for key in order:
                    source = flat.tree if key in flat.tree else part.tree
                    if key not in source:
                        raise CheckpointError(f"rank {virtual}'s state at step {plan.step} has no entry {key!r}")
                    tree[key] = source[key]
                tree[RNG_KEY] = part.tree[RNG_KEY]
                pendings.append(
                    store._save_flat(
                        FlatState(
                            {**flat.tensors, **part.tensors},
                            tree,
                            {**flat.devices, **part.devices},
                            [*flat.storages, *part.storages],
                            per_rank=frozenset(part.tree),  # the record's entries: every one is per rank
                        ),
                        plan.step,
                        reason="emergency",
                        evidence=facts,
                        rank=virtual,
                        world_size=self.world_size,
                        checkpoint_id=plan.checkpoint_id,
                        replicated=self.replicated,
                        commit_timeout_s=max(1.0, deadline - time.monotonic()),
                        attempt=plan.attempt,
                    )
                )
            for pending in pendings:
                result = pending.wait(timeout=max(0.1, deadline - time.monotonic()))
                info = info or result
        except Exception as exc:  # the job leaves all the same; the next run resumes from an older checkpoint
            why = reason_of(exc) + self._also_lost(plan)
            log.error("gpuguard: the survivors' checkpoint of step %d failed on rank %d: %s", plan.step, self.rank, why)
            if self.rank == plan.committer:
                _agree.announce(self.channel, {"committed": False, "error": why})
            return SurvivorOutcome(
                "failed",
                f"{_peers(plan.lost)} lost; the survivors' checkpoint of step {plan.step} failed: {why}",
                alarm,
                members=plan.members,
                lost=plan.lost,
                timings=timings,
            )
        if self.rank == plan.committer:
            timings["committed_at"] = time.time()
            _agree.announce(self.channel, {"committed": True, "id": plan.checkpoint_id, "at": timings["committed_at"]})
            word: dict[str, Any] | None = {"committed": True}
        else:
            word = _agree.wait_announced(self.channel, deadline)
            if word and "at" in word:
                timings["committed_at"] = float(word["at"])
        if not word or not word.get("committed"):
            why = (word or {}).get("error") or "the committing rank did not say it committed in time"
            why += "" if "also lost" in why else self._also_lost(plan)
            message = (
                f"{_peers(plan.lost)} lost; the survivors' checkpoint of step {plan.step} was not committed: {why}"
            )
            return SurvivorOutcome("failed", message, alarm, members=plan.members, lost=plan.lost, timings=timings)
        message = (
            f"{_peers(plan.lost)} lost at step {plan.step}, checkpoint of step {plan.step} committed by "
            f"{_peers(plan.members, 'rank')}"
        )
        return SurvivorOutcome(
            "saved",
            message,
            alarm,
            step=plan.step,
            checkpoint_id=plan.checkpoint_id,
            checkpoint=info,
            members=plan.members,
            lost=plan.lost,
            steps_replayed=replayed,
            timings=timings,
        )

    def _also_lost(self, plan: Plan) -> str:
        """``; peer rank 3 also lost during the save`` when a rank outside the plan's lost ones died since."""
        also = sorted(set(self.watch.dead) - set(plan.lost))
        return f"; {_peers(also)} also lost during the save" if also else ""

    def _steps_replayed(self, plan: Plan) -> int:
        """Steps a resume computes again: the one the job was in when the peer died, and any step some rank
        completed after the saved one (none, unless a rank died before its state of that step was out)."""
        newest = plan.step
        for rank in range(self.world_size):
            heard = self.watch.last_heard.get(rank)
            if heard is not None:
                newest = max(newest, int(heard.get("step", -1)))
        return max(newest, self.last_step) - plan.step + 1


def reason_of(exc: BaseException) -> str:
    """An exception as a reason: its message, or its type when it has none (a bare TimeoutError)."""
    text = str(exc).strip()
    return text if text else f"{type(exc).__name__} (no message)"


def _ranks(ranks: tuple[int, ...] | list[int]) -> str:
    return ", ".join(map(str, ranks))


def _peers(ranks: tuple[int, ...] | list[int], word: str = "peer rank") -> str:
    """``peer rank 2``, ``peer ranks 0, 3``."""
    return f"{word}{'s' if len(ranks) != 1 else ''} {_ranks(ranks)}"


def _steps_of(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``step()`` runs its pre-hooks: this one, or the one a wrapper steps (accelerate's
    AcceleratedOptimizer subclasses Optimizer without its constructor and steps ``.optimizer``)."""
    from gpuguard.checkpoint._overlap import hooks_run

    if hooks_run(optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer) and hooks_run(inner):
        return inner
    return optimizer


def _unhookable(view: Mapping[str, Any]) -> str:
    """Why the start of an optimizer step cannot be seen ("" when it can): without it a rank that dies inside
    its step would be taken for one between steps, and its half-applied state saved."""
    from gpuguard.checkpoint._overlap import hooks_run

    for key, value in view.items():
        if isinstance(value, torch.optim.Optimizer) and not hooks_run(_steps_of(value)):
            return (
                f"the optimizer {key!r} ({type(value).__name__}) runs no step pre-hooks, so the start of its "
                "step cannot be seen"
            )
    return ""
