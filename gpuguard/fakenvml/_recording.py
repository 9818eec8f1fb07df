"""A recorded GPU: what NVML answered on a real device, call by call and field by field."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pynvml

from gpuguard.errors import ScenarioError
from gpuguard.fakenvml._scenario import read_input

Answer = tuple[bool, Any]  # (ok, value) or (False, pynvml error class)


@dataclass(frozen=True)
class RecordedField:
    field_id: int
    ret: int
    value_type: int
    value: float | int


@dataclass(frozen=True)
class Recording:
    """Parsed recording: calls by probe name, fields by id, the supported event mask."""

    source: str
    calls: Mapping[str, Answer]
    fields: Mapping[int, RecordedField]
    supported_events: int

    def answer(self, name: str, default: Any = None) -> Answer:
        return self.calls.get(
            name, (default is not None, default if default is not None else pynvml.NVMLError_NotSupported)
        )


def _error_class(text: str) -> type[pynvml.NVMLError]:
    # "ERROR NVMLError_NotSupported: Not Supported" -> pynvml.NVMLError_NotSupported
    name = text.removeprefix("ERROR ").split(":", 1)[0].strip()
    cls = getattr(pynvml, name, None)
    if isinstance(cls, type) and issubclass(cls, pynvml.NVMLError):
        return cls
    not_supported: type[pynvml.NVMLError] = pynvml.NVMLError_NotSupported
    return not_supported  # the probe's own TypeErrors: treat as a feature this fake lacks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The recorded calls the fake answers from, and the shape each value must have: a wrongly typed one
# is refused when the recording is loaded (one line, naming it), not deep inside a poll.
_NUMERIC_CALLS = ("temp_gpu", "pcie_width", "pcie_maxwidth", "pcie_gen", "power_mw", "supported_events")
_TEXT_CALLS = ("uuid", "name", "driver")
_IDENTITY_CALLS = ("uuid", "name", "pci")


def _check_call_value(name: str, value: Any) -> None:
    where = f"recording.calls.{name}"
    if (name in _NUMERIC_CALLS or name.startswith("temp_threshold_")) and not _is_number(value):
        raise ScenarioError(where, value, "must be a number")
    if name == "nvmlDeviceGetCurrentClocksEventReasons" and not _is_int(value):
        raise ScenarioError(where, value, "must be a clock event reasons bit mask (integer)")
    if name in _TEXT_CALLS and not isinstance(value, str):
        raise ScenarioError(where, value, "must be a string")
    if name == "util" and not (isinstance(value, dict) and _is_number(value.get("gpu"))):
        raise ScenarioError(where, value, "must be an object with a numeric 'gpu'")
    if name == "pci" and not (isinstance(value, dict) and isinstance(value.get("busId"), str)):
        raise ScenarioError(where, value, "must be an object with a string 'busId'")


def load_recording(source: str | Path = "h200") -> Recording:
    """Load ``"h200"`` (shipped with gpuguard) or a recording file in the same format.

    Raises:
        ScenarioError: when the file is missing or is not a recording.
    """
    if str(source) == "h200":
        text = resources.files("gpuguard.fakenvml").joinpath("data/h200.json").read_text("utf-8")
        origin = "h200 (shipped recording)"
    else:
        path = Path(source)
        text = read_input("recording", path)
        origin = str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScenarioError("recording", origin, f"is not valid JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("calls"), dict)
        or not isinstance(data.get("fields"), dict)
    ):
        raise ScenarioError("recording", origin, "must be an NVML probe recording with 'calls' and 'fields' objects")
    # A recording answers for a GPU only if NVML named one: without these the fake could open nothing,
    # and a replay would pass as a node with no GPU problem.
    absent = [n for n in _IDENTITY_CALLS if not (isinstance(data["calls"].get(n), dict) and data["calls"][n].get("ok"))]
    if absent:
        raise ScenarioError(
            "recording",
            origin,
            "records no GPU: " + ", ".join(f"calls.{n}" for n in absent) + " missing or failed "
            "(record one with NVML on a real GPU; 'h200' is the shipped one)",
        )
    calls: dict[str, Answer] = {}
    for name, entry in data["calls"].items():
        if not isinstance(entry, dict) or "ok" not in entry:
            raise ScenarioError(f"recording.calls.{name}", entry, "must be an object with 'ok' and 'value'")
        if entry["ok"]:
            _check_call_value(name, entry.get("value"))
        calls[name] = (True, entry.get("value")) if entry["ok"] else (False, _error_class(str(entry.get("value"))))
    fields: dict[int, RecordedField] = {}
    for name, entry in data["fields"].items():
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            raise ScenarioError(f"recording.fields.{name}", entry, "must be an object with an integer 'id'")
        fid = entry["id"]
        if "ret" in entry:
            if not _is_int(entry["ret"]):
                raise ScenarioError(
                    f"recording.fields.{name}.ret", entry["ret"], "must be an NVML return code (integer)"
                )
            fields.setdefault(fid, RecordedField(fid, int(entry["ret"]), pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, 0))
        else:
            value, kind = entry.get("value", 0), entry.get("type", 3)
            if not _is_number(value):
                raise ScenarioError(f"recording.fields.{name}.value", value, "must be a number")
            if not _is_int(kind):
                raise ScenarioError(f"recording.fields.{name}.type", kind, "must be an nvmlValueType_t (integer)")
            fields[fid] = RecordedField(fid, pynvml.NVML_SUCCESS, int(kind), value)
    events = data.get("events", {})
    mask = events.get("supported_mask") if isinstance(events, dict) else None
    if mask is None:
        ok, value = calls.get("supported_events", (False, None))
        mask = value if ok else 0
    if not _is_int(mask):
        raise ScenarioError("recording.events.supported_mask", mask, "must be an event type bit mask (integer)")
    return Recording(source=origin, calls=calls, fields=fields, supported_events=int(mask))
