"""The local tier against object storage: save (stall, time to durable) and restore, for one state size.

Stores are timed directly (a `CheckpointStore` on ``--local`` as the guard's local tier uses it, one on
``--object``), then a `Guard` periodic step is timed with no local tier, with one whose save also goes to
object storage (two snapshots: the local tier's and object storage's), and with one whose save stays local.
Overlap is off, so the stalls are the snapshots' whole cost (with overlap on, parameters are copied while
the next forward and backward run).

    .venv/bin/python benchmarks/local_tier.py --mib 512 --local /dev/shm/gpuguard-bench --object /tmp/gg-obj

``--object`` may be any fsspec URL (``s3://...`` with ``gpuguard[s3]``, credentials in the usual AWS
variables, ``--endpoint`` for another S3 service) or a path; ``--moto`` starts moto's S3 server here (as
``benchmarks/s3.py`` does: a slow server, about 60 MB/s on a 2-core machine) and uses a fresh bucket.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
import uuid
from typing import Any

import torch

from gpuguard import CheckpointStore, Guard
from gpuguard.fakenvml import FakeNvml


def make_state(mib: int) -> dict[str, Any]:
    count = 8
    per = mib * 2**20 // 4 // count
    return {"weights": {f"w{i}": torch.randn(per) for i in range(count)}}


def store_times(url: str, state: dict[str, Any], rounds: int, options: dict[str, Any]) -> dict[str, float]:
    stall, durable, restore = [], [], []
    with CheckpointStore(url, options, keep=2) as store:
        store.prepare(state)
        for i in range(rounds):
            started = time.perf_counter()
            pending = store.save(state, step=i + 1, reason="periodic")
            stall.append(time.perf_counter() - started)
            pending.wait()
            durable.append(time.perf_counter() - started)
        for _ in range(rounds):
            target = {"weights": {k: torch.empty_like(v) for k, v in state["weights"].items()}}
            started = time.perf_counter()
            store.load(target)
            restore.append(time.perf_counter() - started)
    return {
        "stall_s": round(statistics.median(stall), 4),
        "durable_s": round(statistics.median(durable), 4),
        "restore_s": round(statistics.median(restore), 4),
    }


def guard_stalls(obj: str, local: str, state: dict[str, Any], steps: int, options: dict[str, Any]) -> dict[str, float]:
    """Median guard.step() time at periodic steps: no local tier; local + object storage; local only."""
    out: dict[str, float] = {}
    cases = {
        "object_only": {},
        "local_and_object": {"local_dir": local, "object_store_every": 1},
        "local_only": {"local_dir": local, "object_store_every": 10**6},
    }
    for name, extra in cases.items():
        obj_case = f"{obj}/{name}"
        if obj.startswith("file://"):
            shutil.rmtree(obj_case.removeprefix("file://"), ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)
        times = []
        settings: dict[str, Any] = {"checkpoint_every_steps": 1, "checkpoint_every_s": 0, "overlap_snapshot": False}
        settings["storage_options"] = options
        with Guard(obj_case, state, nvml=FakeNvml.replay(), devices="all", keep=2, **settings, **extra) as guard:
            guard.step(0)  # plans the staging buffers (allocated in the background)
            time.sleep(2.0)
            for step in range(1, steps + 1):
                if name == "local_only" and step == 1:
                    guard.step(step)  # the first periodic also goes to object storage: not the case timed
                    continue
                started = time.perf_counter()
                guard.step(step)
                times.append(time.perf_counter() - started)
                for pending in [*guard.periodic, *(guard.local.pending if guard.local else [])]:
                    pending.wait()  # one save at a time: the stall, not the queue
        out[name] = round(statistics.median(times), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--local", default="/dev/shm/gpuguard-bench")
    parser.add_argument("--object", default="/tmp/gpuguard-bench-object")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--moto", action="store_true", help="object storage: moto's S3 server, started here")
    parser.add_argument("--endpoint", help="an S3 endpoint for an s3:// --object")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(2)
    obj = args.object if "://" in args.object else f"file://{args.object}"
    options: dict[str, Any] = {}
    server = None
    if args.moto or args.endpoint:
        endpoint = args.endpoint
        if args.moto:
            sys.path.insert(0, os.path.dirname(__file__))
            from s3 import start_moto

            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.setdefault(key, "testing")
            server, endpoint = start_moto()
        options = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        if args.moto:
            import s3fs

            bucket = f"gpuguard-tier-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(**options, skip_instance_cache=True).call_s3("create_bucket", Bucket=bucket)
            obj = f"s3://{bucket}/run"
    state = make_state(args.mib)
    try:
        result = {
            "mib": args.mib,
            "local": {"path": args.local, **store_times(args.local + "/store", state, args.rounds, {})},
            "object": {"url": obj, **store_times(obj + "/store", state, args.rounds, options)},
            "guard_step_s": guard_stalls(obj + "/guard", args.local + "/guard", state, args.rounds + 1, options),
        }
    finally:
        shutil.rmtree(args.local, ignore_errors=True)
        if "://" not in args.object and not args.moto:
            shutil.rmtree(args.object, ignore_errors=True)
        if server is not None:
            server.terminate()
            server.wait(10)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
