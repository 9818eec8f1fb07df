"""How fast this storage takes a shard: a probe write, to estimate a checkpoint's save time at start."""

from __future__ import annotations

import time
import uuid

from gpuguard.checkpoint._storage import Storage

PROBE_FOLDER = ".gpuguard-probe"  # not a checkpoint folder name: readers and pruning pass it by


def measure_write_rate(storage: Storage, nbytes: int) -> float:
    """Bytes per second of writing ``nbytes`` durably the way a shard is written (the same writers,
    parts and fsync), to a probe file that is removed afterwards."""
    nbytes = max(1, int(nbytes))
    folder = storage.path(PROBE_FOLDER, uuid.uuid4().hex[:12])
    storage.makedirs(folder)
    data = memoryview(bytearray(nbytes))
    started = time.perf_counter()
    try:
        storage.write_shard(f"{folder}/probe", b"", data)
        elapsed = time.perf_counter() - started
    finally:
        storage.delete(folder, recursive=True)
    return nbytes / max(elapsed, 1e-6)
