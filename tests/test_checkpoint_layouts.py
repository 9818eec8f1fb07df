"""The parallel layouts users train with, under the Guard and through the store, on real gloo process groups.

A GPT with tied embeddings and AdamW (two parameter groups) is trained with FSDP2 (``fully_shard``,
optionally with a bf16 ``MixedPrecisionPolicy``), DP×TP (``parallelize_module`` on ``mesh["tp"]``, data
parallel over ``dp``), FSDP2+TP (``_StridedShard``) and HSDP+TP (a 3-D mesh):

- under the Guard, with periodic checkpoints and an emergency checkpoint, then resumed: the result is
  bitwise the run that was never interrupted (the Guard took nothing off the training thread at the
  wrong time, and every rank resumed the same step);
- saved on one layout and loaded on another (2×2 → DP-only 2, 2×2 → 1 process, 3-D → 4 → 1): bitwise
  the global state that was saved, with optimizer state found by parameter name even when the groups
  are listed the other way round;
- every global chunk is written once, and ``verify`` fails a checkpoint whose chunks overlap or leave
  a gap.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from helpers import gpt, layout_job
from safetensors.torch import load_file

from gpuguard import CheckpointStore

STEPS, EVACUATE_AT = 50, 23


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(world: int, plan: list[dict[str, Any]], out: Path) -> None:
    try:
        mp.spawn(layout_job.worker, args=(world, _port(), plan, str(out)), nprocs=world, join=True)
    except Exception:
        errors = sorted(out.glob("error-rank*.txt"))
        raise AssertionError("\n".join(e.read_text() for e in errors) or "a worker failed") from None


def tensors(out: Path, tag: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{tag}.safetensors"))


def infos(out: Path, tag: str, world: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in range(world)]


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
    reports = infos(out, f"{tag}-guarded", world)
    evacuated = {r["evacuated_at"] for r in reports}
    assert len(evacuated) == 1, reports
    (step,) = evacuated
    assert EVACUATE_AT <= step <= EVACUATE_AT + 4  # within sync_every of the request
    assert all(r["emergency_error"] is None for r in reports), reports
    assert {r["resumed_at"] for r in reports} == {step + 1}
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


# -- the main suite: two ranks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One gloo job of two ranks: FSDP2 under the Guard (50 steps, evacuated, resumed) and its reference;
    DP×TP with TP of size 1 (each DP replica holds every TP shard: the case that wrote every chunk
    twice), saved, then loaded on DP-only and on the same layout, its optimizer groups listed reversed."""
    root = tmp_path_factory.mktemp("layouts2")
    out, ckpt = root / "out", root / "ckpt"
    out.mkdir()
    plan = guarded_plan("fsdp", 1, f"file://{ckpt / 'fsdp'}", "fsdp")
    plan += [
        {"action": "save", "url": str(ckpt / "dptp"), "layout": "dp_tp", "tp": 1, "steps": 3, "tag": "dptp"},
        {"action": "load", "url": str(ckpt / "dptp"), "layout": "plain", "tp": 1, "tag": "dptp-to-dp"},
        {"action": "load", "url": str(ckpt / "dptp"), "layout": "dp_tp", "tp": 1, "tag": "dptp-to-dptp"},
        {"action": "load", "url": str(ckpt / "dptp"), "layout": "fsdp", "tp": 1, "tag": "dptp-to-fsdp"},
    ]
    plan[-1]["groups_reversed"] = True
    spawn(2, plan, out)
    yield out, ckpt
    shutil.rmtree(root, ignore_errors=True)


def test_fsdp2_trains_under_the_guard_and_resumes_bitwise(two_ranks: tuple[Path, Path]) -> None:
    out, ckpt = two_ranks
    check_guarded(out, ckpt / "fsdp", "fsdp", 2)


def test_dp_tp_writes_each_chunk_once_and_loads_on_dp_only_and_on_its_own_layout(two_ranks: tuple[Path, Path]) -> None:
    out, ckpt = two_ranks
    written = written_chunks(ckpt / "dptp")
    assert written, "the TP weights are DTensors"
    for name, chunks in written.items():
        assert len(chunks) == len(set(chunks)), f"{name} written {len(chunks)} times: {chunks}"
    saved = tensors(out, "dptp-saved")
    for tag in ("dptp-to-dp", "dptp-to-dptp", "dptp-to-fsdp"):
        assert_identical(saved, tensors(out, f"{tag}-loaded"))
        assert [i["step"] for i in infos(out, f"{tag}-loaded", 2)] == [3, 3]
    assert_identical(tensors(out, "dptp-after"), tensors(out, "dptp-to-dptp-after"))  # continues bitwise
    assert_identical(saved, plain_loaded(str(ckpt / "dptp")))  # 2 → 1 process


# -- the slow step: four and eight ranks, repeated runs --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_fsdp2_under_the_guard_ten_runs_two_ranks(tmp_path: Path, trial: int) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    spawn(2, guarded_plan("fsdp", 1, f"file://{ckpt}", "fsdp", mixed=trial % 2 == 1), out)
    check_guarded(out, ckpt, "fsdp", 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "mixed"),
    [("fsdp", False), ("fsdp", True), ("dp_tp", False), ("fsdp_tp", False), ("fsdp_tp", True)],
    ids=["fsdp", "fsdp-bf16", "dp_tp", "fsdp_tp", "fsdp_tp-bf16"],
)
def test_four_ranks_under_the_guard(tmp_path: Path, layout: str, mixed: bool) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    spawn(4, guarded_plan(layout, 2, f"file://{ckpt}", layout, mixed=mixed), out)
    check_guarded(out, ckpt, layout, 4)


@pytest.mark.slow
def test_two_by_two_layouts_reshard_bitwise_onto_dp_only_and_one_process(tmp_path: Path) -> None:
    """DP×TP and FSDP2+TP on 2×2 saved, loaded on the same layout, on DP-only 2 ranks (plain and FSDP2,
    groups reversed), and in one process."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    four = []
    for layout in ("dp_tp", "fsdp_tp"):
        four.append({"action": "save", "url": str(ckpt / layout), "layout": layout, "tp": 2, "steps": 3, "tag": layout})
        four.append({"action": "load", "url": str(ckpt / layout), "layout": layout, "tp": 2, "tag": f"{layout}-same"})
    spawn(4, four, out)
    two = []
    for layout in ("dp_tp", "fsdp_tp"):
        for target in ("plain", "fsdp"):
            load = {"action": "load", "url": str(ckpt / layout), "layout": target, "tp": 1, "tag": f"{layout}-{target}"}
            two.append(load | {"groups_reversed": target == "fsdp"})
    spawn(2, two, out)
    for layout in ("dp_tp", "fsdp_tp"):
        saved = tensors(out, f"{layout}-saved")
        for name, chunks in written_chunks(ckpt / layout).items():
            assert len(chunks) == len(set(chunks)), (layout, name, chunks)
        assert_identical(saved, tensors(out, f"{layout}-same-loaded"))
        assert_identical(tensors(out, f"{layout}-after"), tensors(out, f"{layout}-same-after"))
        for target in ("plain", "fsdp"):
            assert_identical(saved, tensors(out, f"{layout}-{target}-loaded"))
        assert_identical(saved, plain_loaded(str(ckpt / layout), groups_reversed=True))
        with CheckpointStore(str(ckpt / layout)) as store:
            assert store.verify().ok


@pytest.mark.slow
def test_three_d_mesh_hsdp_tp_reshards_onto_four_and_one(tmp_path: Path) -> None:
    """DP×FSDP×TP (replicate 2 × shard 2 × tp 2, eight ranks) saved, loaded on FSDP2+TP 2×2 and in one process."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    url = str(ckpt / "hsdp_tp")
    spawn(8, [{"action": "save", "url": url, "layout": "hsdp_tp", "tp": 2, "steps": 3, "tag": "cube"}], out)
    spawn(4, [{"action": "load", "url": url, "layout": "fsdp_tp", "tp": 2, "tag": "cube-to-four"}], out)
    saved = tensors(out, "cube-saved")
    assert_identical(saved, tensors(out, "cube-to-four-loaded"))
    assert_identical(saved, plain_loaded(url))
    for name, chunks in written_chunks(ckpt / "hsdp_tp").items():
        assert len(chunks) == len(set(chunks)), (name, chunks)
