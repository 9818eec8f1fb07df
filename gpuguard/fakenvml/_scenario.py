"""Fault scenarios: a small JSON (or YAML) file that scripts what a fake GPU goes through."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pynvml
import yaml

from gpuguard.errors import ScenarioError
from gpuguard.health.signals import CLOCK_EVENTS, EVENT_TYPES, FIELD_BY_NAME, RECOVERY_ACTIONS, SIGNAL_NAMES

# Events a scenario names with "event"; XIDs have a key of their own.
EVENT_NAMES: Final[tuple[str, ...]] = tuple(kind for kind in EVENT_TYPES if kind != "xid")
_CHANGES: Final = ("set", "add", "add_per_s")
_EVENT_KEYS: Final = frozenset(
    {
        "at",
        "gpu",
        "field",
        "until",
        "xid",
        "event",
        "lost",
        "timeouts",
        "error",
        "call",
        "link",
        "entry",
        "instance",
        *_CHANGES,
    }
)

# The pynvml functions gpuguard calls, which an "error" or "timeouts" step may target with "call".
# What real NVML answers, per nvml.h's `Returns` lists (R535-R580), and what the fake lets a scenario play:
#   nvmlDeviceGetHandleByIndex(_v2): INVALID_ARGUMENT, INSUFFICIENT_POWER, NO_PERMISSION, IRQ_ISSUE,
#       GPU_IS_LOST, UNKNOWN (NO_PERMISSION: a GPU the container's cgroup denies, still counted).
#   nvmlDeviceGetHandleByUUID: INVALID_ARGUMENT, NOT_FOUND, INSUFFICIENT_POWER, GPU_IS_LOST, UNKNOWN.
#   nvmlDeviceGetUUID, ...GetTemperature, ...GetCurrentClocksEventReasons, ...GetCurrPcieLinkWidth,
#       ...GetUtilizationRates, ...GetNvLinkState: INVALID_ARGUMENT, NOT_SUPPORTED, GPU_IS_LOST, UNKNOWN
#       (and, from pynvml, FUNCTION_NOT_FOUND when the driver's library lacks the symbol).
#   nvmlDeviceRegisterEvents: INVALID_ARGUMENT, NOT_SUPPORTED, GPU_IS_LOST, UNKNOWN.
#   nvmlEventSetWait_v2: INVALID_ARGUMENT, TIMEOUT, GPU_IS_LOST, UNKNOWN.
#   nvmlDeviceGetMigMode: INVALID_ARGUMENT, NOT_SUPPORTED ("if device doesn't support MIG mode"), UNKNOWN.
#   nvmlDeviceGetMaxMigDeviceCount: INVALID_ARGUMENT, UNKNOWN ("Returns zero if MIG is not supported or enabled").
#   nvmlDeviceGetMigDeviceHandleByIndex: INVALID_ARGUMENT, NOT_SUPPORTED, NOT_FOUND ("if no valid MIG device
#       was found at index"), UNKNOWN.
#   nvmlDeviceGetDeviceHandleFromMigDeviceHandle, nvmlDeviceIsMigDeviceHandle, nvmlDeviceGetGpuInstanceId,
#       nvmlDeviceGetComputeInstanceId: INVALID_ARGUMENT, NOT_SUPPORTED, UNKNOWN.
#   Any call: UNINITIALIZED, RESET_REQUIRED (the GPU needs a reset before it can be used again).
FAKE_CALLS: Final[tuple[str, ...]] = (
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetHandleByUUID",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetIndex",
    "nvmlDeviceGetName",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetFieldValues",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetTemperatureThreshold",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrPcieLinkWidth",
    "nvmlDeviceGetMaxPcieLinkWidth",
    "nvmlDeviceGetCurrPcieLinkGeneration",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetNvLinkState",
    "nvmlDeviceGetGpuFabricInfo",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlDeviceRegisterEvents",
    "nvmlEventSetWait_v2",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
    "nvmlDeviceIsMigDeviceHandle",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
)
_TOP_KEYS: Final = frozenset({"gpus", "events", "recording", "nvlink_links", "mig", "name", "description"})
# Every key a scenario may hold, top level and per event: each one has a test (tests/test_fake_scenarios.py).
SCENARIO_KEYS: Final[frozenset[str]] = _TOP_KEYS | _EVENT_KEYS
# nvmlDeviceGetMaxMigDeviceCount on an H100/H200 with MIG on: at most 7 MIG devices per GPU.
MAX_MIG_DEVICES: Final = 7


def _nvml_field_names() -> dict[str, int]:
    return {name: getattr(pynvml, name) for name in dir(pynvml) if name.startswith("NVML_FI_DEV_")}


# Field id -> the readable name gpuguard reads it under, where it has one.
_READABLE: Final[dict[int, str]] = {s.field_id: s.name for s in FIELD_BY_NAME.values()}


@dataclass(frozen=True)
class ScenarioEvent:
    """One step of a scenario; exactly one of field, xid, event, lost, timeouts, error is set.

    ``until`` ends the step's effect, whatever its kind: a ``set`` or ``add`` is undone (the value is
    what it would be without the step: a volatile counter back to 0, as after a GPU reset), an
    ``add_per_s`` stops adding (the counter keeps what it reached), a lost GPU answers again, timeouts
    and errors stop, and what an XID or event brought with it (`xid_effects`) is over, save the lifetime
    counters. ``instance`` names the MIG GPU instance an XID or event concerns.
    """

    at: float
    gpu: int
    field: str | None = None
    set: float | None = None
    add: float | None = None
    add_per_s: float | None = None
    until: float | None = None
    xid: int | None = None
    event: str | None = None
    lost: bool = False
    timeouts: int = 0
    error: str | None = None
    call: str | None = None
    link: int | None = None
    entry: str | None = None
    instance: int | None = None

    def active(self, now: float) -> bool:
        """Whether the step is in force at ``now``: from ``at`` until ``until`` (excluded)."""
        return self.at <= now and (self.until is None or now < self.until)


@dataclass(frozen=True)
class Scenario:
    """A parsed, validated scenario.

    Attributes:
        gpus: how many GPUs the fake has.
        events: the steps, in time order.
        recording: the recorded device every GPU starts as (``"h200"``, the shipped recording, or a path).
        nvlink_links: NVLink links each GPU has up at start (0: none, as on the recorded H200).
        mig: GPU index -> how many MIG devices it holds; MIG mode is enabled on each GPU listed.
    """

    gpus: int
    events: tuple[ScenarioEvent, ...] = ()
    recording: str = "h200"
    nvlink_links: int = 0
    mig: Mapping[int, int] = field(default_factory=dict)
    name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


def load_scenario(source: str | Path | Mapping[str, Any]) -> Scenario:
    """Read and validate a scenario from a path (``.json``, ``.yaml``, ``.yml``) or a mapping.

    Raises:
        ScenarioError: naming the file, the field, the value and what is allowed.
    """
    if isinstance(source, Mapping):
        return parse_scenario(source)
    path = Path(source)
    text = read_input("scenario", path)
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ScenarioError("scenario", str(path), f"is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    if not isinstance(data, Mapping):
        raise ScenarioError("scenario", str(path), "must hold an object with 'gpus' and 'events'")
    return parse_scenario(data)


def read_input(field: str, path: Path) -> str:
    """A scenario or recording file's text; a missing or unreadable one is a `ScenarioError` naming it."""
    try:
        return path.read_text("utf-8")
    except FileNotFoundError:
        raise ScenarioError(field, str(path), "no such file") from None
    except OSError as exc:
        raise ScenarioError(field, str(path), f"cannot be read: {exc.strerror}") from None


def _number(where: str, value: Any, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ScenarioError(where, value, f"must be a number, {minimum:g} or greater")
    return float(value)


def _whole(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ScenarioError(where, value, f"must be a whole number from {lo} to {hi}")
    return value


def _field_value(where: str, name: str, value: Any) -> float:
    """Readable values: recovery actions and clock events by name."""
    if name == "recovery_action" and isinstance(value, str):
        by_name = {v: k for k, v in RECOVERY_ACTIONS.items()}
        if value not in by_name:
            raise ScenarioError(where, value, "allowed: " + ", ".join(by_name))
        return float(by_name[value])
    if name == "clock_events" and isinstance(value, list):
        mask = 0
        for item in value:
            if item not in CLOCK_EVENTS:
                raise ScenarioError(where, item, "allowed clock events: " + ", ".join(CLOCK_EVENTS))
            mask |= CLOCK_EVENTS[item]
        return float(mask)
    return _number(where, value)


def parse_scenario(data: Mapping[str, Any]) -> Scenario:
    for key in data:
        if key not in _TOP_KEYS:
            raise ScenarioError(key, data[key], "unknown key; allowed: " + ", ".join(sorted(_TOP_KEYS)))
    if "gpus" not in data:
        raise ScenarioError("gpus", None, "required: how many GPUs the fake has, 1 to 64")
    gpus = _whole("gpus", data["gpus"], 1, 64)
    nvlink = _whole("nvlink_links", data.get("nvlink_links", 0), 0, 18)
    mig = _mig(data.get("mig", {}), gpus)
    recording = data.get("recording", "h200")
    if not isinstance(recording, str):
        raise ScenarioError("recording", recording, "must be 'h200' or a path to a recording")
    raw_events = data.get("events", [])
    if not isinstance(raw_events, list):
        raise ScenarioError("events", raw_events, "must be a list of events")
    nvml_fields = _nvml_field_names()
    events = []
    for i, raw in enumerate(raw_events):
        where = f"events[{i}]"
        if not isinstance(raw, Mapping):
            raise ScenarioError(where, raw, "must be an object with 'at' and 'gpu'")
        for key in raw:
            if key not in _EVENT_KEYS:
                raise ScenarioError(
                    f"{where}.{key}", raw[key], "unknown key; allowed: " + ", ".join(sorted(_EVENT_KEYS))
                )
        if "at" not in raw or "gpu" not in raw:
            raise ScenarioError(where, dict(raw), "needs 'at' (seconds) and 'gpu' (index)")
        at = _number(f"{where}.at", raw["at"])
        gpu = _whole(f"{where}.gpu", raw["gpu"], 0, gpus - 1)
        kinds = [k for k in ("field", "xid", "event", "lost", "timeouts", "error") if k in raw]
        if len(kinds) != 1:
            raise ScenarioError(where, dict(raw), "needs exactly one of: field, xid, event, lost, timeouts, error")
        until = _number(f"{where}.until", raw["until"], minimum=at) if "until" in raw else None
        kind = kinds[0]
        instance = None
        if "instance" in raw:
            if kind not in ("xid", "event"):
                raise ScenarioError(f"{where}.instance", raw["instance"], "goes with 'xid' or 'event' only")
            instance = _whole(f"{where}.instance", raw["instance"], 1, MAX_MIG_DEVICES)
        call = raw.get("call")
        if "call" in raw and (kind not in ("error", "timeouts") or call not in FAKE_CALLS):
            allowed = "allowed with 'error' or 'timeouts' only: " + ", ".join(FAKE_CALLS)
            raise ScenarioError(f"{where}.call", call, allowed)
        link = None
        if "link" in raw:
            if call != "nvmlDeviceGetNvLinkState" or kind != "error":
                raise ScenarioError(
                    f"{where}.link", raw["link"], "goes with 'error' and call 'nvmlDeviceGetNvLinkState'"
                )
            link = _whole(f"{where}.link", raw["link"], 0, 17)
        entry = None
        if "entry" in raw:
            entry = raw["entry"]
            if call != "nvmlDeviceGetFieldValues" or kind != "error":
                raise ScenarioError(f"{where}.entry", entry, "goes with 'error' and call 'nvmlDeviceGetFieldValues'")
            if not isinstance(entry, str) or (entry not in FIELD_BY_NAME and entry not in nvml_fields):
                allowed = "allowed: " + ", ".join(FIELD_BY_NAME) + ", or any pynvml NVML_FI_DEV_* name"
                raise ScenarioError(f"{where}.entry", entry, allowed)
            entry = _READABLE.get(nvml_fields.get(entry, -1), entry)
        if kind == "field":
            name = raw["field"]
            if not isinstance(name, str) or (name not in SIGNAL_NAMES and name not in nvml_fields):
                allowed = "allowed: " + ", ".join(SIGNAL_NAMES) + ", or any pynvml NVML_FI_DEV_* name"
                raise ScenarioError(f"{where}.field", name, allowed)
            # One field, one name: NVML_FI_DEV_PCIE_REPLAY_COUNTER is pcie_replay, the name gpuguard reads.
            name = _READABLE.get(nvml_fields.get(name, -1), name)
            changes = [c for c in _CHANGES if c in raw]
            if len(changes) != 1:
                raise ScenarioError(where, dict(raw), "a field event needs exactly one of: set, add, add_per_s")
            change = changes[0]
            value = _field_value(f"{where}.{change}", name, raw[change])
            events.append(
                ScenarioEvent(
                    at=at,
                    gpu=gpu,
                    field=name,
                    until=until,
                    set=value if change == "set" else None,
                    add=value if change == "add" else None,
                    add_per_s=value if change == "add_per_s" else None,
                )
            )
        elif kind == "xid":
            xid = _whole(f"{where}.xid", raw["xid"], 1, 65535)
            events.append(ScenarioEvent(at=at, gpu=gpu, xid=xid, until=until, instance=instance))
        elif kind == "event":
            if raw["event"] not in EVENT_NAMES:
                raise ScenarioError(f"{where}.event", raw["event"], "allowed: " + ", ".join(EVENT_NAMES))
            events.append(ScenarioEvent(at=at, gpu=gpu, event=raw["event"], until=until, instance=instance))
        elif kind == "lost":
            if raw["lost"] is not True:
                raise ScenarioError(f"{where}.lost", raw["lost"], "must be true")
            events.append(ScenarioEvent(at=at, gpu=gpu, lost=True, until=until))
        elif kind == "timeouts":
            timeouts = _whole(f"{where}.timeouts", raw["timeouts"], 1, 1000)
            events.append(ScenarioEvent(at=at, gpu=gpu, timeouts=timeouts, call=call, until=until))
        else:
            name = raw["error"]
            if not isinstance(name, str) or not isinstance(getattr(pynvml, f"NVMLError_{name}", None), type):
                raise ScenarioError(
                    f"{where}.error",
                    name,
                    "must name a pynvml error class without its prefix, e.g. 'Unknown'",
                )
            events.append(ScenarioEvent(at=at, gpu=gpu, error=name, until=until, call=call, link=link, entry=entry))
    events.sort(key=lambda e: e.at)
    extra = {k: data[k] for k in ("name", "description") if k in data}
    return Scenario(
        gpus=gpus,
        events=tuple(events),
        recording=recording,
        nvlink_links=nvlink,
        mig=mig,
        name=str(data.get("name", "")),
        extra=extra,
    )


def _mig(value: Any, gpus: int) -> dict[int, int]:
    """``{"0": 2}`` (JSON) or ``{0: 2}`` (YAML): GPU index -> MIG devices on it, MIG mode on."""
    if not isinstance(value, Mapping):
        raise ScenarioError("mig", value, "must map GPU indices to how many MIG devices each holds, e.g. {'0': 2}")
    out: dict[int, int] = {}
    for key, count in value.items():
        index = int(key) if isinstance(key, str) and key.isdigit() else key
        out[_whole("mig", index, 0, gpus - 1)] = _whole(f"mig.{key}", count, 0, MAX_MIG_DEVICES)
    return out


def field_id(name: str) -> int:
    """The NVML field id for a readable signal name or an ``NVML_FI_DEV_*`` name."""
    if name in FIELD_BY_NAME:
        return FIELD_BY_NAME[name].field_id
    return int(getattr(pynvml, name))
