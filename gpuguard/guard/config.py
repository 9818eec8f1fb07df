"""The guard's configuration: keyword arguments, ``GPUGUARD_*`` environment variables, or a YAML file.

Precedence, highest first: keyword arguments, environment variables, the YAML file (``config_file=``
or ``GPUGUARD_CONFIG``), defaults. Everything is validated when the guard is built, with messages that
name the field, the value and what is allowed — never mid-training.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import signal
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from gpuguard.errors import ConfigError
from gpuguard.health.config import HealthConfig
from gpuguard.k8s.config import KubernetesConfig

ENV_PREFIX = "GPUGUARD_"

# GPUGUARD_* variables that are not settings: read elsewhere, allowed by the unknown-variable check.
# Add a variable here when a module starts reading one, or a job that sets it will be refused at start.
# LEAVE_GRACE_S and RUN_DIR are gpuguard-run's; its workers inherit them.
OTHER_ENV: set[str] = {
    f"{ENV_PREFIX}CONFIG",
    f"{ENV_PREFIX}FAKE_NVML",
    f"{ENV_PREFIX}LEAVE_GRACE_S",
    f"{ENV_PREFIX}RUN_DIR",
}

# Sudden faults (a GPU off the bus, a power loss) give no warning, so only periodic checkpoints
# bound what they cost. Meta's Llama 3 run: 419 interruptions in 54 days on 16,384 GPUs, one every
# 3.1 h for the job. Half an interval is lost per sudden fault on average: 15 min at 30 min, while
# a periodic save stalls the loop for the snapshot only (about 1 s for 6 GiB on an H200 with
# gpuguard's staging, tests/data/h200-checkpoint-baseline.json): 1 s / 1800 s = 0.06% of the run.
# Young's optimum sqrt(2 x cost x MTBF) gives 2.5 min at 16k GPUs and 1.9 h for one 8-GPU node; 30
# min sits between, and jobs that know their scale set their own.
DEFAULT_CHECKPOINT_EVERY_S = 1800.0


@dataclass(frozen=True)
class GuardConfig:
    """What the guard does and when.

    Attributes:
        checkpoint_dir: fsspec URL of the checkpoints (``s3://bucket/run``, ``file:///ckpt``, a path).
        storage_options: for the fsspec filesystem.
        keep: committed checkpoints to keep.
        checkpoint_every_steps: periodic checkpoint every N steps (None or 0: off).
        checkpoint_every_s: periodic checkpoint every T seconds, agreed across ranks (None or 0: off).
            30 minutes by default: sudden faults give no warning (see ``DEFAULT_CHECKPOINT_EVERY_S``).
        sync_every: steps between cross-rank agreements; a decision reaches every rank's evacuation
            within this many steps of the first step that could see it.
        preemption_signals: signals that mean "this pod is going away" (SIGTERM on node drain,
            eviction, preemption, spot reclaim; add SIGUSR1 for Slurm's ``--signal``): the guard takes
            an emergency checkpoint at an agreed step and exits ``reschedule_exit_code``. Empty: off.
        preemption_deadline_s: from the signal, how long the checkpoint may take to commit; keep it
            below the pod's ``terminationGracePeriodSeconds`` (30 s by default in Kubernetes).
        termination_grace_s: the pod's ``terminationGracePeriodSeconds`` when known (``gpuguard k8s
            manifests`` sets ``GPUGUARD_TERMINATION_GRACE_S``): the guard warns at start when the
            preemption deadline does not fit in it.
        reschedule_exit_code: the exit code that asks for a new pod elsewhere (75, EX_TEMPFAIL).
        restart_exit_code: the exit code that asks for a restart in place (76).
        degraded_grace_s: a DEGRADED condition held this long escalates to rescheduling.
        retry_limit: DEGRADED episodes within ``retry_window_s`` that escalate to rescheduling.
        retry_window_s: the window for ``retry_limit``.
        step_slowdown: a step this much slower than the run's baseline (0.25: 25%) is a slowdown. Alone it
            warns and is exported (``gpuguard_step_slowdown``); it marks the GPU DEGRADED only with NVML
            evidence on the GPU and this rank that much slower than the fastest rank (see ``guard/steptime.py``).
        evacuate_on_slowdown_alone: let a step-time slowdown mark the GPU DEGRADED (and so, after
            ``degraded_grace_s``, move the job) without NVML evidence or a slower-than-peers comparison.
            Off by default: a slow input pipeline, storage, peer or CPU looks the same, and moving fixes none.
        step_warmup_steps: steps ignored before the baseline is taken (compilation, caches).
        step_baseline_steps: steps whose median is the baseline.
        step_window_steps: recent steps whose median is compared with the baseline.
        replicated: every rank holds the same state (plain data parallel): ranks split the writing.
        overlap_snapshot: for periodic checkpoints, copy parameters and optimizer state while the next
            forward and backward run; only the next optimizer step waits for the copy. Safe when they
            change in ``optimizer.step()`` alone; a tensor changed elsewhere is detected (version counters)
            and turns it off for the run with a warning. Set False when the loop writes parameters through
            ``.data`` or from outside PyTorch, which version counters do not see.
        commit_timeout_s: how long the committing rank waits for the others' shards.
        local_dir: a node-local path for the local tier (a memory-backed ``emptyDir`` at ``/dev/shm/...``
            or a node-local NVMe path; None: off). Every periodic checkpoint lands there first, each rank
            its own complete part (the same manifest and CRC-32C checksums as object storage, under the
            same checkpoint id); `Guard.resume` takes the newest checkpoint every rank verified in some
            tier. It survives a container restarted in place, not a pod moved to another node.
        local_keep_bytes: bytes of local checkpoints each rank keeps (None: only ``keep`` bounds them); the
            newest committed local checkpoint is always kept, whatever its size.
        object_store_every: with ``local_dir``, every this-many-th periodic checkpoint (the first one
            included) also goes to ``checkpoint_dir``; emergency, preemption and survivors' checkpoints
            always do, and go there only.
        sudden_loss: with several ranks, survive a peer that dies without warning (SIGKILL, its node or
            GPU gone): the survivors save the last step every rank completed from the replicas and exit
            ``reschedule_exit_code``. Needs the launcher's store (torchrun, gpuguard-run); costs each
            step the capture and mirroring of this rank's small per-rank state (RNGs, data position).
        loss_gate: after `Guard.resume`, check the losses handed to ``step(step, loss)`` against the window
            the checkpoint recorded; a checkpoint far outside it is demoted for good and the job leaves with
            ``restart_exit_code`` to resume from the next older one (docs/user-guide.md, "sanity gate").
            Nothing happens without losses. Off, checkpoints still record their windows.
        loss_check_steps: steps after a resume at which the ranks judge the losses since the restore.
        loss_threshold: how far the median of those losses may rise above the window's median, in the
            window's robust spreads (its median absolute deviation as a standard deviation, never taken
            below a tenth of the median's magnitude). 10 by default: the two medians' own noise is about
            a third of a spread, so a normal resume sits some 30 standard errors inside it, and the loss
            must at least double; a restored model with corrupted weights trains at several times its loss.
        peer_heartbeat_s: seconds between a rank's heartbeats on the side channel.
        peer_timeout_s: a rank whose heartbeat is silent this long is dead; every survivor knows
            within ``peer_timeout_s + 2 x peer_heartbeat_s`` (under a heartbeat on one host).
        devices: ``job`` (this process's GPUs: CUDA's, ``CUDA_VISIBLE_DEVICES``, ``NVIDIA_VISIBLE_DEVICES``,
            ``LOCAL_RANK`` as an index into the visible list; docs/which-gpus.md), ``all``, or indices/UUIDs.
        health: the health rules' thresholds.
        kubernetes: what to ask of Kubernetes on an evacuation.
    """

    checkpoint_dir: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    keep: int = 3
    checkpoint_every_steps: int | None = None
    checkpoint_every_s: float | None = DEFAULT_CHECKPOINT_EVERY_S
    sync_every: int = 10
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM"])
    preemption_deadline_s: float = 25.0
    termination_grace_s: float | None = None
    reschedule_exit_code: int = 75
    restart_exit_code: int = 76
    degraded_grace_s: float = 120.0
    retry_limit: int = 3
    retry_window_s: float = 600.0
    step_slowdown: float = 0.25
    evacuate_on_slowdown_alone: bool = False
    step_warmup_steps: int = 10
    step_baseline_steps: int = 50
    step_window_steps: int = 20
    replicated: bool = False
    overlap_snapshot: bool = True
    commit_timeout_s: float = 300.0
    local_dir: str | None = None
    local_keep_bytes: int | None = None
    object_store_every: int = 1
    sudden_loss: bool = True
    loss_gate: bool = True
    loss_check_steps: int = 20
    loss_threshold: float = 10.0
    peer_heartbeat_s: float = 0.5
    peer_timeout_s: float = 3.0
    devices: Literal["job", "all"] | list[int | str] = "job"
    health: HealthConfig = field(default_factory=HealthConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint_dir, os.PathLike):
            object.__setattr__(self, "checkpoint_dir", os.fspath(self.checkpoint_dir))
        for name in ("checkpoint_every_steps", "checkpoint_every_s"):
            if getattr(self, name) == 0 and not isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, None)  # 0 turns periodic checkpoints off, like None
        if not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir:
            raise ConfigError("checkpoint_dir", self.checkpoint_dir, "must be a URL or path, e.g. s3://bucket/run")
        _whole(self, "keep", 1)
        _whole(self, "sync_every", 1)
        _whole(self, "retry_limit", 1)
        _whole(self, "step_warmup_steps", 0)
        _whole(self, "step_baseline_steps", 1)
        _whole(self, "step_window_steps", 1)
        _whole(self, "loss_check_steps", 1)
        if self.checkpoint_every_steps is not None:
            _whole(self, "checkpoint_every_steps", 1)
        positive = ("degraded_grace_s", "retry_window_s", "commit_timeout_s", "step_slowdown", "preemption_deadline_s")
        for name in (*positive, "peer_heartbeat_s", "peer_timeout_s", "loss_threshold"):
            _positive(self, name)
        if self.peer_timeout_s < 2 * self.peer_heartbeat_s:
            raise ConfigError(
                "peer_timeout_s",
                self.peer_timeout_s,
                f"must be at least twice peer_heartbeat_s ({self.peer_heartbeat_s:g}): one late beat is not a death",
            )
        if self.checkpoint_every_s is not None:
            _positive(self, "checkpoint_every_s")
        self._check_local_tier()
        if self.termination_grace_s is not None:
            _positive(self, "termination_grace_s")
        for name in ("reschedule_exit_code", "restart_exit_code"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 1 <= value <= 255
                or value in (1, 2, 126, 127)
            ):
                raise ConfigError(name, value, "must be an exit code from 3 to 255, not 126 or 127")
        if self.reschedule_exit_code == self.restart_exit_code:
            raise ConfigError("restart_exit_code", self.restart_exit_code, "must differ from reschedule_exit_code")
        object.__setattr__(self, "preemption_signals", parse_signal_names(self.preemption_signals))
        if not (self.devices in ("job", "all") or isinstance(self.devices, list)):
            raise ConfigError("devices", self.devices, "allowed: 'job', 'all', or a list of GPU indices and UUIDs")
        if not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options", self.storage_options, "must be a mapping")
        if isinstance(self.health, Mapping):
            object.__setattr__(self, "health", _section("health", HealthConfig, self.health))
        if not isinstance(self.health, HealthConfig):
            raise ConfigError("health", self.health, "must be a HealthConfig or a mapping of its fields")
        if isinstance(self.kubernetes, Mapping):
            object.__setattr__(self, "kubernetes", _section("kubernetes", KubernetesConfig, self.kubernetes))
        if not isinstance(self.kubernetes, KubernetesConfig):
            raise ConfigError("kubernetes", self.kubernetes, "must be a KubernetesConfig or a mapping of its fields")

    def _check_local_tier(self) -> None:
        value: Any = self.local_dir
        if isinstance(value, os.PathLike):
            object.__setattr__(self, "local_dir", os.fspath(value))
        if self.local_dir is not None:
            if not isinstance(self.local_dir, str) or not self.local_dir.strip():
                raise ConfigError("local_dir", self.local_dir, "must be a node-local path, e.g. /dev/shm/gpuguard")
            if "://" in self.local_dir and not self.local_dir.startswith("file://"):
                raise ConfigError(
                    "local_dir",
                    self.local_dir,
                    "must be a node-local path (a memory-backed emptyDir such as /dev/shm/gpuguard, or a local NVMe "
                    "path), not a remote URL: remote storage is checkpoint_dir",
                )
        if self.local_keep_bytes is not None:
            _whole(self, "local_keep_bytes", 1)
        _whole(self, "object_store_every", 1)
        if self.local_dir is None and self.object_store_every != 1:
            raise ConfigError(
                "object_store_every",
                self.object_store_every,
                "needs local_dir: without a local tier every checkpoint goes to checkpoint_dir (set local_dir, or "
                "leave object_store_every at 1)",
            )

    @classmethod
    def load(
        cls, config_file: str | Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> GuardConfig:
        """Merge the YAML file, the environment and keyword arguments, then validate."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get(f"{ENV_PREFIX}CONFIG")
        if path:
            values.update(_from_yaml(Path(path)))
        for layer in (_from_env(env), {k: v for k, v in overrides.items() if v is not None}):
            for key, value in layer.items():
                if key in _SECTIONS and isinstance(value, Mapping) and isinstance(values.get(key), Mapping):
                    values[key] = {**values[key], **value}  # sections merge field by field
                else:
                    values[key] = value
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(key, value, "unknown setting; allowed: " + ", ".join(sorted(known)))
        if "checkpoint_dir" not in values:
            raise ConfigError(
                "checkpoint_dir",
                None,
                f"required: pass checkpoint_dir=, set {ENV_PREFIX}CHECKPOINT_DIR, or a config file",
            )
        return cls(**values)


def _section(name: str, cls: Any, values: Mapping[str, Any]) -> Any:
    """A section built from a mapping; its errors name the field as ``section.field``, as the unknown-key
    error does (``onset_s: -1`` alone did not say which section, nor match GPUGUARD_HEALTH_ONSET_S)."""
    try:
        return cls.from_mapping(values)
    except ConfigError as exc:
        if exc.field.startswith(f"{name}."):
            raise
        raise ConfigError(f"{name}.{exc.field}", exc.value, exc.allowed) from None


def _whole(config: GuardConfig, name: str, lowest: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ConfigError(name, value, f"must be a whole number, {lowest} or greater")


def _positive(config: GuardConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, value, "must be a finite number greater than 0")


def parse_signal_names(value: Any) -> list[str]:
    """``["SIGTERM", "SIGUSR1"]``, ``"SIGTERM,SIGUSR1"`` or ``"USR1"`` → checked canonical names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError("preemption_signals", value, "must be a list of signal names, e.g. ['SIGTERM', 'SIGUSR1']")
    names = []
    for item in items:
        name = str(item).strip().upper()
        if not name:
            continue
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, name, None), signal.Signals):
            raise ConfigError(
                "preemption_signals", item, "must name a signal this platform can catch, e.g. SIGTERM, SIGUSR1"
            )
        names.append(name)
    return names


def _from_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError("config_file", str(path), "no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config_file", str(path), f"is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config_file", str(path), "must hold a mapping of settings")
    return data


def _parse(name: str, kind: Any, raw: str) -> Any:
    """An environment string as the field's type."""
    origin = get_origin(kind)
    if origin is Literal:
        allowed = get_args(kind)
        if raw in allowed:
            return raw
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}", raw, "allowed: " + ", ".join(map(str, allowed)))
    if origin in (Union, types.UnionType):
        literals = [a for a in get_args(kind) if get_origin(a) is Literal]
        if any(raw in get_args(a) for a in literals):
            return raw
        options = [a for a in get_args(kind) if a is not type(None)]
        if raw.strip().lower() in ("", "none", "off"):
            return None
        return _parse(name, options[0], raw)
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(raw)
        if kind is float:
            number = float(raw)
            if not math.isfinite(number):
                raise ConfigError(f"{ENV_PREFIX}{name.upper()}", raw, "must be a finite number")
            return number
        if kind is str:
            return raw
        return yaml.safe_load(raw)  # lists, mappings, literals
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        # A malformed GPUGUARD_STORAGE_OPTIONS surfaced as yaml's own ParserError, naming no variable.
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}", raw, f"must be YAML or JSON ({reason})") from None
    except ValueError:
        kind_name = getattr(kind, "__name__", str(kind))
        article = "an" if kind_name[:1] in "aeiou" else "a"
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}", raw, f"must be {article} {kind_name}") from None


_SECTIONS: dict[str, Any] = {"health": HealthConfig, "kubernetes": KubernetesConfig}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``GPUGUARD_<FIELD>`` for top-level settings, ``GPUGUARD_<SECTION>_<FIELD>`` for sections."""
    _reject_unknown_env(env)
    values: dict[str, Any] = {}
    for name, kind in get_type_hints(GuardConfig).items():
        key = f"{ENV_PREFIX}{name.upper()}"
        if key in env and name not in _SECTIONS:
            values[name] = _parse(name, kind, env[key])
    for section, cls in _SECTIONS.items():
        found = {}
        for name, kind in get_type_hints(cls).items():
            key = f"{ENV_PREFIX}{section.upper()}_{name.upper()}"
            if key in env:
                found[name] = _parse(f"{section}_{name}", kind, env[key])
        if found:
            values[section] = found
    return values


def known_env() -> set[str]:
    """Every ``GPUGUARD_*`` variable gpuguard reads."""
    names = set(OTHER_ENV)
    for name in get_type_hints(GuardConfig):
        if name not in _SECTIONS:
            names.add(f"{ENV_PREFIX}{name.upper()}")
    for section, cls in _SECTIONS.items():
        names.update(f"{ENV_PREFIX}{section.upper()}_{name.upper()}" for name in get_type_hints(cls))
    return names


def _reject_unknown_env(env: Mapping[str, str]) -> None:
    """A misspelled variable would otherwise be ignored, as a misspelled keyword is not."""
    known = known_env()
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "no such setting"
            raise ConfigError(key, env[key], f"unknown gpuguard variable; {hint} (see GuardConfig for the settings)")
