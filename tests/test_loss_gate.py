"""The loss check after a restore: a checkpoint whose restored model trains far outside the loss window it
recorded is demoted for good (a marker in storage that every later process honours), and the job leaves
with the restart exit to resume from the next older one; never a loop on the same checkpoint, never a
silent step 0. The two-rank version (real gloo processes) is tests/test_loss_gate_ranks.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import test_restore_sanity as nan_run
import torch

from gpuguard import CheckpointStore, Evacuation, Guard
from gpuguard.errors import CheckpointCorruptError, ConfigError
from gpuguard.fakenvml import FakeNvml
from gpuguard.guard._loss_window import LossRing, judge, limit, summarize

SETTINGS: dict[str, Any] = {"checkpoint_every_steps": 10, "checkpoint_every_s": 0, "keep": 10}


def make_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 1)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.05)}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True) * 0.5 + 0.1 * torch.randn(32, 1, generator=g)


def guard_for(url: str, state: dict[str, Any], **settings: Any) -> Guard:
    return Guard(checkpoint_dir=url, state=state, nvml=FakeNvml.replay(), devices="all", **{**SETTINGS, **settings})


def train(
    guard: Guard, state: dict[str, Any], steps: range, corrupt_at: int | None = None, loss_scale: float = 1.0
) -> list[float]:
    """Train, handing each step's loss (a tensor) to the guard; at ``corrupt_at`` the weights turn to finite
    garbage after the step's loss (a failing GPU's bit flips): the checkpoint at that step holds them."""
    model, optimizer = state["model"], state["optimizer"]
    losses = []
    for step in steps:
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == corrupt_at:
            with torch.no_grad():
                model.weight.mul_(40.0)
        losses.append(loss.item())
        guard.step(step, loss.detach() * loss_scale)
    return losses


def saved_run(url: str, corrupt_at: int | None = 20) -> None:
    """Checkpoints at steps 10 and 20 (their windows from good losses); with ``corrupt_at=20`` the one at 20
    holds corrupted (finite) weights."""
    state = make_state()
    with guard_for(url, state) as guard:
        assert guard.resume() == 0
        train(guard, state, range(21), corrupt_at=corrupt_at)


def test_a_checkpoint_far_outside_its_window_is_demoted_and_the_next_run_resumes_from_the_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"file://{tmp_path}"
    saved_run(url)
    store = CheckpointStore(url)
    newest, older = store.list()[-1], store.list()[-2]
    window = newest.extra["loss_window"]
    assert newest.step == 20 and window["count"] == 21 and window["median"] < 1.0, window

    state = make_state(1)
    guard = guard_for(url, state)
    with pytest.raises(Evacuation) as left, guard:
        assert guard.resume() == 21
        train(guard, state, range(21, 60))
    assert left.value.code == 76 and left.value.step == 40  # resumed at 20, judged at 20 + loss_check_steps
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "loss check" in r.getMessage()]
    assert len(said) == 1, said
    assert f"checkpoint {newest.id} (step 20) failed the loss check after restore: rank 0: median" in said[0]
    assert f"demoted/{newest.id}.json" in said[0] and "leaving with exit 76" in said[0]
    assert f"the next run resumes from {older.id} (step 10" in said[0]
    # the checkpoint taken at 30, from the state the bad one gave, carried its window and is demoted with it
    infos = store.list()
    assert [(i.step, i.demoted) for i in infos] == [(10, False), (20, True), (30, True)]
    assert infos[2].extra["loss_window"] == window and infos[2].extra["loss_window_inherited_from"] == newest.id
    assert f"with the checkpoint(s) taken since from its state: {infos[2].id}" in said[0]

    markers = store.demoted()
    marker = markers[newest.id]
    assert marker["reason"] == "loss" and marker["ranks"] == [0] and marker["step"] == 20
    assert marker["verdicts"][0]["median"] > limit(window, 10.0)[0]
    assert markers[infos[2].id]["descends_from"] == newest.id
    assert (tmp_path / "demoted" / f"{newest.id}.json").exists()

    caplog.clear()
    caplog.set_level(logging.INFO, "gpuguard")
    for resumed in (11, 31):  # the next run resumes from the older one and passes; then from its own 30: never 20
        state = make_state(2)
        with guard_for(url, state) as guard:
            assert guard.resume() == resumed
            train(guard, state, range(resumed, 35))
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert (
        "loss check after the resume from" in caplog.text and f"resume from {older.id} passed at step 30" in caplog.text
    )


def test_a_normal_resume_passes_and_losses_far_above_trip_the_same_check(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    saved_run(url, corrupt_at=None)
    state = make_state(1)
    with guard_for(url, state) as guard:  # the default threshold: a resume of good weights never trips
        assert guard.resume() == 21
        train(guard, state, range(21, 45))  # past the check at step 40
    store = CheckpointStore(url)
    assert not store.demoted()
    assert [i.step for i in store.list()] == [10, 20, 30, 40]
    assert "loss_window_inherited_from" in store.list()[2].extra  # 30: before the check
    assert "loss_window_inherited_from" not in store.list()[3].extra  # 40: after it, its own window
    # The same good weights, but the loop hands losses 10x larger: the same check fails (so it can)
    state = make_state(1)
    guard = guard_for(url, state)
    with pytest.raises(Evacuation), guard:
        guard.resume()
        train(guard, state, range(41, 70), loss_scale=10.0)
    assert [i.step for i in CheckpointStore(url).list() if i.demoted] == [40, 50]


def test_every_checkpoint_demoted_resume_raises_rather_than_starting_over(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    saved_run(url)
    store = CheckpointStore(url)
    for info in store.list():
        store.demote(info.id, "loss", note="by hand")
    assert store.latest() is None
    guard = guard_for(url, make_state())
    with (
        guard,
        pytest.raises(
            CheckpointCorruptError, match=r"every committed checkpoint .* was demoted after a restore .*delete a marker"
        ),
    ):
        guard.resume()


def test_the_marker_survives_the_process_and_checkpoints_list_shows_it(cli: Any, cli_here: Any, tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    saved_run(url)
    state = make_state(1)
    guard = guard_for(url, state)
    with pytest.raises(Evacuation), guard:
        guard.resume()
        train(guard, state, range(21, 60))
    listing = cli("checkpoints", "list", url)  # a new process reads the marker from storage
    assert listing.returncode == 0, listing.stderr
    table = listing.stdout.splitlines()
    assert [line.split()[1:3] for line in table[2:]] == [["10", "periodic"], ["20", "periodic"], ["30", "periodic"]]
    assert "DEMOTED" not in table[2] and "(DEMOTED: loss)" in table[3] and "(DEMOTED: loss)" in table[4]
    listed = json.loads(cli_here("checkpoints", "list", url, "--json").stdout)
    assert [c["demoted"] for c in listed["checkpoints"]] == [False, True, True]
    assert listed["checkpoints"][1]["demotion"]["reason"] == "loss"


def test_pruning_never_counts_a_demoted_checkpoint_among_those_kept(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    store = CheckpointStore(url, keep=1)
    model = torch.nn.Linear(2, 2)
    ids = [store.save({"model": model}, step=s).wait().id for s in (10, 20)]
    store.demote(ids[1], "loss")
    assert store.prune() == [] and [i.id for i in store.list()] == ids  # the good one stays, the newest
    newer = store.save({"model": model}, step=15).wait().id  # training resumed from 10, saves 15
    assert sorted(store.prune()) == [ids[0]]
    assert [i.id for i in store.list()] == [newer, ids[1]] and store.latest().id == newer  # type: ignore[union-attr]
    store.save({"model": model}, step=30).wait()
    assert ids[1] in store.prune()  # older than the oldest kept: gone; its marker stays (a local tier's copy)
    assert list(store.demoted()) == [ids[1]] and [i.step for i in store.list()] == [30]


class CountingLoss(torch.Tensor):
    """A loss that counts what would sync a device to read it (.item(), float(), .tolist(), .cpu(), ...)."""

    reads = 0
    SYNCING = frozenset({"item", "tolist", "cpu", "__float__", "__bool__", "__int__", "numpy", "to", "__format__"})

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in cls.SYNCING:
            CountingLoss.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_step_never_reads_the_loss_only_a_checkpoint_does(tmp_path: Path) -> None:
    state = make_state()
    model, optimizer = state["model"], state["optimizer"]
    with guard_for(f"file://{tmp_path}", state, checkpoint_every_steps=50) as guard:
        for step in range(50):
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            counted = loss.detach().as_subclass(CountingLoss)
            if step == 49:
                assert CountingLoss.reads == 0  # 49 steps, each handing a loss: nothing read
            guard.step(step, counted)
        assert CountingLoss.reads == 0
        guard.step(50, counted)  # a periodic checkpoint: the window is read here, once
        assert CountingLoss.reads >= 1
    window = CheckpointStore(f"file://{tmp_path}").latest().extra["loss_window"]  # type: ignore[union-attr]
    assert window["count"] == 51 and window["last_step"] == 50


@pytest.mark.parametrize(
    ("after", "failing"),
    [
        ([1.0 + 9.9 * 0.1] * 5, False),  # just inside: median + 10 spreads (spread 0.1)
        ([1.0 + 10.1 * 0.1] * 5, True),  # just outside
        ([1.0, float("nan"), 1.0, float("inf"), 1.0], False),  # a few non-finite losses do not trip it
        ([float("nan"), float("nan"), 1.0, float("inf"), 1.0], True),  # a majority does
        ([0.01] * 5, False),  # far below: never a bad checkpoint
        ([5.0, 5.0], None),  # too few to judge
    ],
    ids=["inside", "outside", "few-nan", "most-nan", "below", "too-few"],
)
def test_judge(after: list[float], failing: bool | None) -> None:
    window = {"median": 1.0, "spread": 0.1, "count": 64}
    assert judge(window, after, 10.0).failing is failing


def test_the_spread_floor_keeps_a_flat_window_from_tripping_on_a_wobble() -> None:
    flat = summarize(list(range(20)), [2.0] * 20)
    assert flat is not None and flat["spread"] == 0.0
    assert judge(flat, [2.5] * 5, 10.0).failing is False  # +25%: a wobble
    assert judge(flat, [4.5] * 5, 10.0).failing is True  # more than double: far outside


def test_the_ring_keeps_the_last_window_and_refuses_what_is_not_one_number() -> None:
    ring = LossRing(4)
    for step in range(6):
        assert ring.record(step, torch.tensor(float(step)))
    assert ring.record(6, 6.5) and not ring.record(7, torch.ones(3)) and not ring.record(8, "x")
    assert ring.floats() == ([3, 4, 5, 6], [3.0, 4.0, 5.0, 6.5])
    assert ring.floats(after=4) == ([5, 6], [5.0, 6.5])


def test_load_passes_over_demoted_ones_unless_named_and_never_says_nothing_is_committed(tmp_path: Path) -> None:
    store = CheckpointStore(f"file://{tmp_path}")
    w = torch.zeros(2)
    ids = [store.save({"w": w.fill_(s)}, step=s).wait().id for s in (1, 2)]
    store.demote(ids[1], "loss")
    assert store.load({"w": w}) == 1 and w[0] == 1
    assert store.load({"w": w}, ids[1]) == 2 and w[0] == 2  # named: a person's choice
    store.demote(ids[0], "non_finite")
    with pytest.raises(CheckpointCorruptError, match=r"every committed checkpoint .* demoted .*" + ids[0]):
        store.load({"w": w}, fallback=True)
    with pytest.raises(ConfigError, match="checkpoint_id"):
        store.demote("not-an-id", "loss")


def test_the_nan_gate_records_its_demotions_for_later_processes(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    nan_run.train(url, nan_run.make_state(), range(5), poison_at=3)  # step 2: good; step 4: NaN
    with Guard(checkpoint_dir=url, state=nan_run.make_state(), nvml=FakeNvml.replay(), devices="all") as guard:
        assert guard.resume() == 3
    store = CheckpointStore(url)
    (bad,) = [i for i in store.list() if i.demoted]
    marker = store.demoted()[bad.id]
    assert bad.step == 4 and marker["reason"] == "non_finite" and marker["ranks"] == [0]
    assert "model/0.weight" in marker["tensors"]
    assert store.latest().step == 2  # type: ignore[union-attr]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_steps_with_a_cuda_loss_never_sync_the_device(tmp_path: Path) -> None:
    """CUDA's sync debug mode raises at any synchronising call: none may come from step(step, loss)."""
    model = torch.nn.Linear(256, 256).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 256, device="cuda")
    with guard_for(f"file://{tmp_path}", {"model": model, "optimizer": optimizer}, checkpoint_every_steps=60) as guard:

        def one(step: int) -> None:
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            guard.step(step, loss.detach())

        for step in range(6):  # the staging buffer is planned at the first step
            one(step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(6, 60):
                one(step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        one(60)  # a checkpoint: its window read here, once
    window = CheckpointStore(f"file://{tmp_path}").latest().extra["loss_window"]  # type: ignore[union-attr]
    assert window["count"] == 61 and window["last_step"] == 60


def test_an_emergency_checkpoint_before_the_check_is_judged_by_the_same_window_never_a_loop(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    saved_run(url)  # 10 good, 20 corrupted
    state = make_state(1)
    guard = guard_for(url, state)
    with pytest.raises(Evacuation) as left, guard:
        assert guard.resume() == 21
        train(guard, state, range(21, 25))
        guard.request_evacuation("test: a drain before the loss check")
        train(guard, state, range(25, 30))
    assert left.value.code == 75 and left.value.checkpoint is not None
    emergency = left.value.checkpoint
    store = CheckpointStore(url)
    bad = store.list()[1]
    (info,) = [i for i in store.list() if i.id == emergency.id]
    assert info.extra["loss_window"] == bad.extra["loss_window"]
    assert info.extra["loss_window_inherited_from"] == bad.id
    # Each restart demotes one more, the newest first, and never loads a demoted one again: then 10 passes.
    for expected in (info.step + 1, 21):
        state = make_state(1)
        guard = guard_for(url, state)
        with pytest.raises(Evacuation), guard:
            assert guard.resume() == expected
            train(guard, state, range(expected, expected + 30))
    # 20, the emergency 25, and the periodic ones each run took from their state before its check
    assert [i.step for i in store.list() if not i.demoted] == [10]
    assert {20, info.step} <= {i.step for i in store.list() if i.demoted}
    state = make_state(1)
    with guard_for(url, state) as guard:
        assert guard.resume() == 11
        train(guard, state, range(11, 35))


def test_with_a_local_tier_a_local_only_checkpoint_is_checked_and_demoted_in_both_tiers(tmp_path: Path) -> None:
    url, local = f"file://{tmp_path / 'object'}", str(tmp_path / "local")
    tiers = {"local_dir": local, "object_store_every": 2}  # 10: both tiers; 20: local only
    state = make_state()
    with guard_for(url, state, **tiers) as guard:
        guard.resume()
        train(guard, state, range(21), corrupt_at=20)
    assert [i.step for i in CheckpointStore(url).list()] == [10]
    state = make_state(1)
    guard = guard_for(url, state, **tiers)
    with pytest.raises(Evacuation) as left, guard:
        assert guard.resume() == 21 and guard.restored_tier == "local"  # its window came with the local copy
        train(guard, state, range(21, 60))
    assert left.value.code == 76 and left.value.step == 40
    demoted = CheckpointStore(url).demoted()
    assert sorted(int(i.split("-")[1]) for i in demoted) == [20, 30]  # 30: taken from its state before the check
    state = make_state(2)
    with guard_for(url, state, **tiers) as guard:  # neither tier offers a demoted one again
        assert guard.resume() == 11
        train(guard, state, range(11, 35))
