"""A full filesystem: the failed save cleans up after itself, the previous checkpoint stays intact,
and saves succeed again as soon as space is freed."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import quota_fs
from helpers.quota_fs import QuotaFileSystem

from gpuguard import CheckpointStore, StorageError

STATE_BYTES = 256 * 1024


@dataclass
class SmallDisk:
    url: str
    fill: object  # () -> None: takes every free byte
    free: object  # () -> None: gives them back


def _tmpfs(root: Path) -> Iterator[SmallDisk] | None:
    """A real 4 MiB tmpfs, where the machine lets us mount one (root, CAP_SYS_ADMIN)."""
    mount = root / "mnt"
    mount.mkdir()
    if os.geteuid() != 0:
        return None
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        return None
    filler = mount / "filler"

    def fill() -> None:
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC

    def free() -> None:
        filler.unlink()

    def gen() -> Iterator[SmallDisk]:
        try:
            yield SmallDisk(f"file://{mount}/ckpt", fill, free)
        finally:
            subprocess.run(["umount", str(mount)], check=False)

    return gen()


def _quota() -> Iterator[SmallDisk]:
    quota_fs.reset()

    def fill() -> None:
        QuotaFileSystem.capacity = QuotaFileSystem.used()

    def free() -> None:
        QuotaFileSystem.capacity = 2**40

    yield SmallDisk("quota://ckpt", fill, free)
    quota_fs.reset()


@pytest.fixture(params=["tmpfs", "fake"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    if request.param == "tmpfs":
        disk = _tmpfs(tmp_path)
        if disk is None:
            pytest.skip("mounting a tmpfs needs root and CAP_SYS_ADMIN; the fake full disk covers it")
        yield from disk
    else:
        yield from _quota()


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((STATE_BYTES // 4,), value)}


def test_a_full_disk_keeps_the_previous_checkpoint_and_recovers(small_disk: SmallDisk) -> None:
    with CheckpointStore(small_disk.url) as store:
        first = store.save(_state(1.0), step=1).wait()
        assert first is not None
        small_disk.fill()  # type: ignore[operator]
        for step in (2, 3):  # every save fails cleanly while the disk is full, none wedges the next
            with pytest.raises(StorageError, match="No space left on device") as caught:
                store.save(_state(float(step)), step=step).wait(60)
            assert not caught.value.transient
        # the previous checkpoint is intact and still the newest
        latest = store.latest()
        assert latest is not None and latest.id == first.id
        assert store.verify(first.id).ok
        target = _state(0.0)
        assert store.load(target) == 1 and torch.equal(target["w"], _state(1.0)["w"])
        # the failed saves left nothing behind to hold the space
        assert [d for d in store.storage.list_dirs() if d.startswith("step-")] == [first.id]
        small_disk.free()  # type: ignore[operator]
        # space is back: the next save succeeds at once, with no prune needed in between
        info = store.save(_state(4.0), step=4).wait(60)
        assert info is not None and store.verify(info.id).ok
        assert store.load(target) == 4 and torch.equal(target["w"], _state(4.0)["w"])
