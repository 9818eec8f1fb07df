"""The node-local tier: every periodic checkpoint lands on each rank's own node first, every m-th one also in
object storage, and a resume takes the newest checkpoint every rank verified in some tier.

Real gloo ranks (one job of two ranks, a module fixture), each with its own ``local_dir`` as if on its own
node; periodic checkpoints at steps 2, 4, 6, 8, 10, of which 2 and 8 also go to object storage:

- nothing lost: the local tier is newer than object storage, and every rank resumes step 10 from it;
- every rank's local tier lost (the pod moved): every rank resumes step 8 from object storage, and says so;
  one rank's lost: that rank reads step 8 from object storage, the other from its local tier;
- one rank's local copy of step 10 corrupt (not in object storage): every rank resumes step 8, and the
  corrupt tier is named (rank, tier, id, why); its copy of step 8 corrupt (in object storage): every rank
  resumes step 8, that rank from object storage; step 8 corrupt in both of that rank's tiers: every rank
  resumes step 6, and both tiers are named;
- step 10 holds a NaN on one rank: demoted once, every rank resumes step 8;
- FSDP2 (``fully_shard``, DTensors): each rank restores its own pieces from its local tier bitwise, and
  trains on bitwise; a state of another layout takes the object-storage copy instead (resharded);
- one rank cannot create its ``local_dir``: the tier is off on every rank (never a rank saving alone);
- data parallel (``replicated=True``): each rank's tier holds the whole state; object storage the split one;
- every save to both tiers (per-rank and replicated): each rank reads its live state once, on the training
  thread, object storage's copy comes from the local tier's staging buffer, and both tiers load it back.

Single-process twins check retention by bytes, every m-th save in object storage, the configuration errors,
and a bitwise resume from either tier with AdamW and overlap on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tier_jobs
from helpers.checks import rank_errors, spawn_ranks

from gpuguard import CheckpointStore, Guard
from gpuguard.errors import ConfigError
from gpuguard.fakenvml import FakeNvml
from gpuguard.guard.config import GuardConfig

WORLD = 2
SCENARIOS = ("wins", "lost", "one_lost", "corrupt_newest", "corrupt_same_id", "corrupt_both", "nan")


def plan(root: Path) -> list[dict[str, Any]]:
    where = {name: str(root / name) for name in SCENARIOS}
    steps: list[dict[str, Any]] = []
    for name in SCENARIOS:
        trained = 10 if name == "corrupt_same_id" else 12  # periodic at 2..8 (newest: 8, in both tiers)
        poison = 10 if name == "nan" else None
        steps.append(
            {"action": "train", "root": where[name], "steps": trained, "tag": f"{name}-train", "poison_at": poison}
        )
    steps += [
        {"action": "lose", "root": where["lost"], "ranks": [0, 1], "tag": "lost-lose"},
        {"action": "lose", "root": where["one_lost"], "ranks": [1], "tag": "one_lost-lose"},
        {"action": "corrupt", "root": where["corrupt_newest"], "step": 10, "rank": 1, "tag": "corrupt_newest-flip"},
        {"action": "corrupt", "root": where["corrupt_same_id"], "step": 8, "rank": 1, "tag": "corrupt_same_id-flip"},
        # step 10 (local only) and step 8 in both tiers corrupt on rank 1: every rank takes step 6
        *(
            {"action": "corrupt", "root": where["corrupt_both"], "step": s, "rank": 1, "tier": t, "tag": f"both-{s}{t}"}
            for s, t in ((10, "local"), (8, "local"), (8, "object"))
        ),
    ]
    steps += [{"action": "resume", "root": where[name], "tag": name} for name in SCENARIOS]
    steps.append({"action": "sharded", "root": str(root / "sharded"), "tag": "sharded"})
    replicated = {"root": str(root / "replicated"), "replicated": True}
    steps += [
        {"action": "train", "steps": 12, "tag": "replicated-train", **replicated},
        {"action": "resume", "tag": "replicated-local", **replicated},
        {"action": "lose", "root": replicated["root"], "ranks": [0, 1], "tag": "replicated-lose"},
        {"action": "resume", "tag": "replicated-object", **replicated},
    ]
    steps.append({"action": "unusable", "root": str(root / "unusable"), "tag": "unusable"})
    steps.append({"action": "one_snapshot", "root": str(root / "one"), "tag": "one_snapshot"})
    steps.append({"action": "one_snapshot", "root": str(root / "one-dp"), "tag": "one_snapshot_dp", "replicated": True})
    return steps


def run(plan: list[dict[str, Any]], out: Path) -> None:
    codes = spawn_ranks(tier_jobs.worker, WORLD, lambda rank, port: (rank, WORLD, port, plan, str(out)), 300)
    errors = rank_errors(out)
    assert codes == [0] * WORLD, f"exit codes {codes}\n{errors}"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("tier")
    out = root / "out"
    out.mkdir()
    run(plan(root / "ckpt"), out)
    yield out
    shutil.rmtree(root, ignore_errors=True)


def reports(out: Path, tag: str) -> list[dict[str, Any]]:
    return [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in range(WORLD)]


def test_local_newer_than_object_storage_wins_on_every_rank(job: Path) -> None:
    for rank, report in enumerate(reports(job, "wins")):
        assert (report["next"], report["w"], report["tier"]) == (11, 1000 + rank, "local"), report
        assert any("restored" in line and "(step 10) from the local tier" in line for line in report["log"]), report


def test_local_tier_lost_restores_from_object_storage_and_says_so(job: Path) -> None:
    for rank, report in enumerate(reports(job, "lost")):
        assert (report["next"], report["w"], report["tier"]) == (9, 800 + rank, "object storage"), report
        assert any("(step 8) from the object storage tier" in line for line in report["log"]), report["log"]


def test_one_rank_lost_its_tier_that_rank_reads_object_storage(job: Path) -> None:
    zero, one = reports(job, "one_lost")
    assert (zero["next"], zero["w"], zero["tier"]) == (9, 800, "local"), zero
    assert (one["next"], one["w"], one["tier"]) == (9, 801, "object storage"), one


def test_one_rank_corrupt_local_part_every_rank_takes_the_newest_verified_step(job: Path) -> None:
    for rank, report in enumerate(reports(job, "corrupt_newest")):
        assert (report["next"], report["w"], report["tier"]) == (9, 800 + rank, "local"), report
        # every rank says which checkpoint it skipped and whose part failed
        said = [line for line in report["log"] if "step-000000000010" in line and "rank 1:" in line]
        assert said and "fails its checksum" in said[0], report["log"]
    named = [line for line in reports(job, "corrupt_newest")[1]["log"] if "tier's copy of step-000000000010" in line]
    assert named and named[0].startswith("rank 1: the local tier's copy") and "fails verification" in named[0], named


def test_a_corrupt_local_copy_is_replaced_by_the_same_id_from_object_storage(job: Path) -> None:
    zero, one = reports(job, "corrupt_same_id")
    assert (zero["next"], zero["w"], zero["tier"]) == (9, 800, "local"), zero
    assert (one["next"], one["w"], one["tier"]) == (9, 801, "object storage"), one
    named = [line for line in one["log"] if "local tier's copy of step-000000000008" in line]
    assert named and "trying object storage" in named[0], one["log"]


def test_a_step_corrupt_in_both_tiers_of_one_rank_every_rank_takes_an_older_one(job: Path) -> None:
    for rank, report in enumerate(reports(job, "corrupt_both")):
        assert (report["next"], report["w"], report["tier"]) == (7, 600 + rank, "local"), report
        said = [line for line in report["log"] if "step-000000000008" in line and "cannot be loaded on every" in line]
        assert said and "rank 1:" in said[0] and "local (" in said[0] and "object storage (" in said[0], said
    named = [line for line in reports(job, "corrupt_both")[1]["log"] if "tier's copy of step-000000000008" in line]
    assert len(named) == 2 and "the object storage tier's copy" in named[1], named


def test_a_replicated_job_keeps_the_whole_state_on_every_rank_s_tier(job: Path) -> None:
    """Data parallel (``replicated=True``): object storage splits the writing between the ranks, but each
    rank's local tier holds the whole state, so each node can restore alone."""
    for report in reports(job, "replicated-local"):
        assert (report["next"], report["w"], report["tier"]) == (11, 1000, "local"), report
    for report in reports(job, "replicated-object"):
        assert (report["next"], report["w"], report["tier"]) == (9, 800, "object storage"), report


def test_nan_after_restore_is_demoted_once_across_tiers(job: Path) -> None:
    for rank, report in enumerate(reports(job, "nan")):
        assert (report["next"], report["w"], report["tier"]) == (9, 800 + rank, "local"), report
        demoted = [line for line in report["log"] if "demoted" in line]
        assert len(demoted) == 1 and "(step 10)" in demoted[0] and "rank(s) [1]" in demoted[0], report["log"]


def test_fsdp2_pieces_restore_exactly_from_each_rank_s_local_tier(job: Path) -> None:
    for report in reports(job, "sharded"):
        assert report["local_on"] is True and report["object"] == [2], report
        assert (report["next"], report["tier"]) == (5, "local"), report
        assert report["restored_equal"] and report["trained_on_equal"], report  # parameters and AdamW moments
        # a state of another layout (plain, unsharded) does not take the pieces: object storage, resharded
        assert (report["plain_next"], report["plain_tier"]) == (3, "object storage"), report["log"]
        assert report["plain_equal"], report  # object storage's copy (from the local pieces) reshards bitwise
        assert any("was saved as this rank's piece of a DTensor" in line for line in report["log"]), report["log"]


def test_a_rank_that_cannot_open_its_tier_turns_it_off_on_every_rank(job: Path) -> None:
    zero, one = reports(job, "unusable")
    assert zero["local_on"] is False and one["local_on"] is False
    assert zero["object"] == one["object"] == [2, 4, 6]  # every periodic, on every rank: no rank saved alone
    assert any("off on every rank: rank(s) [1]" in line for line in zero["log"]), zero["log"]
    assert any("cannot create" in line for line in one["log"]), one["log"]


@pytest.mark.parametrize("tag", ["one_snapshot", "one_snapshot_dp"], ids=["per-rank", "replicated"])
def test_every_rank_snapshots_a_save_to_both_tiers_once_and_both_tiers_load_back(job: Path, tag: str) -> None:
    """Each rank reads its live state once per save (on the training thread) and object storage's copy comes
    from the local tier's staging buffer; both tiers then hold each rank's step-6 state (the NaN the loop
    wrote right after each save reached neither), object storage's committed by every rank together."""
    for rank, report in enumerate(reports(job, tag)):
        value = 600.0 + (0 if tag.endswith("dp") else rank)
        assert (report["calls"], report["reads"], report["tier_copies"]) == (3, [3], 3), report
        assert report["threads"] == ["MainThread"], report
        assert report["object"] == report["local"] == [6, value, 6.0], report


# -- one process ----------------------------------------------------------------------------------------


def train_alone(url: str, local: Path, steps: int, **settings: Any) -> torch.nn.Linear:
    net = torch.nn.Linear(64, 64)
    options: dict[str, Any] = {"checkpoint_every_steps": 1, "checkpoint_every_s": 0, "keep": 100, **settings}
    with Guard(url, {"model": net}, nvml=FakeNvml.replay(), devices="all", local_dir=str(local), **options) as guard:
        for step in range(guard.resume(), steps):
            with torch.no_grad():
                net.weight.fill_(float(step))
            guard.step(step)
    return net


def local_steps(local: Path) -> list[int]:
    return sorted(int(m.parent.name.split("-")[1]) for m in local.glob("job-*/world-1/rank-0/*/MANIFEST.json"))


def test_local_retention_is_bounded_by_bytes_and_keeps_the_newest(tmp_path: Path) -> None:
    train_alone(f"file://{tmp_path / 'probe'}", tmp_path / "probe-local", 2)
    one = CheckpointStore(f"file://{tmp_path / 'probe'}").list()[0].total_bytes  # the same size locally
    train_alone(f"file://{tmp_path / 'object'}", tmp_path / "local", 8, local_keep_bytes=3 * one + one // 2)
    assert local_steps(tmp_path / "local") == [5, 6, 7]
    assert len(CheckpointStore(f"file://{tmp_path / 'object'}").list()) == 7  # object storage is not pruned by it
    train_alone(f"file://{tmp_path / 'object2'}", tmp_path / "local2", 4, local_keep_bytes=1)
    assert local_steps(tmp_path / "local2") == [3]  # the newest is kept whatever its size


def test_every_mth_periodic_goes_to_object_storage_and_a_single_process_resumes_locally(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'object'}"
    train_alone(url, tmp_path / "local", 7, object_store_every=3)
    assert [i.step for i in CheckpointStore(url).list()] == [1, 4]
    assert local_steps(tmp_path / "local") == [1, 2, 3, 4, 5, 6]
    net = torch.nn.Linear(64, 64)
    with Guard(url, {"model": net}, nvml=FakeNvml.replay(), devices="all", local_dir=str(tmp_path / "local")) as guard:
        assert guard.resume() == 7 and guard.restored_tier == "local"
    assert float(net.weight.detach()[0, 0]) == 6.0


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"local_dir": "s3://bucket/x"}, r"local_dir: 's3://bucket/x' is not valid; must be a node-local path"),
        ({"local_dir": " "}, r"local_dir: ' ' is not valid; must be a node-local path"),
        ({"local_dir": "/dev/shm/g", "local_keep_bytes": 0}, r"local_keep_bytes: 0 is not valid; must be a whole"),
        ({"local_dir": "/dev/shm/g", "local_keep_bytes": 1.5}, r"local_keep_bytes: 1.5 is not valid"),
        ({"local_dir": "/dev/shm/g", "object_store_every": 0}, r"object_store_every: 0 is not valid; must be a whole"),
        ({"object_store_every": 5}, r"object_store_every: 5 is not valid; needs local_dir"),
    ],
    ids=["remote-url", "blank", "zero-bytes", "fraction", "zero-every", "every-without-local"],
)
def test_bad_local_tier_settings_are_refused_naming_field_and_value(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GuardConfig(checkpoint_dir="memory://x", **settings)


def test_local_tier_settings_from_the_environment() -> None:
    env = {"GPUGUARD_LOCAL_DIR": "/dev/shm/gg", "GPUGUARD_LOCAL_KEEP_BYTES": "1000", "GPUGUARD_OBJECT_STORE_EVERY": "4"}
    config = GuardConfig.load(env=env, checkpoint_dir="memory://x")
    assert (config.local_dir, config.local_keep_bytes, config.object_store_every) == ("/dev/shm/gg", 1000, 4)


def test_overlapped_saves_to_both_tiers_hold_the_same_state_and_resume_bitwise(tmp_path: Path) -> None:
    """AdamW with overlap on (the default): both tiers' copies of a save are the state after its step, and
    a resume from either tier puts back exactly that (parameters and optimizer moments)."""
    url, local = f"file://{tmp_path / 'object'}", tmp_path / "local"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    state = {"model": net, "optimizer": optimizer}
    kept: dict[int, dict[str, torch.Tensor]] = {}
    options: dict[str, Any] = {"checkpoint_every_steps": 3, "checkpoint_every_s": 0, "object_store_every": 2}
    with Guard(url, state, nvml=FakeNvml.replay(), devices="all", local_dir=str(local), **options) as guard:
        for step in range(guard.resume(), 11):
            net(torch.randn(16, 32)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            kept[step] = flat(state)
            guard.step(step)
    assert [i.step for i in CheckpointStore(url).list()] == [3, 9]
    assert local_steps(local) == [3, 6, 9]

    def resumed(**settings: Any) -> tuple[int, str | None, dict[str, torch.Tensor]]:
        torch.manual_seed(1)
        fresh = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
        target = {"model": fresh, "optimizer": torch.optim.AdamW(fresh.parameters(), lr=1e-2)}
        with Guard(url, target, nvml=FakeNvml.replay(), devices="all", **settings) as guard:
            return guard.resume(), guard.restored_tier, flat(target)

    for settings, tier in (({"local_dir": str(local)}, "local"), ({}, "object storage")):
        start, got_tier, got = resumed(**settings)
        assert (start, got_tier) == (10, tier)
        assert sorted(got) == sorted(kept[9]) and all(torch.equal(got[k], kept[9][k]) for k in got), tier


def flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    for i, per in state["optimizer"].state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v.clone() for k, v in per.items() if isinstance(v, torch.Tensor)})
    return out
