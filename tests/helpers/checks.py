"""What the multi-rank checkpoint tests share: running a plan on real gloo ranks, and checking what they left.

`run` starts one process per rank (``spawn``), runs a plan of actions (`jobs.ACTIONS`), and tolerates the
ranks a plan kills on purpose; the checks compare what the ranks dumped (global tensors as safetensors,
one JSON per rank) and what the checkpoints hold.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gpuguard import CheckpointStore
from helpers import gpt, jobs

STEPS, EVACUATE_AT = 50, 23


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_ranks(
    target: Callable[..., None], world: int, args: Callable[[int, int], tuple[Any, ...]], timeout_s: float
) -> list[int | None]:
    """Start ``target(*args(rank, port))`` on ``world`` spawned processes (one per gloo rank), wait up to
    ``timeout_s`` (a guard against hangs, not a timing), kill what is left; the exit codes, by rank."""
    context = multiprocessing.get_context("spawn")
    port = _port()
    procs = [context.Process(target=target, args=args(rank, port), daemon=True) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s)
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    return codes


def rank_errors(out: Path) -> str:
    """The tracebacks the ranks' workers wrote (``error-rank*.txt``), for an assertion's message."""
    return "\n".join(p.read_text() for p in sorted(out.glob("error-rank*.txt")))


def run(world: int, plan: list[dict[str, Any]], out: Path, *, dying: tuple[int, ...] = ()) -> None:
    """Run ``plan`` on ``world`` gloo ranks; the ranks in ``dying`` are expected to be killed by it."""
    codes = spawn_ranks(jobs.worker, world, lambda rank, port: (rank, world, port, plan, str(out)), 1200)
    errors = rank_errors(out)
    alive = [c for r, c in enumerate(codes) if r not in dying]
    assert alive == [0] * len(alive), f"exit codes {codes}\n{errors}"
    assert all(codes[r] not in (None, 0) for r in dying), f"exit codes {codes}: rank(s) {dying} should have died"


def reports(out: Path, tag: str, world: int, first: int = 0) -> list[dict[str, Any]]:
    return [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in range(first, world)]


def tensors(out: Path, tag: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{tag}.safetensors"))


def assert_identical(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    assert any(name.startswith("optim.") for name in expected)  # optimizer state is compared too
    for name, tensor in expected.items():
        assert tensor.dtype == got[name].dtype and torch.equal(tensor, got[name]), name


def guarded_plan(layout: str, tp: int, url: str, tag: str, mixed: bool = False) -> list[dict[str, Any]]:
    common = {"layout": layout, "tp": tp, "steps": STEPS, "tag": tag, "mixed": mixed}
    return [
        {"action": "guarded", "url": url, "evacuate_at": EVACUATE_AT, **common},
        {"action": "reference", **common},
    ]


def check_guarded(out: Path, ckpt: Path, tag: str, world: int) -> None:
    """Every rank left at the same agreed step, resumed the step after it, and ended bitwise the reference."""
    ended = reports(out, f"{tag}-guarded", world)
    evacuated = {r["evacuated_at"] for r in ended}
    assert len(evacuated) == 1, ended
    (step,) = evacuated
    assert EVACUATE_AT <= step <= EVACUATE_AT + 4  # within sync_every of the request
    assert all(r["emergency_error"] is None for r in ended), ended
    assert {r["resumed_at"] for r in ended} == {step + 1}
    assert_identical(tensors(out, f"{tag}-reference"), tensors(out, f"{tag}-guarded"))
    with CheckpointStore(str(ckpt)) as store:
        listed = [(i.step, i.reason) for i in store.list()]
        periodic = [s for s, reason in listed if reason == "periodic"]
        # periodic saves before the evacuation and after the resume, and the emergency one
        assert periodic == [s for s in range(10, STEPS, 10)], listed
        assert (step, "emergency") in listed
        for info in store.list():
            report = store.verify(info.id)
            assert report.ok, report.problems


def written_chunks(folder: Path) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    manifest = json.loads(next(folder.glob("step-*/MANIFEST.json")).read_text())
    written: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for shard in manifest["shards"]:
        for name, chunk in shard.get("chunks", {}).items():
            written.setdefault(name, []).append((tuple(chunk["offsets"]), tuple(chunk["sizes"])))
    return written


def plain_loaded(url: str, groups_reversed: bool = False) -> dict[str, torch.Tensor]:
    """Load a checkpoint into the unsharded model in this (single) process."""
    state = gpt.build("plain", groups_reversed=groups_reversed)
    gpt.train_step(state, 10_000)
    with CheckpointStore(url) as store:
        store.load({"model": state["model"], "optimizer": state["optimizer"]})
    return gpt.full_state(state)
