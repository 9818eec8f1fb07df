"""`Guard`: what a training loop imports. Watches, decides, checkpoints every rank at the same step,
and leaves with an exit code the cluster understands."""

from __future__ import annotations

import logging
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any, NoReturn

import torch

from gpuguard.checkpoint import CheckpointInfo, CheckpointStore, PendingSave
from gpuguard.checkpoint._collective import default_group
from gpuguard.checkpoint._crc import crc32c
from gpuguard.checkpoint._manifest import checkpoint_name
from gpuguard.checkpoint._sharding import check_sharding
from gpuguard.checkpoint._tiered import load_tiered
from gpuguard.checkpoint._tree import flatten
from gpuguard.errors import CheckpointCorruptError, CheckpointNotFoundError, GpuGuardError
from gpuguard.guard._checks import (
    check_preemption_bound,
    check_save_fits_deadline,
    estimate_save_against_deadline,
    odd_step,
    say_what_is_watched,
)
from gpuguard.guard._evacuation import Evacuation, EvacuationReport, describe, evacuate
from gpuguard.guard._exit import close_at_exit
from gpuguard.guard._failures import BackgroundFailures
from gpuguard.guard._local_tier import LocalTier, open_local_tier
from gpuguard.guard._loss_window import LossRing, PendingCheck, arm, window_extra, window_of
from gpuguard.guard._loss_window import check as check_losses
from gpuguard.guard._sanity import non_finite, ranks_failing
from gpuguard.guard._signals import PreemptionSignals, signal_name
from gpuguard.guard._state import check_state, checkpointable, write_back
from gpuguard.guard._sudden import health_words, peer_lost_behind, start_sudden_loss, survive
from gpuguard.guard.agreement import NOTHING, Agreed, Agreement
from gpuguard.guard.config import GuardConfig
from gpuguard.guard.policy import CONTINUE, Action, Decision, PolicyLadder
from gpuguard.guard.steptime import Peers, SlowdownDetector, StepClock
from gpuguard.health.model import HealthChange, Reason
from gpuguard.health.monitor import HealthMonitor
from gpuguard.peers.sudden import SuddenLoss
from gpuguard.plugins import plugin_manager

log = logging.getLogger("gpuguard")


class Guard:
    """Watches this job's GPUs and gets the job off a failing one without losing a step.

    Usage::

        with gpuguard.Guard(checkpoint_dir="s3://bucket/run1", state={"model": model, "optimizer": opt}) as guard:
            for step in range(guard.resume(), total_steps):
                train_step()
                guard.step(step)          # after the optimizer step: reads a flag, records the time

    Obligations: call `step` once per training step, on every rank, with the same increasing step
    numbers, after the optimizer step (the checkpoint holds the state *after* ``step``). With
    ``torch.distributed``, initialise the process group before the guard starts. Start the guard on
    the main thread, so it can catch SIGTERM (``preemption_signals``).

    Args:
        checkpoint_dir: fsspec URL of the checkpoints (or ``GPUGUARD_CHECKPOINT_DIR``, or the config file).
        state: what to checkpoint: modules, optimizers, schedulers, data loaders and anything with
            ``state_dict``/``load_state_dict``, ``torch.Generator``, tensors, dicts (restored in
            place), JSON-able values. Checked when the guard starts.
        config_file: a YAML file of settings (or ``GPUGUARD_CONFIG``).
        nvml: a ``pynvml``-compatible module; `gpuguard.fakenvml.FakeNvml` in tests and demos.
        plugins: objects with ``@gpuguard.hookimpl`` methods.
        **settings: any `GuardConfig` field.

    Raises:
        ConfigError: at construction, naming the setting, the value and what is allowed.
        UnsupportedStateError: at `start`, naming the path of a value a checkpoint cannot hold.

    Example:
        >>> import torch, gpuguard
        >>> model = torch.nn.Linear(4, 4)
        >>> with gpuguard.Guard(checkpoint_dir="memory://doc", state={"model": model}) as guard:
        ...     for step in range(guard.resume(), 3):
        ...         guard.step(step)
    """

    def __init__(
        self,
        checkpoint_dir: str | Path | None = None,
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
        self.local: LocalTier | None = None  # the node-local tier (``local_dir``), when on
        self.restored_tier: str | None = None  # the tier this rank's last `resume` loaded from
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
        self._periodic_count = 0  # periodic saves taken: every ``object_store_every``-th goes to object storage
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
        self._last_periodic_at = time.monotonic()
        # Decisions from outside the ladder (a preemption signal, `request_evacuation`): sticky, and
        # a separate int so the guard thread's ladder verdicts never overwrite them.
        self._forced: Decision | None = None
        self._forced_action = 0
        self._preempted: tuple[int, float] | None = None  # (signal, time.monotonic())
        self._signals: PreemptionSignals | None = None
        self._last_step = -1
        self._resumed_step: int | None = None
        self._reported: set[str] = set()
        self._evacuating = False
        self._sudden: SuddenLoss | None = None  # with several ranks: surviving a peer's sudden death
        self._failed = False  # leaving on an error of this rank's own: its peers must see it as lost
        self.failures = BackgroundFailures()  # the guard's background threads: logged once, then counted
        self._losses = LossRing()  # the losses step() was given: detached references, no sync (_loss_window)
        self._loss_check: PendingCheck | None = None  # after a resume: the loss check still to come
        self._unchecked: list[str] = []  # checkpoints taken since the resume, before its loss check

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Guard:
        """Open the store, start watching, and prepare the staging buffer in the background."""
        if self._started:
            return self
        c = self.config
        check_state(self.state)  # before anything starts: a state that cannot be saved fails now, not in an emergency
        check_sharding(self.state)  # issue 13: refuse DTensor placements no checkpoint could place, now
        self.store = CheckpointStore(c.checkpoint_dir, c.storage_options, keep=c.keep)
        if c.checkpoint_dir.startswith("memory://"):
            # fsspec's memory file system lives in this process: what the guard saves there is gone with it,
            # so an evacuation's "the next run resumes from ..." would not hold. Fine for tests, said loudly.
            log.warning(
                "gpuguard: checkpoint_dir %s is in this process's memory: its checkpoints end with the process, "
                "and a restarted or rescheduled pod starts from step 0; use object storage or a persistent volume",
                c.checkpoint_dir,
            )
        self.agreement = Agreement()
        self._distributed = self.agreement.distributed
        self._token = self.agreement.run_token()
        self._open_local_tier()
        self._connect_kubernetes()
        self.monitor = HealthMonitor(self._nvml, c.health, devices=self._devices())
        self.monitor.start()
        self.monitor.subscribe(self._on_health_change)
        say_what_is_watched(self.monitor.snapshot(), c.health.fail_mode)
        if self._distributed:
            self._sudden = start_sudden_loss(
                c,
                checkpointable(self.state),
                rank=self.rank,
                world_size=self.world_size,
                token=self._token,
                checkpoint_id=lambda step: self._checkpoint_id(step, "survivors"),
                health=lambda: health_words(self.monitor),
            )
            if self._sudden is not None:
                self._sudden.subscribe(lambda alarm: self._wake_for_peer_loss())
        self._signals = PreemptionSignals(c.preemption_signals, self._on_preemption_signal)
        self._signals.install()
        if c.termination_grace_s is not None and c.preemption_deadline_s >= c.termination_grace_s:
            log.warning(
                "gpuguard: preemption_deadline_s=%gs does not fit in the pod's grace period of %gs: the kubelet "
                "may kill the job before its emergency checkpoint commits; lower the deadline or raise "
                "terminationGracePeriodSeconds",
                c.preemption_deadline_s,
                c.termination_grace_s,
            )
        self._schedule_next(-1)
        self._thread = threading.Thread(target=self._watch, name="gpuguard-guard", daemon=True)
        self._thread.start()
        self._started = True
        close_at_exit(self)
        try:
            self._evaluate()  # on the caller's thread: a plugin that fails here fails the start
        except BaseException:
            self.close()  # and leaves no thread behind
            raise
        return self

    def close(self, timeout_s: float | None = None) -> None:
        """Stop watching; wait for periodic checkpoints in flight so a normal end loses none.

        Args:
            timeout_s: the longest to wait for them (``commit_timeout_s`` by default); one not
                committed by then is named in the log, with the checkpoint a resume would use.
        """
        if not self._started:
            return
        self._started = False
        self._next_check = 0  # a step() after close() takes the slow path, which refuses it
        self._stop.set()
        self._wake.set()
        if self._signals is not None:
            self._signals.restore()
        if self._thread:
            self._thread.join(5)
        if self._sudden is not None:
            self._sudden.stop(goodbye=not self._failed)
        settled = self._wait_for_periodic(self.config.commit_timeout_s if timeout_s is None else timeout_s)
        if self.local is not None:
            self.local.wait(self.config.commit_timeout_s if timeout_s is None else timeout_s)
            self.local.close()
        if self.last_evacuation is not None and self.last_evacuation.error is not None:
            settled = False  # an abandoned emergency save's writer may still be in a storage call
        if self.agreement:
            self.agreement.close()
        if self.monitor:
            self.monitor.stop()
        if self.kubernetes:
            self.kubernetes.stop()
            self.plugins.unregister(self.kubernetes)
            self.kubernetes = None
        self.failures.summary()
        if self.store:
            store = self.store
            closer = threading.Thread(target=store.close, name="gpuguard-store-close", daemon=True)
            closer.start()
            # A stuck upload must not hold the exit: the store's close waits for it, so only so long.
            closer.join(None if settled else 1.0)
        self._redeliver_preemption()

    def _redeliver_preemption(self) -> None:
        """A SIGTERM that came after the last step() was caught and never acted on: the pod is still
        going away, so deliver it again now that the default action is back (never swallow it)."""
        if self._preempted is None or self._evacuating:
            return
        signum = self._preempted[0]
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signum) == signal.SIG_DFL:
            log.warning(
                "gpuguard: %s came after the last step(); delivering it again now that the guard is closed",
                signal_name(signum),
            )
            os.kill(os.getpid(), signum)

    def _wait_for_periodic(self, timeout_s: float) -> bool:
        """Wait for the periodic saves in flight, within ``timeout_s``; True when none is left running."""
        settled = True
        deadline = time.monotonic() + timeout_s
        for pending in self.periodic:
            try:
                info = pending.wait(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                settled = False
                log.error(
                    "gpuguard: periodic checkpoint %s (step %d) not committed within %.0fs; %s",
                    pending.id,
                    pending.step,
                    timeout_s,
                    self.resume_point_text(),
                )
            except Exception as exc:  # on the way out: said (a bug with its traceback), and the close goes on
                expected = isinstance(exc, GpuGuardError)
                log.error(
                    "gpuguard: periodic checkpoint %s (step %d) failed: %s",
                    pending.id,
                    pending.step,
                    exc,
                    exc_info=None if expected else exc,
                )
            else:
                log.info("gpuguard: periodic checkpoint %s (step %d) committed", info.id, pending.step)
        self.periodic = []
        return settled

    def _resume_point(self) -> dict[str, Any] | None:
        """The checkpoint the next pod will resume from (a storage read: only on the way out)."""
        assert self.store is not None
        try:
            latest = self.store.latest()
        except GpuGuardError as exc:
            return {"error": f"cannot list checkpoints: {exc}"}
        except Exception as exc:  # on the way out (an evacuation, a close): said with its traceback, not raised
            log.error("gpuguard: listing checkpoints failed: %r", exc, exc_info=exc)
            return {"error": f"cannot list checkpoints: {type(exc).__name__}: {exc} (a bug; traceback in the log)"}
        return None if latest is None else {"id": latest.id, "step": latest.step, "reason": latest.reason}

    def resume_point_text(self) -> str:
        """Which checkpoint the next run will resume from, in words (reads the storage)."""
        return describe(self._resume_point())

    def __enter__(self) -> Guard:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            # A collective that failed because a peer died (or was abandoned when one did): the survivors'
            # checkpoint and exit 75 replace the error.
            if isinstance(exc, BaseException) and self._peer_was_lost(exc):
                self._leave_after_sudden_loss()
            self._failed = isinstance(exc, BaseException) and not isinstance(exc, Evacuation)
        finally:
            # Leaving on an evacuation (or any error): the GPU may be bad and the pod may be going away,
            # so periodic saves still in flight get a short bound; the emergency one is already durable.
            self.close(None if exc is None else min(10.0, self.config.commit_timeout_s))

    def _peer_was_lost(self, exc: BaseException) -> bool:
        if self._sudden is None or self._evacuating or not self._started or isinstance(exc, Evacuation):
            return False
        return peer_lost_behind(exc, self._sudden, self.config)

    def _leave_after_sudden_loss(self) -> NoReturn:
        assert self._sudden is not None and self.store is not None
        self._evacuating = True
        if self.agreement is not None:
            self.agreement.abandon()
        report, evacuation = survive(
            self._sudden,
            self.store,
            checkpointable(self.state),
            config=self.config,
            plugins=self.plugins,
            step=self._last_step,
            preempted_at=self._preempted[1] if self._preempted is not None else None,
        )
        self.last_evacuation = report
        raise evacuation

    def _wake_for_peer_loss(self) -> None:
        # On the watch thread: the training thread takes the slow path at its next step().
        self._urgent = True
        self._next_check = 0

    # -- acting from outside the training loop -------------------------------------------------

    def checkpoint_now(self) -> None:
        """Take a periodic-style checkpoint soon: at the next step in one process, at the next
        agreement (within ``sync_every`` steps) with several ranks. Safe from any thread."""
        self._periodic_due = True
        if not self._distributed:
            self._urgent = True

    def request_evacuation(self, reason: str) -> None:
        """Leave through the ladder's reschedule path: every rank checkpoints one agreed step, then
        `step` raises `Evacuation` with ``reschedule_exit_code``. Safe from any thread.

        Args:
            reason: one sentence for the log, the checkpoint's evidence and the Kubernetes Event.
        """
        self._force(Decision(Action.RESCHEDULE, "reschedule", str(reason), evidence={"requested": True}))

    def _force(self, decision: Decision) -> None:
        if self._forced is None or decision.action > self._forced.action:
            self._forced = decision
        self._forced_action = max(self._forced_action, int(decision.action))
        if not self._distributed:
            self._urgent = True

    def _on_preemption_signal(self, signum: int) -> None:
        # In a signal handler: record and return; the training thread acts at its next step().
        if self._preempted is None:
            self._preempted = (signum, time.monotonic())
        name = signal_name(signum)
        self._force(
            Decision(
                Action.RESCHEDULE,
                "reschedule",
                f"{name} received: the pod is being stopped (preemption, eviction or node drain)",
                evidence={"signal": name, "preemption_deadline_s": self.config.preemption_deadline_s},
            )
        )

    @property
    def running(self) -> bool:
        """Started and not yet closed."""
        return self._started

    @property
    def rank(self) -> int:
        return self.agreement.rank if self.agreement else 0

    @property
    def world_size(self) -> int:
        return self.agreement.world_size if self.agreement else 1

    def _devices(self) -> Any:
        # "job": this job's GPUs from CUDA, CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES and LOCAL_RANK
        # (an index into the visible list), resolved by the monitor (gpuguard.health.devices).
        return self.config.devices

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

    def _open_local_tier(self) -> None:
        """The local tier, on every rank or on none: whether a periodic save goes to object storage (a
        collective) must be the same answer on every rank, so one rank that cannot open its tier turns it
        off everywhere (one small gather at start)."""
        if self.config.local_dir is None:
            return
        self.local = open_local_tier(self.config, checkpointable(self.state), self.rank, self.world_size)
        without = ranks_failing(default_group(self.world_size), self.local is None)
        if without and self.local is not None:
            log.warning(
                "gpuguard: the local tier is off on every rank: rank(s) %s could not open theirs (said in their log)",
                without,
            )
            self.local.close()
            self.local = None

    def _prepare(self) -> None:
        """Plan the staging buffer here, on the training thread at a step boundary; allocate it in the background.

        Walking the state calls ``state_dict()`` and the hooks behind it: FSDP2's swap its parameters
        between sharded and unsharded, so they must never run while forward or backward computes (on
        another thread they crashed FSDP2 training). What the background threads get is the layout
        (to allocate) and its size (to estimate a save's time against the preemption deadline).
        """
        assert self.store is not None
        try:
            seconds = self.store.prepare(checkpointable(self.state), background=True, replicated=self.config.replicated)
            log.info("staging buffer planned in %.3fs on the training thread; allocating in the background", seconds)
        except (GpuGuardError, MemoryError, torch.cuda.OutOfMemoryError) as exc:  # the first save allocates instead
            log.warning("could not prepare the staging buffer: %s", exc)
            return
        except Exception as exc:  # a bug: said with its traceback, and training goes on (the first save plans)
            self.failures.failed("preparing the staging buffer", exc)
            return
        if self.local is not None:  # its own buffer (no collective); a failure here only costs the first local save
            try:
                self.local.prepare(checkpointable(self.state))
            except (GpuGuardError, MemoryError, torch.cuda.OutOfMemoryError) as exc:
                log.warning("could not prepare the local tier's staging buffer: %s", exc)
        if self.rank == 0:  # rank 0 speaks for the job; the probe writes to storage: never on the training thread
            threading.Thread(target=self._estimate_save_time, name="gpuguard-estimate", daemon=True).start()

    def _estimate_save_time(self) -> None:
        """The state's size is known now: warn at once when its save would not fit the preemption
        deadline (a measured save's time is checked again later)."""
        assert self.store is not None
        try:
            if estimate_save_against_deadline(self.config, self.store):
                self._reported.add("deadline")
        except Exception as exc:  # a background thread: said with its traceback, never raised into training
            if self._stop.is_set():
                # The guard closed (and its store with it) while the probe ran: a short run, not a bug.
                log.debug("gpuguard: the save-time estimate was cut short by close(): %s", exc)
                return
            self.failures.failed("estimating a checkpoint's save time", exc)

    # -- resume ---------------------------------------------------------------------------------

    def resume(self) -> int:
        """Load the newest committed checkpoint into ``state``; returns the step to run next (0 if none).

        With a process group, every rank calls it and every rank returns the same step: the newest
        checkpoint whose part every rank read and verified. When some rank's part is corrupt, all
        ranks fall back together to the same older one, and every rank logs which, whose part and
        why. When none can be loaded, every rank raises; only when no rank finds any checkpoint do
        all start from step 0.

        With a local tier (``local_dir``), a rank's candidates are the checkpoints committed in its own
        local tier and in object storage (the same id names the same save in both); every rank takes the
        newest id that every rank lists and verified, each from its local copy when that one verifies,
        else from object storage. A tier whose copy fails is named (rank, tier, id, why); each rank logs
        the tier it restored from (`restored_tier`).

        After the load, every rank checks its parameters and optimizer state for NaN and inf; a
        checkpoint that fails on any rank is demoted (logged on every rank, with the ranks and tensors)
        and every rank loads the next older verified one. Demotions are recorded in storage
        (`CheckpointStore.demote`): no later run loads a demoted checkpoint either.

        When the checkpoint recorded a loss window (the losses passed to `step`) and ``loss_gate`` is on,
        the loss check follows: at step ``resumed + loss_check_steps`` the ranks compare their losses since
        the restore with that window, and a checkpoint far outside it on any rank is demoted and every
        rank leaves with `Evacuation` (``restart_exit_code``), to resume from the next older one.

        Raises:
            CheckpointCorruptError: no committed checkpoint could be loaded on every rank, or every one
                was demoted (now or by an earlier run): never a silent start from step 0.
            CheckpointError: another rank failed (its error's kind, naming the rank).
            StorageError: the storage failed (never read as "no checkpoint").
            GpuGuardError: called after `step`: the load would roll the trained state back.
        """
        if not self._started:
            self.start()
        assert self.store is not None
        if self._last_step != (-1 if self._resumed_step is None else self._resumed_step):
            # Loading now would put the newest checkpoint over the live state: training silently rolled back.
            raise GpuGuardError(
                f"guard.resume() called after guard.step({self._last_step}): it would load the newest checkpoint "
                "over the state the loop has trained since, rolling training back; call resume() once, before "
                "the loop (`for step in range(guard.resume(), total_steps):`)"
            )
        demoted: list[str] = []
        while True:
            view = checkpointable(self.state)
            before = dict(view)
            loaded_id: str | None
            try:
                if self.local is not None:
                    restored = load_tiered(
                        self.local.store, self.store, view, rank=self.rank, world_size=self.world_size, exclude=demoted
                    )
                    step, loaded_id, self.restored_tier = restored.step, restored.id, restored.tier
                    loaded_extra = restored.extra
                else:
                    step = self.store.load(view, rank=self.rank, fallback=True, exclude=demoted)
                    loaded_id, self.restored_tier = self.store.last_loaded_id, "object storage"
                    loaded_extra = self.store.last_loaded.extra if self.store.last_loaded is not None else {}
            except CheckpointNotFoundError:
                # Never a silent start from step 0 when what there was was found bad (now, or by an earlier run:
                # a plain load raises CheckpointCorruptError itself; a tiered one may list local copies only).
                earlier = [] if demoted else sorted(self.store.demoted())
                if demoted or earlier:
                    raise CheckpointCorruptError(
                        f"every committed checkpoint under {self.config.checkpoint_dir} was demoted after restore: "
                        f"{', '.join(demoted or earlier)} (demoted/ there says why; delete a marker to trust its "
                        "checkpoint again)"
                    ) from None
                log.warning(
                    "gpuguard: no committed checkpoint under %s: starting from step 0", self.config.checkpoint_dir
                )
                return 0
            write_back(self.state, before, view)
            bad = non_finite(self.state)
            failing = ranks_failing(default_group(self.world_size), bool(bad))
            if not failing:
                break
            loaded = loaded_id or f"step {step}"
            demoted.append(loaded)
            self._demote_for_good(loaded, "non_finite", step=step, ranks=failing, tensors=bad[:8])
            log.error(
                "gpuguard: checkpoint %s (step %d) holds non-finite parameters or optimizer state after restore "
                "(rank(s) %s%s): demoted; every rank loads the next older verified checkpoint instead",
                loaded,
                step,
                failing,
                f"; here: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else "",
            )
        log.warning("gpuguard: resumed from the checkpoint at step %d; the next step is %d", step, step + 1)
        self._losses.clear()
        self._loss_check = None
        if self.config.loss_gate:
            # Ranks may have restored the same id from different tiers, whose manifests hold different windows
            # (rank 0's, or none): one small gather, so that every rank arms the check alike (it is a collective).
            windows = default_group(self.world_size).all_gather(window_of(loaded_extra))
            self._loss_check = arm(self.config, loaded_id or f"step {step}", step, windows, self.rank)
        self._unchecked = []
        self._resumed_step = step
        self._last_step = step
        self._schedule_next(step)
        return step + 1

    def _restored(self, info: CheckpointInfo | None) -> None:
        """An integration that restores on its own (Lightning's) arms the loss check as `resume` does."""
        self._losses.clear()
        self._loss_check = None if info is None else arm(self.config, info.id, info.step, [window_of(info.extra)], 0)
        self._unchecked = []

    # -- the hot path ---------------------------------------------------------------------------

    def step(self, step: int, loss: Any = None) -> None:
        """Call once per training step, after the optimizer step, on every rank.

        Steady state: records the time and compares two numbers. Every ``sync_every`` steps (or at
        once, in a single process, when something is wrong) it takes the slow path: agree, and if the
        agreement says so, checkpoint and raise `Evacuation`.

        A step that is not an int, is negative, repeats, goes backwards or lies below the resumed
        step is reported once (checkpoints are named by step, and `resume` returns the one after).

        Args:
            step: this step's number.
            loss: this step's loss, optional: a float or a one-element tensor (on any device; it is kept
                detached, never read here: no device sync; so do not change it in place afterwards).
                Checkpoints record the window of recent losses, and after a resume the loss check
                compares the first steps' with it (``loss_gate``; docs/user-guide.md, "sanity gate").

        Raises:
            Evacuation: after the emergency checkpoint is committed (or failed: the job leaves anyway).
            GpuGuardError: before `start` (or ``with``) or after `close`: the job would train unwatched.
        """
        self.steps.tick(time.perf_counter())
        if step.__class__ is not int or step <= self._last_step:
            step = odd_step(step, self._last_step, self._resumed_step, self._report_once)
        self._last_step = step
        if loss is not None and not self._losses.record(step, loss):
            self._report_once(
                "loss-type", f"step(loss=...) takes a float or a one-element tensor, not {type(loss).__name__}"
            )
        # This rank's per-rank state of the step, mirrored before step() returns; a lost peer takes the slow path.
        if self._sudden is not None and self._started and self._sudden.completed(step, checkpointable(self.state)):
            self._urgent = True
        if step < self._next_check and not self._urgent:
            return
        self._slow_path(step)

    def _report_once(self, kind: str, message: str) -> None:
        if kind not in self._reported:
            self._reported.add(kind)
            log.warning("gpuguard: %s (reported once)", message)

    def _slow_path(self, step: int) -> None:
        c = self.config
        if not self._started:
            raise GpuGuardError(
                "guard.step() called on a guard that is not running: the job would train unwatched and "
                "unprotected. Use `with gpuguard.Guard(...) as guard:`, or call guard.start() (or "
                "guard.resume(), which starts it) before the loop, and do not call step() after close()"
            )
        if self._sudden is not None and self._sudden.alarmed:  # before any collective: a peer is gone
            self._leave_after_sudden_loss()
        if not self._prepared:
            # After the first optimizer step the state has its final shapes (optimizers create their
            # moments lazily): plan the staging buffer now, at this step boundary on the training thread
            # (every rank is here: the plan may need a collective), and allocate it in the background.
            self._prepared = True
            self._prepare()
        agreed: Agreed = NOTHING
        action = max(self._local_action, self._forced_action)
        if self._distributed:
            assert self.agreement is not None
            if self.agreement.pending:  # started at the previous call: read it one step later
                agreed = self.agreement.finish()
                if agreed.slowest_rank >= 0:
                    self.slowest = (agreed.slowest_rank, agreed.slowest_step_s)
                    self.slowdown.peers = Peers(
                        self.world_size, agreed.fastest_rank, agreed.fastest_step_s, *self.slowest
                    )
            if step % c.sync_every == 0 and not agreed.action:
                # the median of the recent window (one rank's wait at an agreement is not its speed), which the
                # guard's thread keeps; the last step's time until it has one
                measured = self.slowdown.latest
                recent = self.steps.recent(1) if measured is None else ()
                step_s = measured.step_s if measured is not None else (recent[0] if recent else 0.0)
                self.agreement.begin(action, self._periodic_due, step_s)
                if "bound" not in self._reported and self.steps.count >= c.step_warmup_steps + 20:
                    self._reported.add("bound")
                    check_preemption_bound(c, statistics.median(self.steps.recent(20)))
        else:
            agreed = Agreed(action, 0, self._periodic_due, 0, 0.0)
        self._urgent = False
        if agreed.action:
            self._evacuate(step, agreed)
        if self._loss_check is not None and step >= self._loss_check.check_at:
            self._check_losses(step)  # a collective, at a step every rank reaches; may raise Evacuation
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
        if self.agreement is not None and self.agreement.pending:
            candidates.append(step + 1)
        if self._distributed:
            candidates.append((step // c.sync_every + 1) * c.sync_every)
        if c.checkpoint_every_steps:
            candidates.append((max(step, 0) // c.checkpoint_every_steps + 1) * c.checkpoint_every_steps)
        if self._loss_check is not None:
            candidates.append(max(step + 1, self._loss_check.check_at))
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
        overlap = self._optimizers() if self.config.overlap_snapshot else ()
        to_object = self.local is None or self._periodic_count % self.config.object_store_every == 0
        self._periodic_count += 1
        checkpoint_id = self._checkpoint_id(step, "periodic")
        extra = self._loss_extra()
        if self._loss_check is not None:
            # Taken before the loss check vouched for the state it descends from: demoted with it if it fails
            # (else it would be the next resume point), and it carries the same window for its own resume.
            self._unchecked.append(checkpoint_id)
        started = time.perf_counter()  # what the training thread waits for: state_dict() and the snapshot
        lent = None
        if self.local is not None:  # the fast save first: this rank's own complete part, on this node
            try:
                flat = flatten(checkpointable(self.state))  # state_dict() once, for both tiers
            except GpuGuardError as exc:
                log.error("periodic checkpoint at step %d not taken: %s", step, exc)
                return
            local = self.local.save(flat, step, checkpoint_id, overlap, extra, lend=to_object, started=started)
            if local is not None and not to_object:
                local.add_done_callback(self._report_local)
            lent = local._lent if local is not None else None
        if not to_object:
            return
        options: dict[str, Any] = {"reason": "periodic", "rank": self.rank, "world_size": self.world_size}
        options |= {"checkpoint_id": checkpoint_id, "replicated": self.config.replicated, "extra": extra}
        try:
            if lent is not None:
                # One snapshot: object storage's is copied from the local tier's on a thread, not taken again
                # from the live state (`_save_from` releases ``lent`` whatever happens).
                pending = self.store._save_from(flat, step, lent, overlap_with=overlap, started=started, **options)
            else:  # no local tier, or its save did not start
                pending = self.store.save(checkpointable(self.state), step, overlap_with=overlap, **options)
        except GpuGuardError as exc:
            log.error("periodic checkpoint at step %d not taken: %s", step, exc)
            return
        pending.add_done_callback(self._report_periodic)
        if self.rank == 0:
            pending.add_done_callback(self._after_periodic)
        self.periodic.append(pending)

    def _loss_extra(self) -> dict[str, Any]:
        """The loss window for a checkpoint's manifest. Rank 0's alone is committed, so only rank 0 reads its
        losses: one device sync per checkpoint, right before the snapshot, which waits for the same stream."""
        # Recorded with loss_gate off too: a later run that checks finds the windows.
        if self.rank != 0 or (not len(self._losses) and self._loss_check is None):
            return {}
        try:
            return window_extra(self._losses, self._loss_check)
        except Exception as exc:  # never fails a checkpoint: it goes without a window
            self.failures.failed("summarising the loss window", exc)
            return {}

    def _check_losses(self, step: int) -> None:
        """The loss check after a resume (every rank, at the same step): passes, or demotes and leaves."""
        assert self._loss_check is not None and self.store is not None
        pending, self._loss_check = self._loss_check, None
        try:
            check_losses(
                pending,
                step,
                self._losses,
                default_group(self.world_size),
                self.config,
                unchecked=self._unchecked,
                demote=self._demote_for_good,
                resume_point=self.resume_point_text,
            )
        except Evacuation:  # the check failed: every rank leaves with the restart exit
            self._evacuating = True
            raise
        finally:
            self._unchecked = []

    def _demote_for_good(self, checkpoint_id: str, reason: str, **details: Any) -> str | None:
        """Rank 0 writes the demotion marker (`CheckpointStore.demote`); returns why it failed, or None."""
        if self.rank != 0:
            return None
        assert self.store is not None
        try:
            self.store.demote(checkpoint_id, reason, **details)
        except GpuGuardError as exc:
            log.error("gpuguard: could not record the demotion of %s in storage: %s", checkpoint_id, exc)
            return str(exc)
        return None

    def _optimizers(self) -> list[Any]:
        import torch

        return [v for v in self.state.values() if isinstance(v, torch.optim.Optimizer)]

    def _report_periodic(self, pending: PendingSave) -> None:
        error = pending.exception()
        info = None if error is not None else pending.wait(0)
        if info is not None and "deadline" not in self._reported:  # the first measured save time, once
            self._reported.add("deadline")
            check_save_fits_deadline(self.config, pending.timings.durable_s, pending.step)
        self.plugins.hook.gpuguard_checkpoint_finished(
            step=pending.step, reason="periodic", info=info, timings=pending.timings, error=error, tier="object storage"
        )

    def _report_local(self, pending: PendingSave) -> None:
        """A periodic checkpoint kept in the local tier alone (object storage skipped at its step) has ended."""
        error = pending.exception()
        info = None if error is not None else pending.wait(0)
        self.plugins.hook.gpuguard_checkpoint_finished(
            step=pending.step, reason="periodic", info=info, timings=pending.timings, error=error, tier="local"
        )

    def _after_periodic(self, pending: PendingSave) -> None:
        error = pending.exception()
        if error is not None:
            log.error("periodic checkpoint %s failed: %s", pending.id, error)
            return
        assert self.store is not None
        try:
            self.store.prune()
        except Exception as exc:  # a writer thread: said once (a bug with its traceback), then counted
            self.failures.failed("pruning old checkpoints", exc, expected=isinstance(exc, GpuGuardError))
        else:
            self.failures.succeeded("pruning old checkpoints")

    def _evacuate(self, step: int, agreed: Agreed) -> NoReturn:
        evacuate(self, step, agreed)

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
                self._watch_preemption()
            except Exception as exc:  # never into the training thread; said once with its traceback, then counted
                self.failures.failed("deciding", exc)
            else:
                self.failures.succeeded("deciding")

    def _watch_preemption(self) -> None:
        """Say so when a preemption finds the training loop not calling step() (stuck, or a long step)."""
        if self._preempted is None or self._evacuating or "stuck" in self._reported:
            return
        signum, since = self._preempted
        waited = time.monotonic() - since
        if waited > self.config.preemption_deadline_s:
            self._report_once(
                "stuck",
                f"{signal_name(signum)} arrived {waited:.0f}s ago and the training loop has not reached the agreed "
                f"step (preemption_deadline_s={self.config.preemption_deadline_s:g}); {self.resume_point_text()}",
            )

    def _evaluate(self) -> None:
        assert self.monitor is not None
        snapshot = self.monitor.snapshot()
        extra: dict[str, list[Reason]] = {}
        self.slowdown.measure()  # for the agreement and the metrics, with or without devices to judge
        for device in snapshot.devices:
            slow = self.slowdown.check(device, self.world_size)
            if slow is not None:
                extra.setdefault(device.uuid, []).append(slow)
        for found in self.plugins.hook.gpuguard_health_reasons(snapshot=snapshot):
            for uuid, reasons in (found or {}).items():
                extra.setdefault(uuid, []).extend(reasons)
        decision = self.ladder.decide(snapshot, self.monitor.clock(), extra)
        override = self.plugins.hook.gpuguard_decide(decision=decision, snapshot=snapshot)
        if isinstance(override, Decision):
            decision = override
        forced = self._forced
        if forced is not None and forced.action >= decision.action:
            decision = forced
        if decision.action and not self._local_action and decision is not forced:
            self.decided_at = self.monitor.clock()
            self.decided_wall = time.perf_counter()
            log.warning("gpuguard decided to %s: %s", decision.action.name.lower(), decision.message)
        self.decision = decision
        self._local_action = int(decision.action)
        every_s = self.config.checkpoint_every_s
        if every_s and time.monotonic() - self._last_periodic_at >= every_s:
            self._periodic_due = True
        if not self._distributed and (self._local_action or self._forced_action or self._periodic_due):
            self._urgent = True  # one process needs no agreement: act at the next step


__all__ = ["Evacuation", "EvacuationReport", "Guard"]
