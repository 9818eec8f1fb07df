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
    calls: dict[str, Answer] = {}
    for name, entry in data["calls"].items():
        if not isinstance(entry, dict) or "ok" not in entry:
            raise ScenarioError(f"recording.calls.{name}", entry, "must be an object with 'ok' and 'value'")
        calls[name] = (True, entry.get("value")) if entry["ok"] else (False, _error_class(str(entry.get("value"))))
    fields: dict[int, RecordedField] = {}
    for name, entry in data["fields"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise ScenarioError(f"recording.fields.{name}", entry, "must be an object with an integer 'id'")
        fid = entry["id"]
        if "ret" in entry:
            fields.setdefault(fid, RecordedField(fid, int(entry["ret"]), pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, 0))
        else:
            fields[fid] = RecordedField(fid, pynvml.NVML_SUCCESS, int(entry.get("type", 3)), entry.get("value", 0))
    events = data.get("events", {})
    mask = events.get("supported_mask") if isinstance(events, dict) else None
    if mask is None:
        ok, value = calls.get("supported_events", (False, None))
        mask = value if ok else 0
    return Recording(source=origin, calls=calls, fields=fields, supported_events=int(mask))
