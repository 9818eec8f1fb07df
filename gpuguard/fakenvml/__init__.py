"""A fake NVML that answers like ``pynvml``, for tests, demos and laptops without GPUs.

Public API: test your own pipeline's failure handling without a broken GPU::

    from gpuguard.fakenvml import FakeNvml
    fake = FakeNvml.from_scenario({"gpus": 2, "events": [
        {"at": 0.0, "gpu": 1, "field": "ecc_sbe_volatile", "add_per_s": 50},
        {"at": 4.0, "gpu": 1, "xid": 48},
        {"at": 9.0, "gpu": 0, "lost": True},
    ]})
    monitor = gpuguard.HealthMonitor(fake)

Scenario events (``at`` in scenario seconds, ``gpu`` an index) take exactly one of:

- ``"field": NAME`` with ``"set": V``, ``"add": N`` or ``"add_per_s": R``: NAME is one of `FIELD_NAMES`
  or any ``NVML_FI_DEV_*`` name (the raw name of a field gpuguard reads *is* that signal:
  ``NVML_FI_DEV_PCIE_REPLAY_COUNTER`` is ``pcie_replay``); ``recovery_action`` takes names
  (``"GPU_RESET"``), ``clock_events`` a list (``["hw_slowdown"]``), ``nvlink_down`` a link index;
- ``"xid": N``: an XID critical error event, and what the hardware shows with it (`_effects`: XID 48
  a double-bit ECC count, XID 79 a lost GPU, ...);
- ``"event": KIND``: one of double_bit_ecc, dram_retirement_failure, gpu_unavailable,
  recovery_action, sbe_storm (with its effects too);
- ``"lost": true``: every call on that GPU raises ``NVMLError_GpuIsLost``, and every by-UUID open;
- ``"timeouts": N``: the next N calls on that GPU raise ``NVMLError_Timeout``;
- ``"error": NAME``: calls raise ``pynvml.NVMLError_<NAME>``.

``"until"`` ends any step: a ``set`` or ``add`` is undone (the GPU reset), an ``add_per_s`` stops, a lost
GPU answers again, timeouts and errors stop, an XID's effects end (lifetime counters keep theirs).
``"timeouts"`` and ``"error"`` take an optional ``"call"``: the one pynvml function that fails (one of
``FAKE_CALLS``), as real NVML fails per call; ``"link"`` (with ``"call": "nvmlDeviceGetNvLinkState"``)
fails one NVLink's state alone, ``"entry"`` (with ``"call": "nvmlDeviceGetFieldValues"``) one field of
the batched read. ``"instance"`` names the MIG GPU instance an XID or event concerns.

An event set sees only events after its creation, as NVML's do: a fault at ``"at": 0`` shows by what it
moved, as one that happened before the job started does.

Top level: ``gpus`` (required), ``events``, ``recording`` (``"h200"`` or a recording path),
``nvlink_links`` (links up per GPU; 0 as on the recorded H200), ``mig`` (``{"0": 2}``: MIG mode on for
GPU 0 with two MIG devices), ``name``, ``description``. `SCENARIO_KEYS` lists every key.
"""

from gpuguard.fakenvml._clock import ScenarioClock
from gpuguard.fakenvml._fake import FakeEventData, FakeHandle, FakeNvml
from gpuguard.fakenvml._play import play
from gpuguard.fakenvml._recording import Recording, load_recording
from gpuguard.fakenvml._scenario import (
    EVENT_NAMES,
    FAKE_CALLS,
    SCENARIO_KEYS,
    Scenario,
    ScenarioEvent,
    load_scenario,
)
from gpuguard.health.signals import SIGNAL_NAMES as FIELD_NAMES

__all__ = [
    "EVENT_NAMES",
    "FAKE_CALLS",
    "FIELD_NAMES",
    "SCENARIO_KEYS",
    "FakeEventData",
    "FakeHandle",
    "FakeNvml",
    "Recording",
    "Scenario",
    "ScenarioClock",
    "ScenarioEvent",
    "load_recording",
    "load_scenario",
    "play",
]
