"""A writer in its own process whose save stays in flight, for pruners in other processes to judge.

    python lease_writer.py gather URL ID        # rank 0 of 2: writes its files, then waits for rank 1 forever
    python lease_writer.py upload URL OPTIONS   # one save to S3 whose multipart upload stalls after one part

``upload`` lets the first part through and holds every other ``upload_part`` call for ten minutes (a
fake stalled link at the S3 client), so that the save is mid-upload for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import torch

from gpuguard import CheckpointStore, RetryPolicy


def gather(url: str, checkpoint_id: str) -> None:
    with CheckpointStore(url) as store:
        state = {"w": torch.arange(1 << 16, dtype=torch.float32)}
        store.save(
            state, step=int(checkpoint_id[5:17]), world_size=2, checkpoint_id=checkpoint_id, commit_timeout_s=3600
        )
        print("saving", flush=True)
        sys.stdin.read()  # until killed


def upload(url: str, options: dict[str, Any]) -> None:
    import fsspec.asyn
    import s3fs

    from gpuguard.checkpoint._storage import Storage

    Storage.part_bytes = 5 << 20  # S3's smallest part: a 24 MiB shard goes in 4 parts
    call = s3fs.S3FileSystem._call_s3

    async def slow(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part" and kwargs.get("PartNumber", 1) > 1:
            await asyncio.sleep(600)
        return await call(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = slow
    s3fs.S3FileSystem.call_s3 = fsspec.asyn.sync_wrapper(slow)  # the blocking twin gpuguard calls
    # A deadline longer than the test: the writer must not give up (and abort its upload) on its own.
    with CheckpointStore(url, options, retry=RetryPolicy(deadline_s=3600, attempt_timeout_s=3600)) as store:
        store.save({"big": torch.ones(6 << 20)}, step=1, rng=False)
        print("saving", flush=True)
        sys.stdin.read()  # until killed


if __name__ == "__main__":
    if sys.argv[1] == "gather":
        gather(sys.argv[2], sys.argv[3])
    else:
        upload(sys.argv[2], json.loads(sys.argv[3]))
