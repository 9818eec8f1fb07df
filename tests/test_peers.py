"""The parts of surviving a sudden loss, each on its own: the plan, the records, the watch, the side
channel, /proc, the launcher's exit record. (The whole path, with real torchrun processes, is in
tests/test_sudden_loss.py.)"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from gpuguard.checkpoint._tree import flatten
from gpuguard.errors import CheckpointCorruptError, SideChannelError
from gpuguard.integrations.exits import ENV, read_exits, record_exit
from gpuguard.peers._buffers import BufferKeeper
from gpuguard.peers._channel import SideChannel
from gpuguard.peers._layout import plain_tensors, replica_groups, replicated_state, split
from gpuguard.peers._plan import Cannot, CheckIn, Plan, decide, parse
from gpuguard.peers._procfs import process_alive, process_start, shut_down_connections
from gpuguard.peers._records import StepRecord, StepRecords, capture, same_state
from gpuguard.peers._watch import PeerWatch

ALL3 = [("the replicated state", (0, 1, 2))]


def name(step: int) -> str:
    return f"step-{step:012d}-abcd0123"


def plan(checkins: list[CheckIn], world: int, groups: Any, mirrored: dict[int, tuple[int, ...]]) -> Plan | Cannot:
    found = decide({c.rank: c for c in checkins}, world, groups, mirrored, checkpoint_id=name, attempt="a1")
    assert parse(json.dumps(found.to_dict()).encode()) == found  # what the coordinator posts is what all read
    return found


# -- the plan ---------------------------------------------------------------------------------------


def test_a_lost_replica_is_written_by_a_survivor_at_the_last_completed_step() -> None:
    found = plan([CheckIn(0, 11, 11, (10, 11)), CheckIn(2, 11, 11, (10, 11))], 3, ALL3, {1: (10, 11)})
    assert isinstance(found, Plan)
    assert (found.step, found.checkpoint_id, found.members, found.lost) == (11, name(11), (0, 2), (1,))
    assert found.writers == {0: 0, 1: 0, 2: 2} and found.committer == 0
    assert found.assigned(0) == [0, 1] and found.assigned(2) == [2]


def test_rank_0_lost_its_files_and_the_commit_go_to_a_survivor() -> None:
    found = plan([CheckIn(1, 11, 11, (10, 11)), CheckIn(2, 11, 11, (10, 11))], 3, ALL3, {0: (10, 11)})
    assert isinstance(found, Plan)
    assert found.writers == {0: 1, 1: 1, 2: 2} and found.committer == 1


def test_a_survivor_one_step_ahead_saves_nothing_the_one_behind_writes_every_file() -> None:
    # Rank 0 finished step 12 before it noticed; rank 2 still holds 11; the dead rank 1 mirrored up to 11.
    found = plan([CheckIn(0, 12, 12, (11, 12)), CheckIn(2, 11, 11, (10, 11))], 3, ALL3, {1: (10, 11)})
    assert isinstance(found, Plan)
    assert found.step == 11 and found.writers == {0: 2, 1: 2, 2: 2} and found.committer == 2


def test_a_survivor_inside_its_optimizer_step_holds_no_completed_step() -> None:
    found = plan([CheckIn(0, 11, None, (10, 11)), CheckIn(2, 11, 11, (10, 11))], 3, ALL3, {1: (10, 11)})
    assert isinstance(found, Plan) and found.step == 11 and set(found.writers.values()) == {2}
    none = plan([CheckIn(0, 11, None, (10, 11)), CheckIn(2, 11, None, (10, 11))], 3, ALL3, {1: (10, 11)})
    assert isinstance(none, Cannot)
    assert none.reason == "every survivor was inside an optimizer step: none holds a completed step's state"


def test_a_loss_before_any_step_of_the_launch_says_there_is_nothing_newer_to_save() -> None:
    # Rank 3 died in the first forward after a resume: no survivor completed a step of this launch (holds
    # -1). Not "rank 0's per-rank state at step -1 was not mirrored" (rank 0 is alive; step -1 no step).
    found = plan(
        [CheckIn(0, -1, -1, ()), CheckIn(1, -1, -1, ()), CheckIn(2, -1, -1, ())], 4, [("all", (0, 1, 2, 3))], {}
    )
    assert isinstance(found, Cannot) and found.lost == (3,)
    assert found.reason.startswith("no rank had completed a step in this launch: nothing newer than the checkpoint")
    # One survivor ahead: its step is tried first, and its own problem is the one said.
    ahead = plan([CheckIn(0, 4, 4, (4,)), CheckIn(1, -1, -1, ())], 3, [("all", (0, 1, 2))], {})
    assert isinstance(ahead, Cannot) and "at step 4" in ahead.reason


def test_every_survivor_past_the_dead_ranks_last_mirrored_step_cannot_save_and_says_which_piece() -> None:
    found = plan([CheckIn(0, 12, 12, (11, 12)), CheckIn(2, 12, 12, (11, 12))], 3, ALL3, {1: (10, 11)})
    assert isinstance(found, Cannot)
    assert found.reason == "rank 1's per-rank state (RNG, data position) at step 12 was not mirrored (it has: 10, 11)"
    assert (found.members, found.lost) == ((0, 2), (1,))


def test_per_rank_state_has_no_other_copy() -> None:
    groups = replica_groups({"w": torch.zeros(2)}, 2, replicated=False)
    found = plan([CheckIn(0, 5, 5, (4, 5))], 2, groups, {1: (4, 5)})
    assert isinstance(found, Cannot)
    assert found.reason == (
        "no survivor holds rank 1's tensors (the state is per rank: set replicated=True for data-parallel replicas) "
        "at step 5: rank(s) 1 lost"
    )


HSDP = [("the shard at shard=0", (0, 2)), ("the shard at shard=1", (1, 3))]


def test_hsdp_a_lost_rank_is_written_by_the_replica_of_its_shard() -> None:
    survivors = [CheckIn(r, 7, 7, (6, 7)) for r in (0, 2, 3)]
    found = plan(survivors, 4, HSDP, {1: (6, 7)})
    assert isinstance(found, Plan)
    assert found.writers == {0: 0, 1: 3, 2: 2, 3: 3}


def test_hsdp_both_replicas_of_a_shard_lost_names_the_shard() -> None:
    found = plan([CheckIn(0, 7, 7, (6, 7)), CheckIn(2, 7, 7, (6, 7))], 4, HSDP, {1: (6, 7), 3: (6, 7)})
    assert isinstance(found, Cannot)
    assert found.reason == "no survivor holds the shard at shard=1 at step 7: rank(s) 1, 3 lost"


def test_the_plan_is_the_same_whoever_computes_it() -> None:
    checkins = [CheckIn(r, 20, 20, (19, 20)) for r in (0, 1, 3, 5, 6, 7)]
    groups = [("all", tuple(range(8)))]
    mirrored = {2: (19, 20), 4: (19, 20)}
    results = set()
    for _ in range(5):
        random.shuffle(checkins)
        found = plan(checkins, 8, groups, mirrored)
        results.add(json.dumps(found.to_dict(), sort_keys=True))
    assert len(results) == 1


# -- which entries are per rank, which ranks replicate each other ------------------------------------


def test_modules_optimizers_and_schedulers_are_replicated_everything_else_is_per_rank() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    view = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1),
        "progress": {"batch": 3},
        "seed": 7,
    }
    assert split(view) == (["model", "optimizer", "scheduler"], ["progress", "seed"])
    assert replica_groups({"w": torch.zeros(2)}, 3, replicated=True) == [
        ("the replicated state (parameters, optimizer state)", (0, 1, 2))
    ]
    per_rank = replica_groups({"w": torch.zeros(2)}, 2, replicated=False)
    assert [ranks for _, ranks in per_rank] == [(0,), (1,)] and per_rank[1][0].startswith("rank 1's tensors")


def _optimizer_keys(flat: Any) -> list[str]:
    return sorted(k for k in flat.tensors if k.startswith("optimizer/"))


def test_a_survivor_interrupted_in_its_forward_keys_the_optimizer_state_by_name_as_every_rank_does() -> None:
    # A survivor that had begun the next forward saves its modules with the buffers kept before it: the
    # stand-ins for the modules have no parameters to name, yet its optimizer state must be keyed by name
    # as a survivor between steps keys it, or the ranks' files would leave every optimizer tensor half
    # covered (the commit refuses: the 4-rank HSDP survivors' defect of 2026-12-04).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    view = {"model": model, "optimizer": optimizer, "progress": {"batch": 1}}
    keeper = BufferKeeper({"model": model})
    model(torch.randn(6, 4)).sum().backward()
    optimizer.step()
    keeper.completed()  # step 0 completed
    between = replicated_state(view, keeper)
    kept_mean = model[1].running_mean.clone()
    model(torch.randn(6, 4))  # the next forward: the running statistics move; then the peer is lost
    assert keeper.forwarded and not torch.equal(model[1].running_mean, kept_mean)
    interrupted = replicated_state(view, keeper)
    assert _optimizer_keys(interrupted) == _optimizer_keys(between)
    assert "optimizer/state/model.0.weight/exp_avg" in interrupted.tensors
    assert torch.equal(interrupted.tensors["model/1.running_mean"], kept_mean)  # as at the completed step
    assert "progress" not in interrupted.tree  # per rank: from the records, not from here


_FSDP2_INTERRUPTED = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from gpuguard.peers._buffers import BufferKeeper
from gpuguard.peers._layout import plain_tensors, replicated_state
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
layers = torch.nn.Sequential(
    torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
)
layers[2].register_buffer("seen", torch.zeros(3))  # FSDP2 leaves buffers plain tensors, each rank's own
fully_shard(layers[0])
fully_shard(layers[2])
fully_shard(layers)
optimizer = torch.optim.AdamW(layers.parameters(), lr=1e-2)
layers(torch.randn(2, 4)).sum().backward()
optimizer.step()
optimizer.zero_grad()
view = {"model": layers, "optimizer": optimizer}
keeper = BufferKeeper({"model": layers})
stepped = {id(q) for g in optimizer.param_groups for q in g["params"]}
keys = lambda flat: sorted(k for k in flat.tensors if k.startswith("optimizer/"))
unsharded = lambda: any(id(p) not in stepped for p in layers.parameters())
found = {"between": keys(replicated_state(view, keeper))}
loss = layers(torch.randn(2, 4)).sum()  # the root keeps its unsharded parameters registered until backward
found["unsharded_after_forward"] = unsharded()
found["after_forward"] = keys(replicated_state(view, keeper))
loss.backward()  # and the job could go on: FSDP2 gathers again before the backward
optimizer.step()
optimizer.zero_grad()
found["between_again"] = keys(replicated_state(view, keeper))

class Abandoned(Exception):  # as a collective abandoned inside the root's forward raises
    pass

def abandon(module, args):
    raise Abandoned()

hook = layers[3].register_forward_pre_hook(abandon)
try:
    layers(torch.randn(2, 4))
except Abandoned:
    pass
hook.remove()
found["unsharded_inside_forward"] = unsharded()
flat = replicated_state(view, keeper)
found["inside_forward"] = keys(flat)
found["plain"] = plain_tensors(flat.tensors, ["model"])
print(json.dumps(found))
dist.destroy_process_group()
"""


def test_a_survivor_interrupted_inside_fsdp2s_forward_saves_the_sharded_parameters_state_by_name(
    tmp_path: Path,
) -> None:
    # FSDP2 registers the unsharded parameters from a forward until its backward, so a survivor whose
    # collective was abandoned there (after the forward, or inside the root's own forward, where
    # FSDPModule.reshard() does nothing) has modules whose parameters are not the optimizer's: it registers
    # the sharded ones again before saving. Its own process: a process group and FSDP2's state do not
    # belong in pytest's.
    done = subprocess.run(
        [sys.executable, "-c", _FSDP2_INTERRUPTED, str(tmp_path / "rendezvous")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # The conditions the survivor meets (if FSDP2 stops leaving them, this test no longer tests anything):
    assert found["unsharded_after_forward"] and found["unsharded_inside_forward"], found
    assert "optimizer/state/model.0.weight/exp_avg" in found["between"]
    for where in ("after_forward", "between_again", "inside_forward"):
        assert found[where] == found["between"], where
    # A lost rank's plain tensors are written from its shard replica's copy: said (SuddenLoss._write).
    assert found["plain"] == ["model/2.seen"]
    assert (
        plain_tensors({"model/w": torch.zeros(2)}, ["model"]) == []
    )  # a DDP job's tensors are all plain: nothing to say


# -- per-rank records ------------------------------------------------------------------------------


def channel() -> SideChannel:
    return SideChannel(dist.HashStore(), "test", kind="agent")


def test_a_record_holds_the_per_rank_entries_and_rngs_and_reads_back_without_pickle() -> None:
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(5)
    progress = {"epoch": 1, "batch": 17, "loss": torch.tensor([0.25])}
    from gpuguard.guard._state import checkpointable

    view = checkpointable({"progress": progress, "gen": generator})
    record = capture(2, 41, view)
    progress["loss"].fill_(9.0)  # the record holds a copy
    back = StepRecord.from_bytes(record.to_bytes())
    assert (back.rank, back.step, back.tree) == (2, 41, record.tree)
    assert back.tensors.keys() == record.tensors.keys() == {"progress/loss", "gen/state"}
    assert float(back.tensors["progress/loss"]) == 0.25
    assert same_state(back, record) and back.rng["torch"].equal(torch.get_rng_state())
    # As a checkpoint holds it: the RNGs under the checkpoint's own key, encoded as a save would encode them.
    progress["loss"].fill_(0.25)
    part, saved = back.checkpoint_part(), flatten(view, rng=True, rng_state=record.rng)
    assert part.tree == saved.tree and part.tensors.keys() == saved.tensors.keys()
    assert all(torch.equal(part.tensors[k], saved.tensors[k]) for k in part.tensors)
    with pytest.raises(CheckpointCorruptError, match="malformed"):
        StepRecord.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cut = record.to_bytes()[:-100]  # a blob that runs past the end
    with pytest.raises(CheckpointCorruptError, match="runs past the end"):
        StepRecord.from_bytes(cut)


def test_records_keep_two_steps_here_and_on_the_side_channel() -> None:
    side = channel()
    mine, theirs = StepRecords(side, 0), StepRecords(side, 1)
    for step in (3, 4, 5):
        mine.keep(capture(0, step, {"progress": {"step": step}}))
    assert mine.held() == (4, 5)
    assert sorted(theirs.mirrored_records(0)) == [4, 5]
    read = theirs.record(0, 5)
    assert read is not None and read.tree["progress"] == {"step": 5}
    assert theirs.record(0, 3) is None


def test_a_record_over_the_limit_is_not_mirrored_and_that_is_said(caplog: pytest.LogCaptureFixture) -> None:
    side = channel()
    records = StepRecords(side, 0, max_bytes=1024)
    with caplog.at_level(logging.WARNING, "gpuguard.peers"):
        records.keep(capture(0, 1, {"big": torch.zeros(4096)}))
    assert not records.mirrored and records.held() == (1,)
    assert StepRecords(side, 1).mirrored_records(0) == {}
    assert "no longer mirrored" in caplog.text and "over the mirror's 1024" in caplog.text


# -- the side channel ------------------------------------------------------------------------------


def test_the_side_channel_reads_a_missing_key_as_none_and_keeps_the_first_writer() -> None:
    side = channel()
    assert side.get("nothing") is None
    assert side.first("plan", b"A") == b"A" and side.first("plan", b"B") == b"A"
    assert side.add("n", 2) == 2


def test_a_store_that_is_gone_fails_with_side_channel_error_at_once() -> None:
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=2))
    side = SideChannel(TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=2)), "t", kind="agent")
    side.set("k", b"v")
    del server  # the launcher's agent is gone
    started = time.monotonic()
    with pytest.raises(SideChannelError, match=r"side channel \(agent store\): (get|check) k failed") as caught:
        side.get("k")
    assert caught.value.operation in ("check k", "get k")
    assert time.monotonic() - started < 10


# -- the watch -------------------------------------------------------------------------------------


def beat_once(side: SideChannel, rank: int, pid: int) -> None:
    """A rank that registered and beat once, then fell silent (a hang, or a node that vanished)."""
    me = {"rank": rank, "host": socket.gethostname(), "pid": pid, "start": process_start(pid), "listeners": []}
    side.set(f"reg/{rank}", json.dumps(me).encode())
    side.set(f"hb/{rank}", json.dumps({"seq": 1, "step": 3, "health": "", "t": 0}).encode())


def test_a_silent_rank_is_declared_dead_and_every_rank_hears_one_alarm() -> None:
    side = channel()
    beat_once(side, 1, os.getpid())  # its process lives: only the silence tells
    watches = [PeerWatch(side, r, 3, heartbeat_s=0.05, timeout_s=0.4) for r in (0, 2)]
    heard: list[tuple[int, int]] = []
    for w in watches:
        w.subscribe(lambda alarm, w=w: heard.append((w.rank, alarm.lost)))
        w.start()
    try:
        alarms = [w.wait_for_alarm(30) for w in watches]
        assert all(a is not None and a.lost == 1 and a.by == 0 for a in alarms)
        assert "sent no heartbeat" in str(alarms[0].why if alarms[0] else "")
        # wait_for_alarm returns once the alarm is up; each watch thread tells its subscribers just after, so
        # wait for them (asserting at once raced a watch thread held up between the two on a loaded machine)
        deadline = time.monotonic() + 30  # a hang guard, not a timing
        while len(heard) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(heard) == [(0, 1), (2, 1)]
        assert 1 in watches[0].dead and 1 in watches[1].dead
    finally:
        for w in watches:
            w.stop()


def test_a_rank_that_closed_its_guard_is_not_lost() -> None:
    side = channel()
    watches = [PeerWatch(side, r, 2, heartbeat_s=0.05, timeout_s=0.3) for r in range(2)]
    for w in watches:
        w.start()
    try:
        watches[1].stop()  # the loop ended on rank 1 first: it says goodbye before it falls silent
        deadline = time.monotonic() + 30
        while 1 not in watches[0].left and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 1 in watches[0].left and watches[0].alarm is None and not watches[0].dead
    finally:
        watches[0].stop()


def test_a_rank_whose_process_is_gone_on_this_host_is_dead_at_once() -> None:
    side = channel()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    fake = {"rank": 1, "host": socket.gethostname(), "pid": child.pid, "start": None, "listeners": []}
    side.set("reg/1", json.dumps(fake).encode())
    side.set("hb/1", json.dumps({"seq": 1, "step": 3, "health": "", "t": 0}).encode())
    watch = PeerWatch(side, 0, 2, heartbeat_s=0.05, timeout_s=60)  # a minute: the heartbeat is not what tells
    watch.start()
    try:
        alarm = watch.wait_for_alarm(30)
        assert alarm is not None and alarm.lost == 1 and f"pid {child.pid}" in alarm.why
    finally:
        watch.stop()


def test_rank_0s_store_falling_silent_is_rank_0s_death() -> None:
    class Gone:
        def __getattr__(self, name: str) -> Any:
            def fail(*args: Any) -> Any:
                raise RuntimeError("Connection reset by peer")

            return fail

    side = channel()
    watch = PeerWatch(side, 1, 2, heartbeat_s=0.05, timeout_s=0.3)
    watch.start()
    side._store, side.kind = Gone(), "rank0"  # the store lived in rank 0's process
    try:
        alarm = watch.wait_for_alarm(30)
        assert alarm is not None and alarm.lost == 0 and "hosted by rank 0 stopped answering" in alarm.why
    finally:
        watch.stop()


# -- /proc -----------------------------------------------------------------------------------------


def test_a_process_that_exited_is_not_alive_even_before_it_is_reaped() -> None:
    assert process_alive(os.getpid(), process_start(os.getpid()))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while process_start(child.pid) is not None and time.monotonic() < deadline:  # a zombie until waited for
        time.sleep(0.01)
    assert not process_alive(child.pid, None)
    child.wait()
    assert process_start(child.pid) is None


def test_shutting_down_a_peers_connection_ends_a_blocked_read_at_once() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    other = socket.create_server(("127.0.0.1", 0))  # a connection to no rank's port stays
    bystander = socket.create_connection(("127.0.0.1", other.getsockname()[1]))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(client.recv(10)))
    reader.start()
    try:
        shut = shut_down_connections({port}, set(), keep=set())
        reader.join(10)
        assert not reader.is_alive() and got == [b""]  # end of stream, as gloo's pair sees it
        assert shut == 1
        bystander.sendall(b"ok")
    finally:
        for s in (client, accepted, bystander, listener, other):
            s.close()


# -- what the launcher reads ------------------------------------------------------------------------


def test_a_worker_records_its_exit_for_the_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record_exit(3, 75, "not launched by gpuguard-run: nothing written")
    monkeypatch.setenv(ENV, str(tmp_path))
    record_exit(2, 75, "peer rank 1 lost at step 9, checkpoint of step 9 committed by ranks 0, 2", step=9)
    (tmp_path / "exit-rank-7.json").write_text("{torn")
    assert read_exits(tmp_path) == [
        {
            "rank": 2,
            "exit_code": 75,
            "message": "peer rank 1 lost at step 9, checkpoint of step 9 committed by ranks 0, 2",
            "step": 9,
        }
    ]
    read_exits(tmp_path, clear=True)
    assert read_exits(tmp_path) == []


# -- a rank that died inside its optimizer step ------------------------------------------------------


def test_a_provisional_record_is_exact_when_nothing_per_rank_changes_after_the_optimizer_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    side = channel()
    progress = {"batch": 7}
    ema = torch.arange(3.0)
    records = StepRecords(side, 0)
    records.keep_provisional(capture(0, 8, {"progress": progress, "ema": ema}))
    records.keep(capture(0, 8, {"progress": progress, "ema": ema}))
    assert records.exact == {8} and records.differed == set()
    records.keep_provisional(capture(0, 9, {"progress": progress, "ema": ema}))
    progress["batch"] = 8  # this loop counts its batches after optimizer.step(): the provisional copy is stale
    with caplog.at_level(logging.WARNING, "gpuguard.peers"):
        records.keep(capture(0, 9, {"progress": progress, "ema": ema}))
    assert records.exact == {8} and records.differed == {9}
    # Said once, at the first such step, naming the entry (the tensor entry did not change): fixable before a loss.
    assert "per-rank state changes between optimizer.step() and guard.step() ('progress')" in caplog.text
    pre = StepRecords(side, 1).mirrored_provisional(0)
    assert pre is not None and pre.step == 9 and pre.tree["progress"] == {"batch": 7}
    caplog.clear()
    records.keep_provisional(capture(0, 10, {"progress": progress, "ema": ema}))
    progress["batch"] = 9
    with caplog.at_level(logging.WARNING, "gpuguard.peers"):
        records.keep(capture(0, 10, {"progress": progress, "ema": ema}))
    assert records.differed == {9, 10} and "per-rank state changes" not in caplog.text


def test_a_rank_lost_inside_its_optimizer_step_is_saved_from_its_provisional_record_only_when_exact() -> None:
    # Every survivor completed step 12; the dead rank 1 had exchanged its gradients of step 12 and died in
    # its optimizer step: its final record stops at 11, its provisional one is of step 12.
    survivors = [CheckIn(r, 12, 12, (11, 12), provisional=12, exact=(11, 12)) for r in (0, 2)]
    found = decide(
        {c.rank: c for c in survivors},
        3,
        ALL3,
        {1: (10, 11)},
        checkpoint_id=name,
        attempt="a",
        mirrored_provisional={1: 12},
    )
    assert isinstance(found, Plan) and found.step == 12 and found.provisional == (1,)
    stale = [CheckIn(0, 12, 12, (11, 12), provisional=12, differed=(12,)), CheckIn(2, 12, 12, (11, 12), exact=(12,))]
    refused = decide(
        {c.rank: c for c in stale},
        3,
        ALL3,
        {1: (10, 11)},
        checkpoint_id=name,
        attempt="a",
        mirrored_provisional={1: 12},
    )
    assert isinstance(refused, Cannot)
    assert refused.reason == (
        "rank 1's per-rank state at step 12 is known only as its optimizer step began, and the loop changes "
        "per-rank state after optimizer.step() (seen on rank 0)"
    )


@pytest.fixture
def agent_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A launcher's store on a free port, named in the environment as torchrun names it for its workers."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    yield server
    del server


def test_per_rank_state_too_big_to_mirror_each_step_turns_the_protection_off_and_says_why(
    agent_store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from gpuguard.guard._state import checkpointable
    from gpuguard.peers import SuddenLoss

    options: dict[str, Any] = {
        "rank": 0,
        "world_size": 2,
        "prefix": "t",
        "replicated": True,
        "heartbeat_s": 0.5,
        "timeout_s": 3.0,
        "checkpoint_id": name,
    }
    model = torch.nn.Linear(4, 4)
    big = checkpointable({"model": model, "ema": {"weights": torch.zeros(2_000_000)}})  # 8 MB, per rank
    with caplog.at_level(logging.WARNING, "gpuguard.peers"):
        assert SuddenLoss.start(big, **options) is None
    assert "sudden-loss protection is off: the state entries 'ema'" in caplog.text and "8012914 bytes" in caplog.text
    small = checkpointable({"model": model, "progress": {"batch": 3}})
    part = SuddenLoss.start(small, **options)
    try:
        assert part is not None and part.watch.alarm is None
        assert not part.completed(0, small)  # captured, mirrored, no peer lost
        assert StepRecords(part.channel, 1).record(0, 0) is not None
    finally:
        if part is not None:
            part.stop()


class _BrokenAfterTheLoss(torch.nn.Linear):
    """A module whose state_dict() fails on the state a loss interrupted (a framework's hook raising)."""

    broken = False

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            raise RuntimeError("unshard state is inconsistent")
        return super().state_dict(*args, **kwargs)


def test_a_survivor_whose_state_cannot_be_taken_apart_says_so_and_leaves_with_the_reschedule_code(
    tmp_path: Path, agent_store: Any
) -> None:
    # "Never raises for what the survivors cannot do": an exception out of survive() would end the rank with
    # exit 1 instead of 75, and say nothing of the loss.
    from gpuguard import CheckpointStore
    from gpuguard.guard._state import checkpointable
    from gpuguard.peers import SuddenLoss

    model = _BrokenAfterTheLoss(4, 4)
    view = checkpointable({"model": model, "progress": {"batch": 3}})
    part = SuddenLoss.start(
        view,
        rank=0,
        world_size=2,
        prefix="t",
        replicated=True,
        heartbeat_s=0.5,
        timeout_s=3.0,
        checkpoint_id=name,
    )
    assert part is not None
    try:
        assert not part.completed(0, view)
        model.broken = True
        with CheckpointStore(f"file://{tmp_path / 'checkpoints'}") as store:
            outcome = part.survive(store, view, budget_s=5.0)
            assert store.list() == []
        assert outcome.result == "failed"
        assert "this survivor could not take its state apart" in outcome.message
        assert "unshard state is inconsistent" in outcome.message
    finally:
        part.stop()


# -- saves in flight when a peer dies -----------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1])
def test_a_save_in_flight_that_waits_for_a_dead_peer_ends_at_once_when_abandoned_and_commits_nothing(
    tmp_path: Path, rank: int
) -> None:
    """Rank 0 waits for the dead rank's record, rank 1 for a manifest the dead rank 0 will never write:
    either wait would last commit_timeout_s (here 600 s); abandoning ends it, and nothing is committed."""
    from gpuguard import CheckpointStore
    from gpuguard.errors import CheckpointError, CommitError

    state = {"w": torch.arange(8.0)}
    with CheckpointStore(f"file://{tmp_path}") as store:
        pending = store.save(
            state, 3, rank=rank, world_size=2, checkpoint_id=name(3), attempt="a1", commit_timeout_s=600
        )
        assert store.abandon_in_flight() == [pending.id]
        started = time.monotonic()
        with pytest.raises(CommitError if rank else CheckpointError, match="abandoned"):
            pending.wait(60)
        assert time.monotonic() - started < 30  # the poll's pace, not the 600 s commit timeout
        assert store.list() == []


class _Wrapper(torch.optim.Optimizer):
    """As accelerate's AcceleratedOptimizer: an Optimizer subclass that skips Optimizer.__init__ and steps
    the optimizer it wraps."""

    def __init__(self, inner: Any) -> None:  # no super().__init__: no step pre-hooks of its own
        self.optimizer = inner

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.optimizer.step() if self.optimizer is not None else None


def test_a_wrapped_optimizer_is_hooked_through_the_one_it_steps_and_an_unhookable_one_turns_protection_off() -> None:
    from gpuguard.peers.sudden import _steps_of, _unhookable

    model = torch.nn.Linear(2, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = _Wrapper(inner)
    assert _steps_of(wrapped) is inner and _unhookable({"model": model, "optimizer": wrapped}) == ""
    seen: list[int] = []
    _steps_of(wrapped).register_step_pre_hook(lambda *_: seen.append(1))
    model(torch.ones(1, 2)).sum().backward()
    wrapped.step()
    assert seen == [1]
    why = _unhookable({"model": model, "optimizer": _Wrapper(None)})
    assert "'optimizer' (_Wrapper) runs no step pre-hooks" in why


def test_when_the_survivors_save_nothing_the_message_says_where_the_next_run_resumes(tmp_path: Path) -> None:
    # "No surprise": a survivor's "no survivor checkpoint" or "failed" line says how much the loss cost.
    from gpuguard import CheckpointStore
    from gpuguard.guard._sudden import _resume_point

    with CheckpointStore(f"file://{tmp_path / 'checkpoints'}") as store:
        assert _resume_point(store) == "no committed checkpoint: the next run starts from step 0"
        info = store.save({"model": torch.nn.Linear(2, 2)}, step=10, reason="periodic").wait()
        assert _resume_point(store) == (
            f"the next run resumes from the newest committed checkpoint, step 10 ({info.id})"
        )

    class Unreadable:
        def latest(self) -> None:
            raise OSError("the bucket is unreachable\ntraceback ...")

    assert _resume_point(Unreadable()) == (
        "the newest committed checkpoint could not be read (the bucket is unreachable)"
    )
