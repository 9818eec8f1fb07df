"""`Guard`: what a training loop imports. Watches, decides, checkpoints every rank at the same step,
and leaves with an exit code the cluster understands."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuguard.checkpoint import CheckpointStore, PendingSave
from gpuguard.checkpoint._crc import crc32c
from gpuguard.checkpoint._manifest import checkpoint_name
from gpuguard.checkpoint.store import CheckpointInfo, SaveTimings
from gpuguard.errors import CheckpointNotFoundError, GpuGuardError
from gpuguard.guard.agreement import NOTHING, Agreed, Agreement
from gpuguard.guard.config import GuardConfig
from gpuguard.guard.policy import CONTINUE, Action, Decision, PolicyLadder
from gpuguard.guard.steptime import SlowdownDetector, StepClock
from gpuguard.health.model import HealthChange, Reason
from gpuguard.health.monitor import HealthMonitor
from gpuguard.plugins import plugin_manager

log = logging.getLogger("gpuguard")


class Evacuation(SystemExit):
    """Raised from `Guard.step` once the emergency checkpoint is durable: the job must leave.

    A ``SystemExit``, so ``finally`` blocks run and, uncaught, it ends the process with ``code``:
    75 (reschedule elsewhere) or 76 (restart in place) by default.

    Attributes:
        code: the exit code.
        decision: why.
        step: the step every rank checkpointed.
        checkpoint: the committed checkpoint (on the committing rank), or None.
    """

    def __init__(self, code: int, decision: Decision, step: int, checkpoint: CheckpointInfo | None) -> None:
        super().__init__(code)
        self.decision = decision
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class EvacuationReport:
    """Timings of an evacuation, for logs, demos and benchmarks (seconds)."""

    step: int
    action: str
    decided_at: float | None = None
    stall_s: float = 0.0
    durable_s: float = 0.0
    checkpoint_id: str | None = None
    error: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


class Guard:
    """Watches this job's GPUs and gets the job off a failing one without losing a step.

    Usage::

        with gpuguard.Guard(checkpoint_dir="s3://bucket/run1", state={"model": model, "optimizer": opt}) as guard:
            for step in range(guard.resume(), total_steps):
                train_step()
                guard.step(step)          # after the optimizer step: reads a flag, records the time

    Obligations: call `step` once per training step, on every rank, with the same step numbers,
    after the optimizer step (the checkpoint holds the state *after* ``step``). With
    ``torch.distributed``, initialise the process group before the guard starts.

    Args:
        checkpoint_dir: fsspec URL of the checkpoints (or ``GPUGUARD_CHECKPOINT_DIR``, or the config file).
        state: what to checkpoint: modules, optimizers, schedulers, tensors, JSON-able values.
        config_file: a YAML file of settings (or ``GPUGUARD_CONFIG``).
        nvml: a ``pynvml``-compatible module; `gpuguard.fakenvml.FakeNvml` in tests and demos.
        plugins: objects with ``@gpuguard.hookimpl`` methods.
        **settings: any `GuardConfig` field.

    Raises:
        ConfigError: at construction, naming the setting, the value and what is allowed.

    Example:
        >>> import torch, gpuguard
        >>> model = torch.nn.Linear(4, 4)
        >>> with gpuguard.Guard(checkpoint_dir="memory://doc", state={"model": model}) as guard:
        ...     for step in range(guard.resume(), 3):
        ...         guard.step(step)
    """

    def __init__(
        self,
        checkpoint_dir: str | None = None,
        state: MutableMapping[str, Any] | None = None,
        *,
        config_file: str | Path | None = None,
        nvml: Any = None,
        plugins: Iterable[object] = (),
        **settings: Any,
    ) -> None:
        self.config = GuardConfig.load(config_file, checkpoint_dir=checkpoint_dir, **settings)
        self.state: MutableMapping[str, Any] = state if state is not None else {}
        self.plugins = plugin_manager(plugins)
        self._nvml = nvml
        self.store: CheckpointStore | None = None
        self.kubernetes: Any = None  # the KubernetesPlugin, when a cluster is reachable
        self.monitor: HealthMonitor | None = None
        self.agreement: Agreement | None = None
        self.ladder = PolicyLadder(self.config)
        self.steps = StepClock()
        self.slowdown = SlowdownDetector(self.config, self.steps)
        self.decision: Decision = CONTINUE
        self.decided_at: float | None = None  # the monitor's clock
        self.decided_wall: float | None = None  # time.perf_counter(), for latency measurements
        self.last_evacuation: EvacuationReport | None = None
        self.slowest: tuple[int, float] | None = None  # (rank, step seconds) at the last agreement
        self.periodic: list[PendingSave] = []
        # Read by the hot path: plain attributes, written by the guard thread.
        self._local_action = 0
        self._urgent = False
        self._periodic_due = False
        self._next_check = 0
        self._distributed = False
        self._prepared = False  # until then, every step takes the slow path (once, in fact)
        self._token = ""
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._prepared = False
        self._last_periodic_at = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Guard:
        """Open the store, start watching, and prepare the staging buffer in the background."""
        if self._started:
            return self
        c = self.config
        self.store = CheckpointStore(c.checkpoint_dir, c.storage_options, keep=c.keep)
        self.agreement = Agreement()
        self._distributed = self.agreement.distributed
        self._token = self.agreement.run_token()
        self._connect_kubernetes()
        self.monitor = HealthMonitor(self._nvml, c.health, devices=self._devices())
        self.monitor.start()
        self.monitor.subscribe(self._on_health_change)
        self._schedule_next(-1)
        self._thread = threading.Thread(target=self._watch, name="gpuguard-guard", daemon=True)
        self._thread.start()
        self._started = True
        self._evaluate()
        return self

    def close(self) -> None:
        """Stop watching; wait for periodic checkpoints in flight so a normal end loses none."""
        if not self._started:
            return
        self._started = False
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(5)
        for pending in self.periodic:
            try:
                pending.wait()
            except Exception as exc:
                log.error("periodic checkpoint %s failed: %s", pending.id, exc)
        if self.agreement:
            self.agreement.close()
        if self.monitor:
            self.monitor.stop()
        if self.kubernetes:
            self.kubernetes.stop()
            self.plugins.unregister(self.kubernetes)
            self.kubernetes = None
        if self.store:
            self.store.close()

    def __enter__(self) -> Guard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rank(self) -> int:
        return self.agreement.rank if self.agreement else 0

    @property
    def world_size(self) -> int:
        return self.agreement.world_size if self.agreement else 1

    def _devices(self) -> Any:
        import os

        if self.config.devices != "job":
            return self.config.devices
        # One GPU per rank is the torchrun convention: without CUDA to ask, LOCAL_RANK names it.
        from gpuguard.health.devices import job_device_selection

        selection = job_device_selection()
        if selection is None and "LOCAL_RANK" in os.environ:
            return [int(os.environ["LOCAL_RANK"])]
        return "job"

    def _connect_kubernetes(self) -> None:
        from gpuguard.errors import KubernetesError
        from gpuguard.k8s.cluster import connect
        from gpuguard.k8s.plugin import KubernetesPlugin

        settings = self.config.kubernetes
        try:
            cluster = connect(settings)
        except KubernetesError as exc:
            if settings.enabled == "on":
                raise
            log.warning("Kubernetes actions are off: %s", exc)
            return
        if cluster is not None:
            self.kubernetes = KubernetesPlugin(cluster)
            self.plugins.register(self.kubernetes)
            self.kubernetes.start()

    def _prepare(self) -> None:
        try:
            assert self.store is not None
            seconds = self.store.prepare(self.state)
            log.info("staging buffer ready in %.2fs", seconds)
        except Exception as exc:  # the first checkpoint will allocate instead; training goes on
            log.warning("could not prepare the staging buffer: %s", exc)

    # -- resume ---------------------------------------------------------------------------------

    def resume(self) -> int:
        """Load the newest committed checkpoint into ``state``; returns the step to run next (0 if none).

        A corrupt newest checkpoint falls back to the one before it.
        """
        if not self._started:
            self.start()
        assert self.store is not None
        try:
            step = self.store.load(self.state, rank=self.rank, fallback=True)
        except CheckpointNotFoundError:
            log.info("no checkpoint under %s: starting from step 0", self.config.checkpoint_dir)
            return 0
        log.info("resumed from step %d", step)
        self._schedule_next(step)
        return step + 1

    # -- the hot path ---------------------------------------------------------------------------

    def step(self, step: int) -> None:
        """Call once per training step, after the optimizer step, on every rank.

        Steady state: records the time and compares two numbers. Every ``sync_every`` steps (or at
        once, in a single process, when something is wrong) it takes the slow path: agree, and if the
        agreement says so, checkpoint and raise `Evacuation`.

        Raises:
            Evacuation: after the emergency checkpoint is durable.
        """
        self.steps.tick(time.perf_counter())
        if step < self._next_check and not self._urgent:
            return
        self._slow_path(step)

    def _slow_path(self, step: int) -> None:
        c = self.config
        if not self._prepared:
            # After the first optimizer step the state has its final shapes (optimizers create their
            # moments lazily): allocate the staging buffer now, in the background, not in an emergency.
            self._prepared = True
            threading.Thread(target=self._prepare, name="gpuguard-prepare", daemon=True).start()
        agreed: Agreed = NOTHING
        if self._distributed:
            if step % c.sync_every == 0:
                assert self.agreement is not None
                recent = self.steps.recent(1)
                agreed = self.agreement.exchange(self._local_action, self._periodic_due, recent[0] if recent else 0.0)
                if agreed.slowest_rank >= 0:
                    self.slowest = (agreed.slowest_rank, agreed.slowest_step_s)
        else:
            agreed = Agreed(self._local_action, 0, self._periodic_due, 0, 0.0)
        self._urgent = False
        if agreed.action:
            self._evacuate(step, agreed)
        periodic = agreed.periodic_due or bool(
            c.checkpoint_every_steps and step > 0 and step % c.checkpoint_every_steps == 0
        )
        if periodic:
            self._periodic_due = False
            self._last_periodic_at = time.monotonic()
            self._save_periodic(step)
        self._schedule_next(step)

    def _schedule_next(self, step: int) -> None:
        c = self.config
        candidates = []
        if self._distributed:
            candidates.append((step // c.sync_every + 1) * c.sync_every)
        if c.checkpoint_every_steps:
            candidates.append((max(step, 0) // c.checkpoint_every_steps + 1) * c.checkpoint_every_steps)
        self._next_check = min(candidates) if candidates else 2**62
        if not self._prepared:
            self._next_check = 0

    # -- checkpoints ----------------------------------------------------------------------------

    def _checkpoint_id(self, step: int, reason: str) -> str:
        # The same on every rank without another collective: derived from the launch's shared token.
        return checkpoint_name(step, f"{crc32c(f'{self._token}:{step}:{reason}'.encode()):08x}")

    def _save_periodic(self, step: int) -> None:
        assert self.store is not None
        self.periodic = [p for p in self.periodic if not p.done()]
        try:
            pending = self.store.save(
                self.state,
                step,
                reason="periodic",
                rank=self.rank,
                world_size=self.world_size,
                checkpoint_id=self._checkpoint_id(step, "periodic"),
                replicated=self.config.replicated,
                overlap_with=self._optimizers() if self.config.overlap_snapshot else (),
            )
        except GpuGuardError as exc:
            log.error("periodic checkpoint at step %d not taken: %s", step, exc)
            return
        pending.add_done_callback(self._report_periodic)
        if self.rank == 0:
            pending.add_done_callback(self._after_periodic)
        self.periodic.append(pending)

    def _optimizers(self) -> list[Any]:
        import torch

        return [v for v in self.state.values() if isinstance(v, torch.optim.Optimizer)]

    def _report_periodic(self, pending: PendingSave) -> None:
        error = pending.exception()
        info = None if error is not None else pending.wait(0)
        self.plugins.hook.gpuguard_checkpoint_finished(
            step=pending.step, reason="periodic", info=info, timings=pending.timings, error=error
        )

    def _after_periodic(self, pending: PendingSave) -> None:
        error = pending.exception()
        if error is not None:
            log.error("periodic checkpoint %s failed: %s", pending.id, error)
            return
        try:
            assert self.store is not None
            self.store.prune()
        except Exception as exc:
            log.warning("pruning old checkpoints failed: %s", exc)

    def _evacuate(self, step: int, agreed: Agreed) -> None:
        c = self.config
        action = Action(agreed.action)
        decision = (
            self.decision
            if self.decision.action == action
            else Decision(
                action,
                action.name.lower(),
                f"rank {agreed.decided_by} decided to {action.name.lower()}",
                evidence={"decided_by_rank": agreed.decided_by},
            )
        )
        code = c.reschedule_exit_code if action is Action.RESCHEDULE else c.restart_exit_code
        evidence = {**decision.to_dict(), "rank": self.rank, "decided_by_rank": agreed.decided_by}
        if self.slowest is not None:  # across ranks, who was slowest at the last agreement
            evidence["slowest_rank"], evidence["slowest_step_ms"] = self.slowest[0], round(self.slowest[1] * 1000, 3)
        report = EvacuationReport(step, action.name, self.decided_at, evidence=evidence)
        log.warning("evacuating at step %d (%s, exit %d): %s", step, action.name, code, decision.message)
        self.plugins.hook.gpuguard_before_checkpoint(step=step, reason="emergency", evidence=evidence)
        info: CheckpointInfo | None = None
        try:
            assert self.store is not None
            started = time.perf_counter()
            pending = self.store.save(
                self.state,
                step,
                reason="emergency",
                evidence=evidence,
                rank=self.rank,
                world_size=self.world_size,
                checkpoint_id=self._checkpoint_id(step, "emergency"),
                replicated=self.config.replicated,
                commit_timeout_s=c.commit_timeout_s,
            )
            report.stall_s = pending.timings.stall_s
            report.checkpoint_id = pending.id
            info = pending.wait(timeout=c.commit_timeout_s + 60)
            report.durable_s = time.perf_counter() - started
        except Exception as exc:  # the job must leave the bad GPU all the same; resume uses the last good one
            report.error = str(exc)
            log.error("emergency checkpoint at step %d failed: %s; leaving anyway", step, exc)
        self.plugins.hook.gpuguard_after_checkpoint(step=step, reason="emergency", info=info)
        self.plugins.hook.gpuguard_checkpoint_finished(
            step=step,
            reason="emergency",
            info=info,
            timings=SaveTimings(report.stall_s, report.durable_s),
            error=RuntimeError(report.error) if report.error else None,
        )
        self.last_evacuation = report
        self.plugins.hook.gpuguard_on_evacuation(decision=decision, exit_code=code, checkpoint=info)
        raise Evacuation(code, decision, step, info)

    # -- the guard's thread ---------------------------------------------------------------------

    def _on_health_change(self, change: HealthChange) -> None:
        self._wake.set()

    def _watch(self) -> None:
        interval = self.config.health.poll_interval_s
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._evaluate()
            except Exception as exc:  # never into the training thread
                log.error("gpuguard: deciding failed: %s", exc, exc_info=exc)

    def _evaluate(self) -> None:
        assert self.monitor is not None
        snapshot = self.monitor.snapshot()
        extra: dict[str, list[Reason]] = {}
        for device in snapshot.devices:
            slow = self.slowdown.check(list(device.readings.get("clock_events", [])))
            if slow is not None:
                extra.setdefault(device.uuid, []).append(slow)
        for found in self.plugins.hook.gpuguard_health_reasons(snapshot=snapshot):
            for uuid, reasons in (found or {}).items():
                extra.setdefault(uuid, []).extend(reasons)
        decision = self.ladder.decide(snapshot, self.monitor.clock(), extra)
        override = self.plugins.hook.gpuguard_decide(decision=decision, snapshot=snapshot)
        if isinstance(override, Decision):
            decision = override
        if decision.action and not self._local_action:
            self.decided_at = self.monitor.clock()
            self.decided_wall = time.perf_counter()
            log.warning("gpuguard decided to %s: %s", decision.action.name.lower(), decision.message)
        self.decision = decision
        self._local_action = int(decision.action)
        every_s = self.config.checkpoint_every_s
        if every_s and time.monotonic() - self._last_periodic_at >= every_s:
            self._periodic_due = True
        if not self._distributed and (self._local_action or self._periodic_due):
            self._urgent = True  # one process needs no agreement: act at the next step


__all__ = ["Evacuation", "EvacuationReport", "Guard"]
