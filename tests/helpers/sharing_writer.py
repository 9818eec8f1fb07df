"""One process saving and pruning on a shared URL until a deadline; prints each acknowledged id.

``SHARING_WRITER_STORAGE_OPTIONS`` (JSON) holds the storage options, e.g. an S3 endpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from gpuguard import CheckpointStore


def main(url: str, first_step: int, stride: int, seconds: float) -> None:
    step = first_step
    options = json.loads(os.environ.get("SHARING_WRITER_STORAGE_OPTIONS", "{}"))
    with CheckpointStore(url, options, keep=10_000) as store:
        deadline = time.monotonic() + seconds  # from here: opening the store may be slow on a loaded machine
        saved = 0
        while time.monotonic() < deadline or saved < 2:  # two saves at least, however slow the machine
            saved += 1
            state = {"w": torch.full((2048,), float(step)), "step": step}
            info = store.save(state, step=step).wait()
            assert info is not None
            print(info.id, flush=True)  # acknowledged: from here on it must stay valid
            store.prune()
            step += stride


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
