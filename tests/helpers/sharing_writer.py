"""One process saving and pruning on a shared URL until a deadline; prints each acknowledged id."""

from __future__ import annotations

import sys
import time

import torch

from gpuguard import CheckpointStore


def main(url: str, first_step: int, stride: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    step = first_step
    with CheckpointStore(url, keep=10_000) as store:
        while time.monotonic() < deadline:
            state = {"w": torch.full((2048,), float(step)), "step": step}
            info = store.save(state, step=step).wait()
            assert info is not None
            print(info.id, flush=True)  # acknowledged: from here on it must stay valid
            store.prune()
            step += stride


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
