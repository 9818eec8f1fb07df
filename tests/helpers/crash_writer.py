"""A zygote for crash tests: imports torch and gpuguard once, then forks checkpoint writers on request.

Arguments: URL, storage options as JSON, and optionally the number of float32 elements every child saves.
Protocol on stdin/stdout, one line each: ``fork SEED`` answers the child's pid; ``reap PID`` waits for
a killed child and answers ``ok``. Each child saves forever: step s holds a tensor filled with s, so a
loaded checkpoint can be checked for meaning, not only checksums.
"""

from __future__ import annotations

import json
import os
import random
import sys

import torch

from gpuguard import CheckpointStore


def write_forever(url: str, options: dict[str, object], seed: int, numel: int | None) -> None:
    rng = random.Random(seed)
    store = CheckpointStore(url, options, keep=3, io_threads=4)
    latest = store.latest()
    step = latest.step + 1 if latest else 0
    numel = numel or rng.choice([2**18, 2**19, 2**20])  # 1 to 4 MiB of float32
    state = {"w": torch.empty(numel), "small": torch.empty(16, dtype=torch.int64), "meta": {"seed": seed}}
    store.prepare(state)
    while True:
        state["w"].fill_(float(step))
        state["small"].fill_(step)
        state["meta"]["step"] = step
        store.save(state, step=step, reason="periodic").wait()
        store.prune()
        step += 1


def main() -> None:
    url = sys.argv[1]
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    numel = int(sys.argv[3]) if len(sys.argv) > 3 else None  # every child's state the same size
    for line in sys.stdin:
        command, arg = line.split()
        if command == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    write_forever(url, options, int(arg), numel)
                finally:
                    os._exit(0)
            print(pid, flush=True)
        elif command == "reap":
            os.waitpid(int(arg), 0)
            print("ok", flush=True)


if __name__ == "__main__":
    main()
