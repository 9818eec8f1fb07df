"""Which NVML module this process reads: the one place above `gpuguard.health` and `gpuguard.fakenvml`.

The health monitor takes any ``pynvml``-compatible module. Choosing it here, rather than inside the
monitor, keeps the production code free of its own test double: `gpuguard.health` never imports
`gpuguard.fakenvml`; only this function does, and only when ``GPUGUARD_FAKE_NVML`` asks for it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("gpuguard.health")

FAKE_NVML_ENV = "GPUGUARD_FAKE_NVML"


def choose_nvml(nvml: Any = None) -> Any:
    """The NVML module to use: ``nvml`` when given, else the fake ``GPUGUARD_FAKE_NVML`` names, else ``pynvml``.

    ``GPUGUARD_FAKE_NVML`` (``h200``, a recording or a scenario file) puts a whole job, unmodified,
    through a fault without a broken GPU; it is said once, as a warning, so nobody mistakes the
    fake's answers for this machine's GPUs.

    Raises:
        ScenarioError: when ``GPUGUARD_FAKE_NVML`` names something that is not a recording or scenario.
    """
    if nvml is not None:
        return nvml
    value = os.environ.get(FAKE_NVML_ENV)
    if value:
        from gpuguard.fakenvml import FakeNvml

        fake = FakeNvml.from_env(value)
        log.warning("using the fake NVML (%s=%s), not this machine's GPUs", FAKE_NVML_ENV, value)
        return fake
    import pynvml

    return pynvml
