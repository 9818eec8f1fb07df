"""Loads read straight into the memory the state ends up in: aligned for every dtype, verified before the
live state changes, views of one storage kept as one storage, and format 1 checkpoints still read."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gpuguard import CheckpointCorruptError, CheckpointStore

from conftest import ROOT, TESTS

V1 = TESTS / "data" / "checkpoint-v1"

# In a fresh process: a misaligned complex128 tensor kills the process (SIGSEGV), which must fail the
# test with a message, not take pytest down. For every name length from 1 to 16 (the header's length
# moves with it, through every residue mod 16), save, load into a fresh state, and run kernels on it.
_EVERY_NAME_LENGTH = """
import struct, sys, torch
from gpuguard import CheckpointStore
url = sys.argv[1]
with CheckpointStore(url, keep=100) as store:
    for n in range(1, 17):  # a full turn of every header length mod 16 (8 of these crashed in format 1)
        name = "z" * n
        value = torch.arange(5, dtype=torch.float64) * (1 + 2j)
        info = store.save({name: value, "step": n}, step=n, rng=False).wait()
        path = store.storage.path(info.id, "rank-00000-of-00001.safetensors")
        head = store.storage.cat(path)[:8]
        base = 8 + struct.unpack("<Q", head)[0]
        assert base % 64 == 0, (n, base)
        target = {}
        store.load(target, info.id, strict=False)
        got = target[name]
        assert got.data_ptr() % 16 == 0, (n, got.data_ptr() % 16)
        assert torch.equal((got * 2).sum(), (value * 2).sum()) and torch.equal(got.clone(), value), n
print("ok")
"""


def test_complex128_loads_whatever_the_name_length() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _EVERY_NAME_LENGTH, "memory://every-name-length"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_a_format_1_checkpoint_with_a_misaligned_complex128_still_loads(tmp_path: Path) -> None:
    # Written by the previous release: the header is padded to 8 bytes, and this name puts the complex128
    # tensor's bytes 8 bytes off its alignment in the file.
    shutil.copytree(V1, tmp_path / "ckpt", ignore=shutil.ignore_patterns("expected.json"))
    expected = json.loads((V1 / "expected.json").read_text())
    with CheckpointStore(f"file://{tmp_path}/ckpt") as store:
        (info,) = store.list()
        manifest = json.loads((tmp_path / "ckpt" / info.id / "MANIFEST.json").read_text())
        assert manifest["format_version"] == 1
        shard = (tmp_path / "ckpt" / info.id / "rank-00000-of-00001.safetensors").read_bytes()
        base = 8 + struct.unpack("<Q", shard[:8])[0]
        header = json.loads(shard[8:base])
        assert (base + header["zzzzzzzz"]["data_offsets"][0]) % 16 == 8  # the case that crashed
        assert store.verify().ok
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        state = {"model": model, "optimizer": optimizer, "zzzzzzzz": torch.zeros(5, dtype=torch.complex128)}
        assert store.load(state, strict=False) == 7
    z = state["zzzzzzzz"]
    assert torch.equal(torch.view_as_real(z), torch.tensor(expected["zzzzzzzz"], dtype=torch.float64))
    assert torch.equal((z * 2).sum(), z.sum() * 2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, torch.tensor(expected[f"model/{name}"])), name
    assert state["extra"][3] == "x" and state["extra"]["t"][:2] == (1, 2.5)


@pytest.mark.parametrize("where", ["file", "memory"])  # a verifying pass then a direct read; staged and moved
def test_live_tensors_receive_the_bytes_in_place(where: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    plain = torch.randn(1000)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    with CheckpointStore(f"file://{tmp_path}/ckpt" if where == "file" else "memory://in-place") as store:
        store.prepare({"model": model, "optimizer": optimizer, "plain": plain})
        store.save({"model": model, "optimizer": optimizer, "plain": plain}, step=1).wait()
        weight, moment, plain_before = model.weight, optimizer.state[model.weight]["exp_avg"], plain.clone()
        addresses = (weight.data_ptr(), moment.data_ptr(), plain.data_ptr())
        with torch.no_grad():
            model.weight.mul_(3)
            moment.mul_(3)
            plain.mul_(3)
        state = {"model": model, "optimizer": optimizer, "plain": plain}
        assert store.load(state) == 1
    assert state["plain"] is plain and torch.equal(plain, plain_before)
    # the same memory holds the loaded values: references the training loop holds stay live
    assert (model.weight.data_ptr(), optimizer.state[model.weight]["exp_avg"].data_ptr(), plain.data_ptr()) == addresses
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert all(
        torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(saved_moments, model.parameters(), strict=True)
    )


def test_a_corrupt_tensor_changes_no_live_tensor(tmp_path: Path) -> None:
    big = {"a": torch.randn(300_000), "b": torch.randn(300_000), "c": torch.randn(10)}
    with CheckpointStore(f"file://{tmp_path}/ckpt") as store:
        store.prepare(big)
        info = store.save(big, step=1, rng=False).wait()
        assert info is not None
        path = tmp_path / "ckpt" / info.id / "rank-00000-of-00001.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 0xFF  # the last tensor in the file: every other one reads and verifies first
        path.write_bytes(bytes(raw))
        live = {k: torch.zeros_like(v) for k, v in big.items()}
        with pytest.raises(CheckpointCorruptError, match="fails its checksum"):
            store.load(live)
        assert all(not v.any() for v in live.values())


def test_views_of_one_storage_come_back_as_views_of_one_storage() -> None:
    base = torch.arange(24.0)
    views = {
        "whole": base,
        "rows": base.view(4, 6),
        "column": base.view(4, 6)[:, 2],  # strided
        "tail": base[10:],
        "bits": base[:4].view(torch.int32),  # another dtype over the same bytes
    }
    other = torch.ones(3)
    with CheckpointStore("memory://views") as store:
        store.save({"buffers": views, "other": {"x": other, "y": other[1:]}}, step=1).wait()
        target: dict[str, object] = {"buffers": None, "other": None}
        store.load(target)
    got = target["buffers"]
    assert isinstance(got, dict)
    for name, value in views.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
        assert got[name].stride() == value.stride(), name
    storage = got["whole"].untyped_storage().data_ptr()
    assert all(v.untyped_storage().data_ptr() == storage for v in got.values())
    got["whole"][12] = -1.0  # seen through every view, as before the save
    assert got["rows"][2, 0] == -1.0 and got["tail"][2] == -1.0 and got["column"][2] == got["rows"][2, 2]
    pair = target["other"]
    assert isinstance(pair, dict)
    pair["x"][2] = 7.0
    assert pair["y"][1] == 7.0


@pytest.fixture
def counted() -> Iterator[type[Any]]:
    from helpers import counting_fs

    counting_fs.reset()
    yield counting_fs.CountingFileSystem
    counting_fs.reset()


def test_tensors_that_follow_one_another_in_the_file_are_read_in_one_request(counted: type[Any]) -> None:
    # 300 small tensors (a model's biases and norms, say): one ranged read for all their bytes, not one
    # each (an object store would answer 300 GETs, each paying a round trip).
    state = {f"t{i:03d}": torch.full((64 + i,), float(i)) for i in range(300)}
    with CheckpointStore("counted://run") as store:
        store.prepare(state)
        info = store.save(state, step=1, rng=False).wait()
        assert info is not None
        for target in ({k: torch.zeros_like(v) for k, v in state.items()}, {k: None for k in state}):
            counted.reads.clear()  # into live tensors (through the staging buffer), then into fresh ones
            assert store.load(target) == 1
            assert all(torch.equal(target[k], v) for k, v in state.items())
            assert len(counted.reads) == 2, counted.reads[:4]  # the header, then every tensor's bytes at once
            header, data = counted.reads
            assert header[1] == 0 and data[1] == header[2], counted.reads
            assert data[2] - data[1] == sum(v.numel() * 4 for v in state.values())
