"""Checkpoints to S3 over real HTTP: gpuguard against torch.save uploaded with s3fs, and a raw upload.

    python benchmarks/s3.py [--size-mib 128] [--repeats 3] [--endpoint URL] [--json]

Without ``--endpoint`` it starts moto's S3 server on 127.0.0.1 (its own process, as the tests do), so
the figures measure the client side — multipart parts, checksums, commit — against a server that
is itself slow (about 60 MB/s on a 2-core machine); against a real S3 endpoint pass ``--endpoint``
and credentials in the usual AWS variables. Each method writes and reads back the same state; the
bucket holds one method's objects at a time.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import torch

from gpuguard import CheckpointStore

sys.path.insert(0, os.path.dirname(__file__))
from checkpoint import _host_bytes, build_state, machine, state_bytes


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", help="an S3 endpoint (default: moto's server, started here)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import s3fs

    server = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
            os.environ.setdefault(key, value)
        server, endpoint = start_moto()
    options = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}, "skip_instance_cache": True}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"gpuguard-bench-{uuid.uuid4().hex[:8]}"
    fs.call_s3("create_bucket", Bucket=bucket)
    state = build_state(args.size_mib, "cpu")
    chunks, _hosts = _host_bytes(state)
    raw = b"".join(bytes(c) for c in chunks)
    store = CheckpointStore(f"s3://{bucket}/gpuguard", options, keep=1)
    store.prepare(state)
    runs: dict[str, list[dict[str, float]]] = {"gpuguard": [], "torch.save + s3fs": [], "raw upload": []}
    try:
        for rep in range(args.repeats):
            start = time.perf_counter()
            pending = store.save(state, step=rep + 1, reason="periodic")
            stall = time.perf_counter() - start
            pending.wait()
            durable = time.perf_counter() - start
            start = time.perf_counter()
            store.load(state)
            runs["gpuguard"].append({"stall_s": stall, "durable_s": durable, "resume_s": time.perf_counter() - start})
            store.prune()

            path = f"{bucket}/torch/ckpt.pt"
            start = time.perf_counter()
            buffer = io.BytesIO()
            torch.save({"model": state["model"].state_dict(), "optimizer": state["optimizer"].state_dict()}, buffer)
            fs.pipe_file(path, buffer.getvalue())
            durable = time.perf_counter() - start
            start = time.perf_counter()
            loaded = torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True)
            state["model"].load_state_dict(loaded["model"])
            state["optimizer"].load_state_dict(loaded["optimizer"])
            runs["torch.save + s3fs"].append(
                {"stall_s": durable, "durable_s": durable, "resume_s": time.perf_counter() - start}
            )
            fs.rm(path)

            path = f"{bucket}/raw/bytes.bin"
            start = time.perf_counter()
            fs.pipe_file(path, raw)
            durable = time.perf_counter() - start
            start = time.perf_counter()
            fs.cat_file(path)
            runs["raw upload"].append(
                {"stall_s": float("nan"), "durable_s": durable, "resume_s": time.perf_counter() - start}
            )
            fs.rm(path)
    finally:
        store.close()
        fs.rm(bucket, recursive=True)
        if server is not None:
            server.terminate()
            server.wait(10)

    def median(name: str, key: str) -> float:
        values = [r[key] for r in runs[name] if not math.isnan(r[key])]  # NaN: not applicable
        return round(statistics.median(values), 4) if values else float("nan")

    results = {name: {k: median(name, k) for k in ("stall_s", "durable_s", "resume_s")} for name in runs}
    summary: dict[str, Any] = {
        "benchmark": "s3",
        "command": f"python benchmarks/s3.py --size-mib {args.size_mib} --repeats {args.repeats}",
        "machine": machine(),
        "endpoint": "moto server on 127.0.0.1" if server is not None else endpoint,
        "size_mib": round(state_bytes(state) / 2**20, 1),
        "repeats": args.repeats,
        "results": results,
        "ratios": {
            "durable_vs_raw_upload": round(results["gpuguard"]["durable_s"] / results["raw upload"]["durable_s"], 3),
            "stall_vs_torch_save": round(results["gpuguard"]["stall_s"] / results["torch.save + s3fs"]["stall_s"], 4),
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['size_mib']} MiB to S3 ({summary['endpoint']}), median of {args.repeats}")
    for name, r in results.items():
        print(f"  {name:<20} stall {r['stall_s']:.4f} s  durable {r['durable_s']:.3f} s  resume {r['resume_s']:.3f} s")
    print(f"  gpuguard durable / raw upload: {summary['ratios']['durable_vs_raw_upload']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
