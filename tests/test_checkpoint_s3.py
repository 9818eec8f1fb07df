"""S3 faults over real HTTP: moto's S3 server behind a proxy that answers chosen requests with S3's
own errors (503 SlowDown, 500 InternalError, 503 ServiceUnavailable, 400 RequestTimeout, 403
AccessDenied). gpuguard's retry layer alone retries (s3fs's and botocore's retries are off), so the
server sees exactly the tries the policy allows; and several writers share one S3 URL under throttling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.s3_proxy import S3FaultProxy

from gpuguard import CheckpointStore, RetryPolicy, StorageError

from conftest import s3_options

TESTS = Path(__file__).parent
# Quick backoffs: the same code paths as the defaults, without their seconds of waiting.
QUICK = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05, deadline_s=20.0)
SHARD, MANIFEST = r"/rank-00000-of-00001\.safetensors$", r"/MANIFEST\.json$"
LISTING = r"\?list-type=2"


@pytest.fixture
def proxied(s3_endpoint: str, s3_bucket: tuple[str, Any]) -> Iterator[tuple[S3FaultProxy, str, dict[str, Any]]]:
    """(proxy, url, storage options through the proxy) on a fresh bucket."""
    url, _ = s3_bucket
    with S3FaultProxy(s3_endpoint) as proxy:
        yield proxy, url, s3_options(proxy.url)


TRANSIENT = [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable"), (400, "RequestTimeout")]


@pytest.mark.parametrize(("status", "code"), TRANSIENT, ids=[code for _, code in TRANSIENT])
def test_transient_s3_errors_are_retried_once_each_by_gpuguard(
    proxied: tuple[S3FaultProxy, str, dict[str, Any]], status: int, code: str
) -> None:
    proxy, url, options = proxied
    for method, path in (("PUT", SHARD), ("PUT", MANIFEST), ("GET", LISTING), ("GET", SHARD)):
        proxy.fail(method, path, status, code, times=2)
    with CheckpointStore(url, options, retry=QUICK) as store:
        info = store.save({"w": torch.arange(16.0)}, step=3).wait()
        latest = store.latest()
        target = {"w": torch.zeros(16)}
        assert store.load(target) == 3
    assert info is not None and latest is not None and latest.id == info.id
    assert torch.equal(target["w"], torch.arange(16.0))
    # each failed twice, then passed on gpuguard's third try: no retry nested below it (s3fs, botocore)
    assert proxy.requests("PUT", SHARD) == [status, status, 200]
    assert proxy.requests("PUT", MANIFEST) == [status, status, 200]
    assert proxy.requests("GET", LISTING)[:3] == [status, status, 200]
    assert proxy.requests("GET", SHARD)[:2] == [status, status] and proxy.requests("GET", SHARD)[2] in (200, 206)


def test_throttling_that_outlasts_the_retries_fails_the_save_and_commits_nothing(
    proxied: tuple[S3FaultProxy, str, dict[str, Any]],
) -> None:
    proxy, url, options = proxied
    with CheckpointStore(url, options, retry=QUICK) as store:
        first = store.save({"w": torch.ones(4)}, step=1).wait()
        proxy.fail("PUT", MANIFEST, 503, "SlowDown", times=1000)
        with pytest.raises(StorageError, match=r"MANIFEST\.json: transient error, retries exhausted") as failed:
            store.save({"w": torch.full((4,), 2.0)}, step=2).wait()
        assert failed.value.transient and failed.value.operation == "writing"
        assert proxy.requests("PUT", MANIFEST) == [200] + [503] * QUICK.attempts  # bounded: the policy's tries
        assert first is not None and [c.id for c in store.list()] == [first.id]
        target = {"w": torch.zeros(4)}
        assert store.load(target) == 1 and torch.equal(target["w"], torch.ones(4))


def test_a_permanent_s3_error_is_not_retried(proxied: tuple[S3FaultProxy, str, dict[str, Any]]) -> None:
    proxy, url, options = proxied
    proxy.fail("PUT", MANIFEST, 403, "AccessDenied", times=1000)
    with CheckpointStore(url, options, retry=QUICK) as store:
        with pytest.raises(StorageError, match=r"MANIFEST\.json: error: .*Access Denied") as failed:
            store.save({"w": torch.ones(4)}, step=1).wait()
        assert not failed.value.transient
        assert proxy.requests("PUT", MANIFEST) == [403]
        assert store.list() == []


@pytest.mark.slow  # two processes for 6 s of saves and their start-up; the file:// case runs in the main suite
def test_two_processes_saving_and_pruning_on_one_throttled_s3_url_lose_nothing(
    proxied: tuple[S3FaultProxy, str, dict[str, Any]],
) -> None:
    # Every 4th write of any object (shards, records, leases, manifests: the commit's pipe_file included)
    # is throttled with 503 SlowDown, as S3 does a busy prefix; the writers prune each other's leftovers.
    proxy, url, options = proxied
    proxy.fail("PUT", r".", 503, "SlowDown", times=10_000, every=4)
    seconds = 6
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}",
        "SHARING_WRITER_STORAGE_OPTIONS": json.dumps(options),
    }
    script = str(TESTS / "helpers" / "sharing_writer.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, url, str(first), "2", str(seconds)], stdout=subprocess.PIPE, text=True, env=env
        )
        for first in (0, 1)
    ]
    acked: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        assert proc.returncode == 0
        acked += out.split()
    assert len(acked) >= 4 and proxy.requests("PUT", r".").count(503) >= 2  # it did throttle them
    with CheckpointStore(url, s3_options(_moto(proxy)), keep=10_000) as store:
        listed = {i.id for i in store.list()}
        assert [a for a in acked if a not in listed] == [], "acknowledged saves gone"
        assert [a for a in acked if not store.verify(a).ok] == []
        for checkpoint_id in acked[:: max(1, len(acked) // 6)]:
            target = {"w": torch.zeros(2048), "step": -1}
            step = store.load(target, checkpoint_id)
            assert target["step"] == step and torch.equal(target["w"], torch.full((2048,), float(step)))


def _moto(proxy: S3FaultProxy) -> str:
    host, port = proxy.upstream
    return f"http://{host}:{port}"
