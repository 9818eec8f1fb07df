"""The parallel layouts users train with, under the Guard and through the store, on real gloo process groups
(the slow step; tests/test_checkpoint_agreement.py runs the two-rank cases in the main suite).

A GPT with tied embeddings and AdamW (two parameter groups) is trained with FSDP2 (``fully_shard``,
optionally with a bf16 ``MixedPrecisionPolicy``), DP×TP (``parallelize_module`` on ``mesh["tp"]``, data
parallel over ``dp``), FSDP2+TP (``_StridedShard``) and HSDP+TP (a 3-D mesh):

- under the Guard, with periodic checkpoints and an emergency checkpoint, then resumed: the result is
  bitwise the run that was never interrupted (the Guard took nothing off the training thread at the
  wrong time, and every rank resumed the same step);
- saved on one layout and loaded on another (2×2 → DP-only 2, 2×2 → 1 process, 3-D → 4 → 1): bitwise
  the global state that was saved, with optimizer state found by parameter name even when the groups
  are listed the other way round;
- every global chunk is written once (``verify`` failing chunks that overlap or leave a gap is tested in
  tests/test_checkpoint_sharded.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.checks import (
    assert_identical,
    check_guarded,
    guarded_plan,
    plain_loaded,
    run,
    tensors,
    written_chunks,
)

from gpuguard import CheckpointStore

# -- the slow step: four and eight ranks, repeated runs --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_fsdp2_under_the_guard_ten_runs_two_ranks(tmp_path: Path, trial: int) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    run(2, guarded_plan("fsdp", 1, f"file://{ckpt}", "fsdp", mixed=trial % 2 == 1), out)
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
    run(4, guarded_plan(layout, 2, f"file://{ckpt}", layout, mixed=mixed), out)
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
    run(4, four, out)
    two = []
    for layout in ("dp_tp", "fsdp_tp"):
        for target in ("plain", "fsdp"):
            load = {"action": "load", "url": str(ckpt / layout), "layout": target, "tp": 1, "tag": f"{layout}-{target}"}
            two.append(load | {"groups_reversed": target == "fsdp"})
    run(2, two, out)
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
    run(8, [{"action": "save", "url": url, "layout": "hsdp_tp", "tp": 2, "steps": 3, "tag": "cube"}], out)
    run(4, [{"action": "load", "url": url, "layout": "fsdp_tp", "tp": 2, "tag": "cube-to-four"}], out)
    saved = tensors(out, "cube-saved")
    assert_identical(saved, tensors(out, "cube-to-four-loaded"))
    assert_identical(saved, plain_loaded(url))
    for name, chunks in written_chunks(ckpt / "hsdp_tp").items():
        assert len(chunks) == len(set(chunks)), (name, chunks)
