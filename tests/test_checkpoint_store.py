"""CheckpointStore against file://, memory:// and S3 over real HTTP (moto's server)."""

from __future__ import annotations

import json
import logging
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.training import assert_same, fresh_like, make_state, train_step

from gpuguard import (
    CheckpointCorruptError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointStore,
    ConfigError,
    UnsupportedStateError,
)


@pytest.fixture
def store(store_location: tuple[str, dict[str, Any]]) -> Any:
    url, options = store_location
    with CheckpointStore(url, options, keep=2) as s:
        yield s


def test_round_trip_is_bitwise_exact(store: CheckpointStore) -> None:
    state = make_state()
    info = store.save(state, step=1200, reason="periodic").wait()
    assert info is not None and info.step == 1200
    restored = fresh_like()
    assert store.load(restored) == 1200
    assert_same(state, restored)


def test_rng_states_come_back(store: CheckpointStore) -> None:
    state = make_state()
    store.save(state, step=5).wait()
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    store.load(fresh_like())
    got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_training_resumes_identically(store: CheckpointStore) -> None:
    state = make_state()
    store.save(state, step=3).wait()
    for _ in range(4):
        train_step(state["model"], state["optimizer"], state["scheduler"])
    resumed = fresh_like()
    store.load(resumed)
    for _ in range(4):
        train_step(resumed["model"], resumed["optimizer"], resumed["scheduler"])
    assert_same(state, resumed)


def test_the_snapshot_is_taken_before_save_returns(store: CheckpointStore) -> None:
    weights = torch.arange(1000, dtype=torch.float32)
    pending = store.save({"w": weights}, step=1)
    weights.add_(1000)  # training goes on while the write happens
    pending.wait()
    target = {"w": torch.zeros(1000)}
    store.load(target)
    assert torch.equal(target["w"], torch.arange(1000, dtype=torch.float32))
    assert pending.timings.stall_s <= pending.timings.durable_s


def test_latest_list_and_prune(store: CheckpointStore) -> None:
    assert store.latest() is None
    assert store.list() == []
    for step in (10, 20, 30, 40):
        store.save({"w": torch.full((4,), float(step))}, step=step, reason="periodic").wait()
    assert [i.step for i in store.list()] == [10, 20, 30, 40]
    latest = store.latest()
    assert latest is not None and latest.step == 40 and latest.reason == "periodic"
    pruned = store.prune()
    assert len(pruned) == 2
    assert [i.step for i in store.list()] == [30, 40]


def test_folders_without_a_manifest_are_never_trusted(store: CheckpointStore) -> None:
    store.save({"w": torch.ones(3)}, step=10).wait()
    leftover = store.storage.path("step-000000000005-deadbeef", "rank-00000-of-00001.safetensors")
    store.storage.put_atomic(leftover, b"partial")
    newer = store.storage.path("step-000000000099-deadbeef", "rank-00000-of-00001.safetensors")
    store.storage.put_atomic(newer, b"partial")
    assert [i.step for i in store.list()] == [10]
    assert store.load({"w": torch.zeros(3)}) == 10
    # neither holds a lease (no save of any process is writing them): both are garbage, whatever their step
    assert sorted(store.prune()) == ["step-000000000005-deadbeef", "step-000000000099-deadbeef"]
    assert [d for d in store.storage.list_dirs() if d.endswith("deadbeef")] == []


def test_evidence_and_reason_are_recorded(store: CheckpointStore) -> None:
    evidence = {"gpu": "GPU-19a3", "state": "FAILING", "reasons": [{"code": "XID", "xid": 48}]}
    store.save({"w": torch.ones(2)}, step=7, reason="emergency", evidence=evidence).wait()
    info = store.latest()
    assert info is not None
    assert (info.reason, dict(info.evidence)) == ("emergency", evidence)


def test_multi_rank_commit_waits_for_every_shard(store: CheckpointStore) -> None:
    cid = "step-000000000050-0123abcd"
    rank1_go = threading.Event()
    states = [{"w": torch.full((8,), float(r)), "rank": r} for r in range(2)]
    pending0 = store.save(states[0], step=50, rank=0, world_size=2, checkpoint_id=cid)
    # rank 0 is durable but cannot commit alone
    threading.Timer(0.3, rank1_go.set).start()
    rank1_go.wait()
    assert store.latest() is None
    pending1 = store.save(states[1], step=50, rank=1, world_size=2, checkpoint_id=cid)
    # rank 1 does not commit, but its wait() returns only once it has read rank 0's manifest back
    committed = pending1.wait(timeout=30)
    info = pending0.wait(timeout=30)
    assert info.world_size == 2 and committed == info
    for r in range(2):
        target: dict[str, Any] = {"w": torch.zeros(8), "rank": None}
        store.load(target, rank=r, world_size=2)
        assert torch.equal(target["w"], torch.full((8,), float(r))) and target["rank"] == r


def test_a_committed_checkpoint_is_never_overwritten(store: CheckpointStore) -> None:
    """Ids derived from the step come back in a rerun: the second save is refused, the first stays whole."""
    cid = "step-000000000070-0123abcd"
    first = store.save({"w": torch.full((64,), 1.0)}, step=70, checkpoint_id=cid).wait(30)
    with pytest.raises(CheckpointExistsError, match=f"checkpoint {cid} is already committed .*never overwritten"):
        store.save({"w": torch.full((64,), 2.0)}, step=70, checkpoint_id=cid).wait(30)
    assert [i.id for i in store.list()] == [first.id] and store.verify(cid).ok
    target = {"w": torch.zeros(64)}
    assert store.load(target) == 70 and torch.equal(target["w"], torch.full((64,), 1.0))


def test_unsupported_state_is_refused_by_path(store: CheckpointStore) -> None:
    with pytest.raises(UnsupportedStateError, match=r"state\['extras'\]\['hook'\]: cannot checkpoint a function"):
        store.save({"extras": {"hook": lambda: None}}, step=1)
    with pytest.raises(UnsupportedStateError, match="must be a mapping"):
        store.save([torch.ones(1)], step=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": -1}, r"step: -1 is not valid"),
        ({"step": 1, "reason": "boredom"}, r"reason: 'boredom' is not valid; allowed: emergency, periodic, manual"),
        ({"step": 1, "rank": 2, "world_size": 2, "checkpoint_id": "step-000000000001-0123abcd"}, r"rank: 2"),
        ({"step": 1, "world_size": 2}, r"checkpoint_id: None is not valid; required when world_size > 1"),
        ({"step": 1, "checkpoint_id": "../etc"}, r"checkpoint_id: '../etc' is not valid"),
    ],
    ids=["negative-step", "bad-reason", "rank-out-of-range", "missing-id", "bad-id"],
)
def test_bad_arguments_name_the_field(store: CheckpointStore, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        store.save({"w": torch.ones(1)}, **kwargs)


def test_bad_keep_is_refused() -> None:
    with pytest.raises(ConfigError, match="keep: 0 is not valid"):
        CheckpointStore("memory://x", keep=0)


def test_load_with_nothing_committed(store: CheckpointStore) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        store.load({"w": torch.zeros(1)})
    with pytest.raises(CheckpointNotFoundError, match="step-000000000001-0123abcd"):
        store.load({"w": torch.zeros(1)}, "step-000000000001-0123abcd")


def test_strict_load_names_missing_keys(store: CheckpointStore) -> None:
    store.save({"w": torch.ones(1)}, step=1).wait()
    with pytest.raises(CheckpointMismatchError, match=r"state\[.other.\]: the checkpoint has no entry for it"):
        store.load({"w": torch.zeros(1), "other": torch.zeros(1)})


# -- corruption ------------------------------------------------------------------------------------


def _shard_path(store: CheckpointStore, checkpoint_id: str) -> str:
    return store.storage.path(checkpoint_id, "rank-00000-of-00001.safetensors")


def _rewrite(store: CheckpointStore, path: str, change: Any) -> None:
    data = bytearray(store.storage.cat(path))
    store.storage.put_atomic(path, bytes(change(data)))


def _flip(data: bytearray, offset: int) -> bytearray:
    data[offset] ^= 0x10
    return data


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: _flip(d, len(d) - 3), r"tensor '.*' fails its checksum"),
        (lambda d: d[: len(d) // 2], r"bytes, the manifest says"),
        (lambda d: _flip(d, 12), r"header|fails its checksum|lies outside"),
    ],
    ids=["bit-flip-in-data", "truncated", "bit-flip-in-header"],
)
def test_corruption_is_detected_by_verify_and_load(store: CheckpointStore, change: Any, match: str) -> None:
    state = make_state()
    store.save(state, step=1).wait()
    store.save(state, step=2).wait()
    bad = store.latest()
    assert bad is not None
    _rewrite(store, _shard_path(store, bad.id), change)

    report = store.verify(bad.id)
    assert not report.ok
    assert report.problems[0]["shard"] == "rank-00000-of-00001.safetensors"
    target = fresh_like()
    before = {k: v.clone() for k, v in target["model"].state_dict().items()}
    with pytest.raises(CheckpointCorruptError, match=match):
        store.load(target)
    # nothing was half-restored
    assert all(torch.equal(before[k], v) for k, v in target["model"].state_dict().items())
    # asked to, load falls back to the previous valid checkpoint
    assert store.load(target, fallback=True) == 1
    assert_same(state, target)


def test_a_bit_flip_names_the_tensor(store: CheckpointStore) -> None:
    store.save({"a": torch.zeros(1000), "b": torch.ones(10)}, step=1, rng=False).wait()
    info = store.latest()
    assert info is not None
    path = _shard_path(store, info.id)
    raw = store.storage.cat(path)
    header_len = int.from_bytes(raw[:8], "little")
    a_start = json.loads(raw[8 : 8 + header_len])["a"]["data_offsets"][0]
    _rewrite(store, path, lambda d: _flip(d, 8 + header_len + a_start + 100))
    report = store.verify()
    assert [(p["shard"], p["tensor"]) for p in report.problems] == [("rank-00000-of-00001.safetensors", "a")]


def test_a_corrupt_manifest_is_not_a_checkpoint(store: CheckpointStore) -> None:
    store.save({"w": torch.ones(1)}, step=1).wait()
    store.save({"w": torch.ones(1)}, step=2).wait()
    latest = store.latest()
    assert latest is not None
    _rewrite(store, store.storage.path(latest.id, "MANIFEST.json"), lambda d: d.replace(b'"step": 2', b'"step": 3'))
    assert [i.step for i in store.list()] == [1]


def test_a_corrupt_manifest_is_said_once_not_at_every_listing(
    store: CheckpointStore, caplog: pytest.LogCaptureFixture
) -> None:
    # a guard lists its store at every resume, prune and save-time check: the same bad folder was said each time
    caplog.set_level(logging.WARNING, "gpuguard")
    store.save({"w": torch.ones(1)}, step=1).wait()
    bad = store.save({"w": torch.ones(1)}, step=2).wait()
    assert bad is not None
    _rewrite(store, store.storage.path(bad.id, "MANIFEST.json"), lambda d: b"")
    for _ in range(3):
        assert [i.step for i in store.list()] == [1]
        assert store.latest() is not None
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"ignoring {bad.id}")]
    assert len(said) == 1, said


def test_shards_are_standard_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {"f32": torch.randn(3, 5), "i16": torch.arange(7, dtype=torch.int16), "bf16": torch.randn(9).bfloat16()}
    tensors |= {"bool": torch.tensor([True, False]), "empty": torch.empty(0, 3), "strided": torch.randn(4, 6).t()}
    with CheckpointStore(str(tmp_path)) as store:
        info = store.save(dict(tensors), step=1, rng=False).wait()
        assert info is not None
    loaded = load_file(str(tmp_path / info.id / "rank-00000-of-00001.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_prepare_allocates_ahead(tmp_path: Path) -> None:
    state = make_state()
    with CheckpointStore(str(tmp_path)) as store:
        assert store.prepare(state) >= 0
        pending = store.save(state, step=1)
        pending.wait()
        assert pending.timings.stall_s < pending.timings.durable_s


def test_a_replicated_save_finds_the_buffer_prepared_for_its_part(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # replicated=True stages only this rank's part: prepared for the whole state, the buffer would not
    # fit the save's layout and the first save (an emergency one, perhaps) would allocate while training waits
    state = make_state()
    url, name = f"file://{tmp_path}/ckpt", "step-000000000005-0000beef"
    caplog.set_level(logging.WARNING, "gpuguard")
    with CheckpointStore(url) as rank0, CheckpointStore(url) as rank1:
        for rank, store in enumerate((rank0, rank1)):
            store.prepare(state, replicated=True, rank=rank, world_size=2)
        pending = [
            store.save(state, step=5, rank=rank, world_size=2, checkpoint_id=name, replicated=True)
            for rank, store in enumerate((rank0, rank1))
        ]
        assert all(p.wait() is not None for p in pending)
    assert not [r for r in caplog.records if "no staging buffer was prepared" in r.getMessage()]


def test_s3_multipart_upload(s3_bucket: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuguard.checkpoint._storage import Storage

    monkeypatch.setattr(Storage, "part_bytes", 5 * 2**20)  # S3's smallest part: 24 MiB go in 4 parts
    url, options = s3_bucket
    state = {"big": torch.randn(6 * 2**20)}
    with CheckpointStore(url, options) as store:
        info = store.save(state, step=3, rng=False).wait()
        assert info is not None and info.total_bytes > 24 * 2**20
        target = {"big": torch.zeros(6 * 2**20)}
        store.load(target)
        assert torch.equal(target["big"], state["big"])
        assert store.verify().ok
