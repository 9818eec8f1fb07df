"""A replicated save (``replicated=True``: data-parallel replicas) splits the replicated entries (modules,
optimizers, schedulers) between the ranks, and keeps every other entry each rank's own: a per-rank
``torch.Generator``, a tensor, a data loader's position. Found from outside: a generator's state went to one
rank's share, and the load gave every rank that rank's generator (each rank then drew the same "random"
data, silently)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.checks import run


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_every_rank_gets_its_own_per_rank_entries_back_from_a_replicated_checkpoint(tmp_path: Path, world: int) -> None:
    out, url = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    run(world, [{"action": "per_rank_entries", "url": str(url), "tag": "pr"}], out)
    reports = [json.loads((out / f"pr-rank{rank}.json").read_text()) for rank in range(world)]
    for rank, report in enumerate(reports):
        assert report["layout"] == "replicated", rank  # the model really was split between the ranks
        assert report["resumed_at"] == report["step"] + 1 == 5, (rank, report)
        assert report["resumed"] == report["saved"], (rank, report)
        assert report["loaded"] == report["saved_no_loader"], (rank, report)
        assert report["saved"]["loader"] == 10 * rank + 20 and report["saved"]["ema"] == 4096 * (rank + 5)
    generators = [tuple(report["saved"]["gen"]) for report in reports]
    assert len(set(generators)) == world  # each rank's generator differs from the others' (its own seed)
