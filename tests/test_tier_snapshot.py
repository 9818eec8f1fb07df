"""A periodic save that goes to both tiers reads the live state once, on the training thread.

The local tier's snapshot is lent to object storage's save, which copies it on a thread from the local tier's
staging buffer, never from the live tensors. Counted two ways (see helpers.snapshot_reads): ``state_dict()``
calls, and the staging copies whose source is the live state's memory, by thread. The same counts with the
lending turned off (the two snapshots this replaced) show that the counters can tell. Both tiers' copies of
every save are loaded back and compared bitwise with the state of that step, while the training loop wrote
garbage into the live tensors the moment each ``guard.step()`` returned.

The 2-rank version (gloo, FSDP2 and replicated) is in tests/test_local_tier.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.snapshot_reads import Counted, LiveReads, live_pointers

import gpuguard
from gpuguard import CheckpointStore, Guard
from gpuguard.checkpoint._staging import StagingBuffer
from gpuguard.fakenvml import FakeNvml

SAVES = (2, 4, 6)  # periodic steps, each to both tiers (object_store_every=1)


def local_store(local: Path) -> CheckpointStore:
    (rank,) = local.glob("job-*/world-1/rank-0")
    return CheckpointStore(str(rank))


def values(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    out["counted"] = state["counted"].value.clone()
    if "optimizer" in state:
        for i, per in state["optimizer"].state_dict()["state"].items():
            out.update({f"optim.{i}.{k}": v.clone() for k, v in per.items() if isinstance(v, torch.Tensor)})
    return out


def fresh(optimizer: bool) -> dict[str, Any]:
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    state: dict[str, Any] = {"model": net, "counted": Counted()}
    if optimizer:  # one step: AdamW creates its moments there (a load needs them, the counters their addresses)
        state["optimizer"] = torch.optim.AdamW(net.parameters(), lr=1e-2)
        net(torch.randn(2, 32)).sum().backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad()
    return state


def check_both_tiers(url: str, local: Path, kept: dict[int, dict[str, torch.Tensor]], optimizer: bool) -> None:
    """Every save is committed in both tiers, verifies, and loads back bitwise the state of its step."""
    for store in (CheckpointStore(url), local_store(local)):
        infos = store.list()
        assert [i.step for i in infos] == list(SAVES), store.url
        for info in infos:
            assert store.verify(info.id).ok, (store.url, info.id)
            target = fresh(optimizer)
            store.load(target, info.id)
            got = values(target)
            assert sorted(got) == sorted(kept[info.step]), store.url
            assert all(torch.equal(got[k], kept[info.step][k]) for k in got), (store.url, info.step)


@pytest.mark.parametrize(("lends", "reads"), [(True, 1), (False, 2)], ids=["one-snapshot", "two-snapshots-before"])
def test_a_save_to_both_tiers_reads_the_live_state_once_on_the_training_thread(
    tmp_path: Path, lends: bool, reads: int
) -> None:
    url, local = f"file://{tmp_path / 'object'}", tmp_path / "local"
    state = fresh(optimizer=False)
    net, counted = state["model"], state["counted"]
    kept: dict[int, dict[str, torch.Tensor]] = {}
    options: dict[str, Any] = {"checkpoint_every_steps": 2, "checkpoint_every_s": 0, "keep": 10}
    options |= {"overlap_snapshot": False, "sudden_loss": False, "local_dir": str(local)}
    calls = 0
    with Guard(url, state, nvml=FakeNvml.replay(), devices="all", **options) as guard:
        assert guard.local is not None
        guard.local.lends_snapshot = lends  # off: the two snapshots this change replaced (the benchmark's "before")
        with LiveReads(live_pointers(state)) as live:
            for step in range(guard.resume(), 7):
                with torch.no_grad():
                    for p in net.parameters():
                        p.fill_(float(step))
                    counted.value.fill_(float(-step))
                kept[step] = values(state)
                before = counted.calls
                guard.step(step)
                if step in SAVES:
                    calls += counted.calls - before
                with torch.no_grad():  # the loop goes on at once: what a save copies later must not see this
                    for p in net.parameters():
                        p.fill_(float("nan"))
                    counted.value.fill_(float("nan"))
            guard.close()  # every save of both tiers committed
    assert calls == reads * len(SAVES)  # state_dict() per save
    assert counted.threads == {threading.main_thread().name}
    assert set(live.per_tensor().values()) == {reads * len(SAVES)}  # every live tensor, `reads` times a save
    assert live.threads() == {threading.main_thread().name}  # no other thread read the live state
    # the object-storage copies came from the local tier's staging buffer, on their own thread
    assert ("gpuguard-ckpt-tier-copy" in live.other) is lends
    check_both_tiers(url, local, kept, optimizer=False)


def held_deferred_copies(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Overlapped copies wait for the returned event (the private seam of test_checkpoint_overlap: otherwise
    whether object storage's copy could start before the local snapshot is complete is a matter of timing)."""
    release = threading.Event()
    deferred = StagingBuffer.snapshot_deferred

    def held(self: StagingBuffer, tensors: Any, later: Any) -> Any:
        finish = deferred(self, tensors, later)

        def when_released() -> None:
            release.wait(60)
            finish()

        return when_released

    monkeypatch.setattr(StagingBuffer, "snapshot_deferred", held)
    return release


def train_overlapped(
    url: str, local: Path, state: dict[str, Any], release: threading.Event, clamp_at: int | None = None
) -> dict[int, dict[str, torch.Tensor]]:
    """AdamW with overlap on (the default): the parameters and moments are copied while the next step's
    forward and backward run, held back by ``release`` until then; the optimizer's step waits for them."""
    net, optimizer = state["model"], state["optimizer"]
    kept = {}
    options: dict[str, Any] = {"checkpoint_every_steps": 2, "checkpoint_every_s": 0, "keep": 10}
    options |= {"sudden_loss": False, "local_dir": str(local)}
    with Guard(url, state, nvml=FakeNvml.replay(), devices="all", **options) as guard:
        for step in range(guard.resume(), 7):
            torch.manual_seed(step)
            net(torch.randn(16, 32)).pow(2).mean().backward()
            release.set()  # the deferred copies of the last save finish during this forward and backward
            optimizer.step()  # waits for them
            release.clear()
            optimizer.zero_grad()
            kept[step] = values(state)
            guard.step(step)
            if step == clamp_at:
                with torch.no_grad():  # changed outside optimizer.step() while its copy is held back
                    net[0].weight.clamp_(-0.01, 0.01)
        release.set()
        guard.close()
    return kept


def test_overlapped_both_tier_saves_copy_the_complete_snapshot_and_read_the_live_state_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Object storage's copy waits for the local snapshot's deferred part: were it to copy the buffer before,
    the moments and parameters in object storage would be an older step's (or zeros), not this step's."""
    release = held_deferred_copies(monkeypatch)
    url, local = f"file://{tmp_path / 'object'}", tmp_path / "local"
    state = fresh(optimizer=True)
    with LiveReads(live_pointers(state)) as live:
        kept = train_overlapped(url, local, state, release)
    assert set(live.per_tensor().values()) == {len(SAVES)}  # once a save, every live tensor
    # the parameters and moments on the deferred copy's thread (the optimizer's step waits for it), the rest here
    assert live.threads() == {threading.main_thread().name, "gpuguard-ckpt-snapshot"}
    assert live.other["gpuguard-ckpt-tier-copy"] == len(SAVES)  # object storage's, from the local tier's buffer
    check_both_tiers(url, local, kept, optimizer=True)


def test_a_torn_overlapped_save_commits_in_neither_tier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter changed outside optimizer.step() before the local snapshot's deferred copy finished: that
    snapshot may hold a later step's values, so neither tier commits it (object storage's copy is of it)."""
    release = held_deferred_copies(monkeypatch)
    url, local = f"file://{tmp_path / 'object'}", tmp_path / "local"
    state = fresh(optimizer=True)
    train_overlapped(url, local, state, release, clamp_at=4)
    assert [i.step for i in CheckpointStore(url).list()] == [2, 6]
    assert [i.step for i in local_store(local).list()] == [2, 6]


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[int, str, bool, bool]] = []

    @gpuguard.hookimpl
    def gpuguard_checkpoint_finished(self, step: int, info: Any, error: Any, tier: str) -> None:
        self.seen.append((step, tier, info is not None and info.step == step, error is None))


def test_local_only_saves_report_checkpoint_finished_with_their_tier(tmp_path: Path) -> None:
    url, local = f"file://{tmp_path / 'object'}", tmp_path / "local"
    reports = Reports()
    options: dict[str, Any] = {"checkpoint_every_steps": 1, "checkpoint_every_s": 0, "object_store_every": 3}
    options |= {"local_dir": str(local), "plugins": [reports]}
    with Guard(url, fresh(optimizer=False), nvml=FakeNvml.replay(), devices="all", **options) as guard:
        for step in range(guard.resume(), 8):
            guard.step(step)
    # steps 1, 4, 7 to both tiers (reported once, as object storage), the others to the local tier alone
    tiers = {1: "object storage", 4: "object storage", 7: "object storage"}
    assert sorted(reports.seen) == [(s, tiers.get(s, "local"), True, True) for s in range(1, 8)]


# -- the lent buffer (the private seam: what keeps a snapshot from being overwritten while it is copied) --


def test_a_lent_staging_buffer_is_free_again_only_after_the_borrower_releases_it(tmp_path: Path) -> None:
    from gpuguard.checkpoint._tree import flatten

    state = {"w": torch.arange(1024, dtype=torch.float32)}
    with CheckpointStore(str(tmp_path / "a"), staging_buffers=1) as lender:
        pending = lender._saver.save_flat(flatten(state), 1, lend=True)
        lent = pending._lent
        assert lent is not None
        pending.wait()  # written and committed: the writer released its use of the buffer, the loan holds it
        layout = lender._saver.staging._buffers[0].layout
        with pytest.raises(TimeoutError):
            lender._saver.staging.acquire(layout, pin=False, timeout_s=0.2)  # the next snapshot would wait
        lent.release()
        lent.release()  # once only: a second release frees nothing more
        buffer = lender._saver.staging.acquire(layout, pin=False, timeout_s=0.2)
        assert buffer.users == 1


def test_a_save_that_does_not_start_releases_the_snapshot_lent_to_it(tmp_path: Path) -> None:
    from gpuguard.checkpoint._tree import flatten
    from gpuguard.errors import ConfigError

    state = {"w": torch.arange(1024, dtype=torch.float32)}
    with CheckpointStore(str(tmp_path / "a"), staging_buffers=1) as lender, CheckpointStore(str(tmp_path / "b")) as b:
        pending = lender._saver.save_flat(flatten(state), 1, lend=True)
        pending.wait()
        with pytest.raises(ConfigError, match="checkpoint_id"):
            b._save_from(flatten(state), 1, pending._lent, checkpoint_id="not-an-id")
        layout = lender._saver.staging._buffers[0].layout
        lender._saver.staging.acquire(layout, pin=False, timeout_s=0.2)  # free: the failed save released it
