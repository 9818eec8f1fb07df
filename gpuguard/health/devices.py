"""Which NVML devices belong to this job.

NVML numbers GPUs in PCI bus order and ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers them fastest
first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. Only the UUID names the same GPU in both, so the job's
CUDA devices are mapped to NVML devices by UUID.
"""

from __future__ import annotations

import os
import sys


def cuda_device_uuids() -> list[str] | None:
    """UUIDs (``GPU-...``) of the CUDA devices this process sees, or None when CUDA is not in use.

    Only asks torch when the program has already imported it, so a CLI run stays light.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        uuids = []
        for index in range(torch.cuda.device_count()):
            raw = str(torch.cuda.get_device_properties(index).uuid)
            uuids.append(raw if raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}")
        return uuids
    except Exception:  # an old torch without .uuid, or a broken CUDA setup: fall back to the env
        return None


def job_device_selection() -> list[int | str] | None:
    """The NVML selection for this job: UUIDs, NVML indices, or None for every GPU.

    In order: the CUDA devices' UUIDs; UUIDs in ``CUDA_VISIBLE_DEVICES``; its indices when
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes them NVML indices too; otherwise every GPU.
    """
    uuids = cuda_device_uuids()
    if uuids:
        return list(uuids)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return None
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if all(e.startswith(("GPU-", "MIG-")) for e in entries):
        return list(entries)
    if all(e.isdigit() for e in entries) and os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        return [int(e) for e in entries]
    return None
