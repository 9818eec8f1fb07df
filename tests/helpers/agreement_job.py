"""Workers for the cross-rank agreement tests: real gloo ranks saving, committing, resuming and dying.

Every rank holds its own values (``w`` = 100 × step + rank), so a rank that loads another step, or
another rank's part, shows it. Each action writes ``<tag>-rank<r>.json`` with what the rank saw.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import gpuguard
from gpuguard import CheckpointStore, RetryPolicy
from gpuguard.fakenvml import FakeNvml

QUICK = RetryPolicy(deadline_s=2.0, attempt_timeout_s=1.0)


def checkpoint_id(step: int, token: str = "a11ce") -> str:
    return f"step-{step:012d}-{token:0<8}"


def values(step: int, rank: int) -> dict[str, Any]:
    return {"w": torch.full((4096,), float(100 * step + rank)), "step": step}


def _save(store: CheckpointStore, step: int, token: str = "a11ce", **kwargs: Any) -> Any:
    rank, world = dist.get_rank(), dist.get_world_size()
    return store.save(
        values(step, rank), step, rank=rank, world_size=world, checkpoint_id=checkpoint_id(step, token), **kwargs
    )


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"value": fn()}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def save_steps(out: Path, url: str, steps: list[int], tag: str) -> None:
    """Save each step on every rank and wait for it (committed on every rank)."""
    with CheckpointStore(url, keep=100) as store:
        committed = [_save(store, step).wait(60).id for step in steps]
    _write(out, tag, {"committed": committed})


def resume(out: Path, url: str, tag: str) -> None:
    """``Guard.resume()`` and ``CheckpointStore.load`` on every rank: which step each got, and what it logged."""
    rank = dist.get_rank()
    captured = _Captured()
    logging.getLogger("gpuguard").addHandler(captured)
    report: dict[str, Any] = {}
    state: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
    nvml = FakeNvml.from_scenario({"gpus": 1, "events": []})
    with gpuguard.Guard(url, state, nvml=nvml, devices="all", checkpoint_every_s=0) as guard:
        report["guard"] = _outcome(guard.resume)
    report["guard_w"] = float(state["w"][0])
    with CheckpointStore(url) as store:
        target: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
        report["load"] = _outcome(lambda: store.load(target, rank=rank, fallback=True))
        report["load_w"] = float(target["w"][0])
        report["load_newest"] = _outcome(lambda: store.load({"w": torch.zeros(4096), "step": -1}, rank=rank))
    logging.getLogger("gpuguard").removeHandler(captured)
    report["log"] = captured.lines
    _write(out, tag, report)


def wait_then_load(out: Path, url: str, trials: int, tag: str) -> None:
    """Save step 1, save step 2, wait on both, load: every rank must get step 2 (its own part)."""
    rank = dist.get_rank()
    got = []
    with CheckpointStore(url, keep=100) as store:
        for trial in range(trials):
            first, second = 10 * trial + 1, 10 * trial + 2
            pendings = [_save(store, first), _save(store, second)]
            waited = [p.wait(60).step for p in pendings]
            target: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
            step = store.load(target, rank=rank)
            got.append({"waited": waited, "loaded": step, "w": float(target["w"][0])})
    _write(out, tag, {"trials": got})


def reuse(out: Path, url: str, tag: str) -> None:
    """A second save under a committed id is refused on every rank; the committed one is untouched."""
    rank = dist.get_rank()
    with CheckpointStore(url, keep=100) as store:
        first = _save(store, 5, token="5a5e").wait(60)
        again = store.save(
            values(6, rank) | {"step": 5},
            5,
            rank=rank,
            world_size=dist.get_world_size(),
            checkpoint_id=checkpoint_id(5, "5a5e"),
        )
        report = {"first": first.id, "again": _outcome(lambda: again.wait(60).id)}
        target: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
        report["loaded"] = store.load(target, rank=rank)
        report["w"] = float(target["w"][0])
    _write(out, tag, report)


def committer_dies(out: Path, url: str, step: int, tag: str) -> None:
    """Rank 0 is killed right after its save returns; the other ranks' ``wait()`` must not report success."""
    rank = dist.get_rank()
    with CheckpointStore(url, retry=QUICK) as store:
        pending = _save(store, step, token="dead", commit_timeout_s=2.0)
        if rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        started = time.monotonic()
        report = _outcome(lambda: pending.wait(60).id)
        report["waited_s"] = time.monotonic() - started
        _write(out, tag, report)
    os._exit(0)  # the group lost a rank: no teardown collective


def retry_after_crash(out: Path, url: str, step: int, tag: str) -> None:
    """The crashed save's id again, in a new launch with new values: committed whole, this launch's files only."""
    rank = dist.get_rank()
    with CheckpointStore(url) as store:
        info = _save(store, step, token="dead", commit_timeout_s=30).wait(60)
        report = {"committed": info.id, "verify_ok": store.verify(info.id).ok if rank == 0 else None}
        target: dict[str, Any] = {"w": torch.zeros(4096), "step": -1}
        report["loaded"] = store.load(target, rank=rank)
        report["w"] = float(target["w"][0])
    _write(out, tag, report)


def _write(out: Path, tag: str, report: dict[str, Any]) -> None:
    (out / f"{tag}-rank{dist.get_rank()}.json").write_text(json.dumps(report))


ACTIONS = {
    "save_steps": save_steps,
    "resume": resume,
    "wait_then_load": wait_then_load,
    "reuse": reuse,
    "committer_dies": committer_dies,
    "retry_after_crash": retry_after_crash,
}


def worker(rank: int, world: int, port: int, plan: list[dict[str, Any]], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    folder = Path(out)
    try:
        for action in plan:
            args = {k: v for k, v in action.items() if k != "action"}
            ACTIONS[action["action"]](folder, **args)
            dist.barrier()
    except BaseException:
        (folder / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    dist.destroy_process_group()
