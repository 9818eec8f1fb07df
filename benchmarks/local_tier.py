"""The local tier against object storage: save (stall, time to durable) and restore, for one state size.

Stores are timed directly (a `CheckpointStore` on ``--local`` as the guard's local tier uses it, one on
``--object``), then a `Guard` periodic step (the training thread's stall) is timed, the cases interleaved
over ``--passes`` passes: no local tier (the plain one-tier save), a save kept local, and a save to both
tiers twice: as it was (each tier its own snapshot of the live state: ``both_two_snapshots``) and as it is
(one snapshot, object storage's copied from the local tier's staging buffer on a thread:
``both_one_snapshot``), with each stall's ratio to the one-tier save's. Overlap is off, so the stalls are
the snapshots' whole cost (with overlap on, parameters are copied while the next forward and backward run).

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


CASES: dict[str, dict[str, Any]] = {
    "object_only": {},  # no local tier: the plain one-tier save
    "local_only": {"object_store_every": 10**6},
    "both_two_snapshots": {"object_store_every": 1, "lends_snapshot": False},  # before: each tier its own snapshot
    "both_one_snapshot": {"object_store_every": 1},  # now: object storage's copied from the local tier's
}


def guard_stalls(
    obj: str, local: str, state: dict[str, Any], steps: int, passes: int, options: dict[str, Any]
) -> dict[str, Any]:
    """guard.step() at periodic steps, per case (`CASES`), the cases interleaved over ``passes`` passes of
    ``steps`` saves each: the median stall, its ratio to the one-tier save's, and object storage's median
    seconds to durable."""
    times: dict[str, list[float]] = {name: [] for name in CASES}
    durable: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(passes):
        for name, case in CASES.items():
            obj_case = f"{obj}/{name}"
            if obj.startswith("file://"):
                shutil.rmtree(obj_case.removeprefix("file://"), ignore_errors=True)
            shutil.rmtree(local, ignore_errors=True)
            settings: dict[str, Any] = {"checkpoint_every_steps": 1, "checkpoint_every_s": 0, "overlap_snapshot": False}
            settings["storage_options"] = options
            if name != "object_only":
                settings |= {"local_dir": local, "object_store_every": case["object_store_every"]}
            with Guard(obj_case, state, nvml=FakeNvml.replay(), devices="all", keep=2, **settings) as guard:
                if guard.local is not None:
                    guard.local.lends_snapshot = case.get("lends_snapshot", True)
                guard.step(0)  # plans the staging buffers (allocated in the background)
                time.sleep(2.0)
                for step in range(1, steps + 1):
                    if name == "local_only" and step == 1:
                        guard.step(step)  # the first periodic also goes to object storage: not the case timed
                        continue
                    started = time.perf_counter()
                    guard.step(step)
                    times[name].append(time.perf_counter() - started)
                    for pending in [*guard.periodic, *(guard.local.pending if guard.local else [])]:
                        pending.wait()  # one save at a time: the stall, not the queue
                    if name != "local_only":
                        durable[name].append(guard.periodic[-1].timings.durable_s)
    base = statistics.median(times["object_only"])
    return {
        "stall_s": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "stall_vs_object_only": {name: round(statistics.median(t) / base, 2) for name, t in times.items()},
        "object_durable_s": {name: round(statistics.median(d), 4) for name, d in durable.items() if d},
        "saves_per_case": len(times["object_only"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--local", default="/dev/shm/gpuguard-bench")
    parser.add_argument("--object", default="/tmp/gpuguard-bench-object")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2, help="interleaved passes over the guard cases")
    parser.add_argument("--skip-stores", action="store_true", help="time the guard cases only")
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
        result: dict[str, Any] = {"mib": args.mib}
        if not args.skip_stores:
            result["local"] = {"path": args.local, **store_times(args.local + "/store", state, args.rounds, {})}
            result["object"] = {"url": obj, **store_times(obj + "/store", state, args.rounds, options)}
        guard = args.local + "/guard"
        result["guard_step"] = guard_stalls(obj + "/guard", guard, state, args.rounds + 1, args.passes, options)
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
