import dataclasses
import json
import math

import pytest

from gpuguard.cli import main
from gpuguard.errors import ConfigError
from gpuguard.goodput import GoodputInputs, Policy, best_setting, compare, expected_cycle, goodput, monte_carlo


def policy(**kw: float) -> Policy:
    base = {"failures_per_s": 1 / 1000, "interval_s": 100.0, "stall_s": 0.0, "durable_lag_s": 0.0, "downtime_s": 0.0}
    return Policy(name="p", **{**base, **kw})  # type: ignore[arg-type]


def test_without_costs_the_closed_form_is_the_textbook_result() -> None:
    # Restart from the last checkpoint, no overheads: kept share = λT / (e^(λT) - 1).
    lam_t = 0.1
    assert goodput(policy()) == pytest.approx(lam_t / math.expm1(lam_t), rel=1e-12)


def test_rare_failures_leave_only_the_stall() -> None:
    p = policy(failures_per_s=1e-12, stall_s=10.0)
    assert goodput(p) == pytest.approx(100 / 110, rel=1e-6)


def test_every_failure_seen_coming_and_written_instantly_loses_nothing() -> None:
    kept, lost, wall = expected_cycle(policy(detectable_share=1.0, downtime_s=50.0, emergency_s=0.0))
    assert lost == pytest.approx(0.0, abs=1e-9)
    assert kept / wall == pytest.approx(1000 / 1050)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"stall_s": 12.0, "downtime_s": 400.0},
        {"stall_s": 0.1, "durable_lag_s": 30.0, "detectable_share": 0.3, "emergency_s": 3.0, "downtime_s": 400.0},
        {"failures_per_s": 1 / 150, "stall_s": 5.0, "durable_lag_s": 60.0, "detectable_share": 0.5},
        {
            "stall_s": 0.1,
            "durable_lag_s": 50.0,
            "detectable_share": 0.2,
            "emergency_s": 50.0,
            "jit_share": 0.6,
            "jit_s": 55.0,
            "jit_replay_s": 1.0,
            "downtime_s": 430.0,
            "detected_downtime_s": 470.0,
        },
    ],
    ids=["bare", "blocking-save", "gpuguard-like", "failures-every-few-intervals", "just-in-time"],
)
def test_monte_carlo_agrees_with_the_closed_form(overrides: dict[str, float]) -> None:
    check = monte_carlo(policy(**overrides), failures=40_000, seed=1)
    assert check.agrees, check
    assert check.estimate == pytest.approx(check.closed_form, abs=0.01)


def test_monte_carlo_catches_a_closed_form_that_ignores_the_durable_lag() -> None:
    # The check can fail: a checkpoint not yet durable at the failure is worth nothing, and a closed
    # form that forgot this (lag 0) is far from what the sampled cycles keep.
    real = policy(failures_per_s=1 / 300, durable_lag_s=80.0)
    sampled = monte_carlo(real, failures=40_000, seed=2)
    assert abs(sampled.estimate - goodput(dataclasses.replace(real, durable_lag_s=0.0))) > 10 * sampled.stderr


def test_the_default_failure_rates() -> None:
    assert GoodputInputs(nodes=128).failures_per_day == pytest.approx(128 * 19 / 1000)
    llama = GoodputInputs(nodes=128, gpus_per_node=8, failure_source="llama3")
    assert llama.failures_per_day == pytest.approx(1024 * 419 / (54 * 16_384))
    assert GoodputInputs(nodes=10, failures_per_node_day=0.5).failures_per_day == pytest.approx(5.0)


def test_gpuguard_against_periodic_only_at_128_nodes() -> None:
    report = compare(GoodputInputs(nodes=128, gpus_per_node=8), check=True, failures=20_000)
    p, g, j = report.periodic, report.gpuguard, report.gpuguard_jit
    assert j.goodput > g.goodput > p.goodput
    assert j.work_lost_per_failure_s < g.work_lost_per_failure_s < p.work_lost_per_failure_s
    # A cheap snapshot makes short intervals pay: gpuguard's best interval is far shorter.
    assert g.best_interval_s < p.best_interval_s / 3
    assert g.best_goodput >= g.goodput and j.best_goodput >= j.goodput
    assert all(c.agrees for c in report.checks + report.best_checks)
    assert len(report.checks) == len(report.best_checks) == 5
    doc = report.to_dict()
    assert doc["assumptions"]["failures_per_day"] == pytest.approx(2.432)
    # 6 GiB x 1,024 GPUs through 2 TB/s x 1,024 / 16,384 = 125 GB/s: 52.8 s, longer than torch.save's 12.55 s.
    assert doc["assumptions"]["storage_floor_s"] == pytest.approx(6 * 2**30 * 1024 / 125e9, rel=1e-3)
    assert doc["assumptions"]["periodic_stall_s"].startswith("52.78 (torch.save")


def test_the_storage_bandwidth_bounds_every_save_and_the_best_interval() -> None:
    slow = GoodputInputs(nodes=128, gpus_per_node=8, storage_gbps=10.0)  # 6.6 TB at 10 GB/s: 660 s
    floor = 6 * 2**30 * 1024 / 10e9
    assert slow.storage_floor_s == pytest.approx(floor)
    assert (
        slow.gpuguard_durable == slow.periodic_stall == slow.jit_save == slow.gpuguard_restore == pytest.approx(floor)
    )
    report = compare(slow)
    for o in (report.periodic, report.gpuguard, report.gpuguard_jit):
        assert o.best_interval_s >= floor - slow.gpuguard_stall - 1e-6
    fast = compare(GoodputInputs(nodes=128, gpus_per_node=8, storage_gbps=10_000.0))
    assert fast.gpuguard.best_interval_s < report.gpuguard.best_interval_s
    assert fast.gpuguard.goodput > report.gpuguard.goodput


def test_just_in_time_saves_lose_only_the_replayed_steps() -> None:
    everything = GoodputInputs(nodes=16, detectable_share=0.0, sudden_replicated_share=1.0, step_time_s=2.0)
    jit = compare(everything).gpuguard_jit
    assert jit.work_lost_per_failure_s == pytest.approx(2.0, rel=1e-6)  # one step of 2 s, computed again
    none = compare(dataclasses.replace(everything, sudden_replicated_share=0.0))
    assert none.gpuguard_jit.goodput == pytest.approx(none.gpuguard.goodput)


def test_restart_in_place_costs_less_than_a_reschedule() -> None:
    base = GoodputInputs(nodes=16, inplace_share_sudden=0.0)
    assert (
        compare(dataclasses.replace(base, inplace_share_sudden=1.0)).gpuguard.goodput > compare(base).gpuguard.goodput
    )
    rows = {(r["policy"], r["kind"]): r for r in compare(base).to_dict()["per_failure"]}
    detected = rows[("gpuguard", "detectable")]
    assert detected["saved"] and detected["training_lost_s"] == 0.0
    assert detected["downtime_s"] == pytest.approx(120 + 300 + base.gpuguard_restore, abs=1e-3)
    assert rows[("gpuguard + just-in-time", "sudden, a replica survives")]["training_lost_s"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"detectable_share": 1.5}, r"detectable_share.*1\.5.*from 0 to 1"),
        ({"nodes": 0}, r"nodes.*0.*1 or greater"),
        ({"interval_s": -5.0}, r"interval_s.*-5.*greater than 0"),
        ({"failure_source": "made-up"}, r"failure_source.*made-up.*nvidia, llama3"),
        ({"interval_s": 2.0, "gpuguard_durable_s": 10.0}, r"interval_s.*2.*queue"),
        ({"restart_s": float("nan")}, r"restart_s.*finite"),
        (
            {"detectable_share": 0.5, "sudden_replicated_share": 0.6},
            r"sudden_replicated_share.*0\.6.*at most 1 - detectable",
        ),
        ({"storage_gbps": 0.0}, r"storage_gbps.*greater than 0"),
        ({"interval_s": 30.0}, r"interval_s.*30.*storage bandwidth"),
    ],
    ids=["share", "nodes", "interval", "source", "interval-below-lag", "nan", "shares", "bandwidth", "below-storage"],
)
def test_bad_input_names_field_value_and_what_is_allowed(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GoodputInputs(**kwargs)  # type: ignore[arg-type]


def test_the_command_prints_assumptions_and_both_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["goodput", "--nodes", "128", "--gpus-per-node", "8", "--failures", "2000"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA: 19 remediations per 1,000 nodes per day" in out
    assert "detectable_share" in out and "restart_s" in out
    assert "periodic only" in out and "gpuguard + just-in-time" in out
    assert "Monte Carlo" in out and "storage_bandwidth" in out and "Tectonic" in out
    assert "sudden, a replica survives" in out


def test_the_command_in_json_uses_the_given_costs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "goodput",
        "--json",
        "--no-check",
        "--failure-rate",
        "llama3",
        "--periodic-stall-s",
        "20",
        "--storage-gbps",
        "1e6",
    ]
    assert main([*argv, "--gpuguard-stall-s", "0.5", "--gpuguard-durable-s", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["assumptions"]["periodic_stall_s"] == "20 (given)"
    assert doc["assumptions"]["failure_rate"].startswith("Meta Llama 3")
    assert doc["periodic"]["checkpoint_overhead"] == pytest.approx(20 / 1820)
    assert doc["monte_carlo"] == []
    assert main([*argv[:-2], "--gpuguard-stall-s", "0.5"]) == 0  # Tectonic's bandwidth: 52.8 s for the job's bytes
    floored = json.loads(capsys.readouterr().out)["assumptions"]["periodic_stall_s"]
    assert floored == "52.78 (given 20, raised to the storage floor)"
    assert [row["detectable_share"] for row in doc["sensitivity"]] == [0.0, 0.1, 0.2, 0.3, 0.5]
    assert all(row["jit_goodput"] >= row["goodput"] for row in doc["sensitivity"])


def test_the_command_rejects_bad_input_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["goodput", "--detectable-share", "2", "--no-check"]) == 2
    assert "--detectable-share: 2.0 is not valid; must be from 0 to 1" in capsys.readouterr().err


def test_checkpoints_take_at_most_their_share_of_the_storage() -> None:
    inputs = GoodputInputs(nodes=128, gpus_per_node=8, max_storage_share=0.25)
    report = compare(inputs)
    write = inputs.gpuguard_durable  # 52.8 s for 6.6 TB at 125 GB/s
    assert report.gpuguard.best_interval_s == pytest.approx(write / 0.25 - inputs.gpuguard_stall, rel=1e-3)
    assert report.gpuguard.best_storage_busy == pytest.approx(0.25, rel=1e-3)
    assert report.gpuguard.storage_busy == pytest.approx(write / (1800 + inputs.gpuguard_stall))
    loose = compare(dataclasses.replace(inputs, max_storage_share=1.0))
    assert loose.gpuguard.best_interval_s < report.gpuguard.best_interval_s
    assert loose.gpuguard.best_goodput >= report.gpuguard.best_goodput
    with pytest.raises(ConfigError, match=r"max_storage_share.*1\.5.*at most 1"):
        GoodputInputs(max_storage_share=1.5)


def test_the_h200_costs_are_the_ones_measured() -> None:
    # The provenance of goodput's default costs lives in the repository, and the constants match it.
    from pathlib import Path

    from gpuguard import goodput as g

    measured = json.loads((Path(__file__).parent / "data" / "h200-checkpoint-baseline.json").read_text())
    gib = measured["state_gib"]
    assert (measured["device"], gib) == ("NVIDIA H200", 6.0)
    assert measured["torch_save_s"] / gib == g.H200_TORCH_SAVE_S_PER_GIB
    assert measured["torch_load_to_gpu_s"] / gib == g.H200_TORCH_LOAD_S_PER_GIB
    assert measured["hardware_bound_sketch"]["stall_s"][0] / gib == g.H200_PINNED_COPY_S_PER_GIB
    assert measured["shm_write_s"] / gib == g.H200_SHM_WRITE_S_PER_GIB
    eight = measured["hardware_bound_sketch"]["write_8_threads_s"]
    assert min(eight) <= g.H200_PARALLEL_WRITE_S_PER_GIB * gib <= max(eight)


def tiered(**kw: float) -> Policy:
    base = {"local_tier": True, "object_every": 4, "object_lag_s": 40.0, "local_share": 0.3, "durable_lag_s": 5.0}
    return policy(**{**base, **kw})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"local_share": 0.0},
        {"local_share": 1.0, "object_every": 1, "object_lag_s": 5.0},
        {"failures_per_s": 1 / 150, "object_every": 7, "stall_s": 2.0, "object_lag_s": 300.0},
        {
            "stall_s": 0.1,
            "detectable_share": 0.2,
            "emergency_s": 50.0,
            "jit_share": 0.6,
            "jit_s": 55.0,
            "jit_replay_s": 1.0,
            "downtime_s": 430.0,
            "local_share": 0.15,
            "object_every": 3,
        },
    ],
    ids=["tiered", "every-node-lost", "one-tier-local", "failures-within-an-object-interval", "just-in-time"],
)
def test_the_tiered_closed_form_agrees_with_its_monte_carlo(overrides: dict[str, float]) -> None:
    check = monte_carlo(tiered(**overrides), failures=40_000, seed=3)
    assert check.agrees, check
    assert check.estimate == pytest.approx(check.closed_form, abs=0.01)


def test_the_tiered_monte_carlo_catches_a_closed_form_that_ignores_lost_nodes() -> None:
    # Restoring from the local tier after every failure (local_share 1) keeps far more than the walk does
    # when half the failures take the node and send the job back to object storage's older checkpoint.
    real = tiered(failures_per_s=1 / 300, object_every=8, local_share=0.5)
    sampled = monte_carlo(real, failures=40_000, seed=4)
    assert sampled.agrees
    assert abs(sampled.estimate - goodput(dataclasses.replace(real, local_share=1.0))) > 10 * sampled.stderr


def test_the_job_s_tiered_policies_agree_with_their_monte_carlo_at_the_given_and_best_intervals() -> None:
    report = compare(GoodputInputs(storage_gbps=10.0, node_loss_share=0.5), check=True, failures=20_000)
    tiered_checks = [c for c in report.checks + report.best_checks if "local tier" in c.name]
    assert len(tiered_checks) == 4 and all(c.agrees for c in tiered_checks), tiered_checks
    rows = {row["policy"]: row for row in report.to_dict()["tiers"]}
    assert rows["gpuguard + local tier"]["monte_carlo"]["agrees"]


def test_with_every_node_lost_the_local_tier_gains_nothing_at_the_same_object_interval() -> None:
    for m in (1, 3, 10):
        report = compare(GoodputInputs(node_loss_share=1.0, object_store_every=m))
        local, guarded = report.gpuguard_local, report.gpuguard
        assert local.object_interval_s == pytest.approx(guarded.object_interval_s) == pytest.approx(1800.0)
        assert local.object_every == m
        # Its local checkpoints are never read; it only stalls more and reaches object storage later.
        assert local.goodput <= guarded.goodput
        assert report.gpuguard_jit_local.goodput <= report.gpuguard_jit.goodput
    assert report.gpuguard_local.best_goodput <= report.gpuguard.best_goodput


def test_a_fast_local_tier_that_survives_beats_object_storage_alone() -> None:
    report = compare(GoodputInputs(local_gbps=1000.0, node_loss_share=0.0))
    local, guarded = report.gpuguard_local, report.gpuguard
    assert local.goodput > guarded.goodput + 0.01  # at the same 30-minute object interval
    assert local.best_goodput > guarded.best_goodput
    assert local.work_lost_per_failure_s < guarded.work_lost_per_failure_s / 5
    assert local.best_interval_s < guarded.best_interval_s
    assert report.gpuguard_jit_local.best_goodput > report.gpuguard_jit.best_goodput


def test_each_tier_s_bandwidth_bounds_its_interval() -> None:
    # The local bound: 48 GiB per node at 0.5 GB/s is 103 s, at most half the time: 206 s between snapshots.
    slow_local = GoodputInputs(local_gbps=0.5, node_loss_share=0.0)
    local = compare(slow_local).gpuguard_local
    write = 48 * 2**30 / 0.5e9
    assert slow_local.local_write_s == pytest.approx(write)
    assert local.best_interval_s == pytest.approx(write / 0.5 - slow_local.gpuguard_stall, rel=1e-3)
    assert local.best_local_busy == pytest.approx(0.5, rel=1e-3)
    assert local.best_local_gbps_per_node == pytest.approx(0.25, rel=1e-3)
    # Object storage's bound now holds for m local intervals: 6.6 TB at 10 GB/s, half the time, is 22 min.
    slow_object = GoodputInputs(storage_gbps=10.0, node_loss_share=0.5)
    report = compare(slow_object)
    tier = report.gpuguard_local
    assert tier.best_object_every > 1
    assert tier.best_object_interval_s == pytest.approx(slow_object.gpuguard_durable / 0.5 - slow_object.gpuguard_stall)
    assert tier.best_storage_busy == pytest.approx(0.5, rel=1e-3)
    assert tier.best_object_gbps == pytest.approx(slow_object.checkpoint_bytes / 1e9 / (2 * 659.9), rel=1e-3)
    assert tier.best_interval_s < report.gpuguard.best_interval_s / 2
    assert tier.best_goodput > report.gpuguard.best_goodput
    # The local bound also caps how many local checkpoints fit in one object interval.
    with pytest.raises(ConfigError, match=r"object_store_every.*100.*at most 39 with interval_s 1800.*local bandwidth"):
        GoodputInputs(object_store_every=100)


def test_the_local_tier_must_hold_two_checkpoints() -> None:
    assert GoodputInputs().local_keep == 19  # 931 GiB of /dev/shm, 48 GiB a checkpoint per node
    assert GoodputInputs(local_capacity_gib=96.0).local_keep == 2
    with pytest.raises(ConfigError, match=r"local_capacity_gib.*60.*at least 2 local checkpoints.*48 GiB.*96 GiB"):
        GoodputInputs(local_capacity_gib=60.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"node_loss_share": 1.5}, r"node_loss_share.*1\.5.*from 0 to 1"),
        ({"local_gbps": 0.0}, r"local_gbps.*0.*greater than 0"),
        ({"max_local_share": 0.0}, r"max_local_share.*0.*greater than 0 and at most 1"),
        ({"object_store_every": 0}, r"object_store_every.*0.*whole number, 1 or greater"),
        ({"object_store_every": 2.5}, r"object_store_every.*2\.5.*whole number"),
    ],
    ids=["node-loss", "local-bandwidth", "local-share", "every-zero", "every-fraction"],
)
def test_bad_tier_input_names_field_value_and_what_is_allowed(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GoodputInputs(**kwargs)  # type: ignore[arg-type]


def test_the_command_shows_each_tier(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["goodput", "--failures", "2000", "--storage-gbps", "10", "--node-loss-share", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    best = out.split("at each policy's best interval per tier")[1].split("per failure")[0]
    rows = {line.split("  ")[1].strip(): line for line in best.splitlines()[2:] if line.strip()}
    assert list(rows) == [
        "periodic only",
        "gpuguard (object storage only)",
        "gpuguard + just-in-time",
        "gpuguard + local tier",
        "gpuguard + just-in-time + local tier",
    ]
    assert "/node" in rows["gpuguard + local tier"] and "agrees" in rows["gpuguard + local tier"]
    assert "22.0 min" in rows["gpuguard + local tier"]  # the object-storage bound at 10 GB/s
    assert "local interval" in out and "(m=" in out and "node_loss_share" in out and "0.5 (given)" in out
    assert "Monte Carlo, gpuguard + local tier:" in out and "DISAGREES" not in out


def test_the_command_in_json_has_the_per_tier_fields(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["goodput", "--json", "--failures", "2000", "--local-gbps", "20", "--object-store-every", "4"]
    assert main([*argv, "--local-capacity-gib", "200", "--max-local-share", "0.25"]) == 0
    doc = json.loads(capsys.readouterr().out)
    local = doc["gpuguard_local"]
    assert local["local_tier"] and local["object_every"] == 4
    assert local["object_interval_s"] == pytest.approx(1800.0)
    assert local["interval_s"] == pytest.approx((1800 + 0.117) / 4 - 0.117)
    assert local["local_gbps_per_node"] == pytest.approx(48 * 2**30 / (1800.117 / 4) / 1e9)
    assert local["object_gbps"] == doc["gpuguard"]["object_gbps"]
    assert doc["assumptions"]["local_bandwidth_per_node"] == "20 GB/s (given)"
    assert doc["assumptions"]["local_capacity_per_node"] == "200 GiB (given): 4 checkpoints"
    assert [row["policy"] for row in doc["tiers"]][3] == "gpuguard + local tier"
    assert all(row["monte_carlo"]["agrees"] for row in doc["tiers"])
    assert doc["tiers"][0]["local_interval_s"] is None and doc["tiers"][3]["local_interval_s"] > 0
    assert len(doc["monte_carlo"]) == len(doc["monte_carlo_best"]) == 5


@pytest.mark.parametrize(
    ("flag", "value", "shown", "allowed"),
    [
        ("--node-loss-share", "-0.1", "-0.1", "must be from 0 to 1"),
        ("--local-capacity-gib", "50", "50.0", "must hold at least 2 local checkpoints"),
        ("--object-store-every", "1000", "1000", "must be at most 39 with interval_s 1800"),
        ("--local-gbps", "0", "0.0", "must be greater than 0"),
        ("--max-local-share", "2", "2.0", "must be greater than 0 and at most 1"),
    ],
)
def test_the_command_rejects_bad_tier_input_naming_the_flag(
    flag: str, value: str, shown: str, allowed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["goodput", flag, value, "--no-check"]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: {shown} is not valid; {allowed}" in err


def test_a_failure_whose_node_survives_restores_from_the_local_tier() -> None:
    # Object storage at 10 GB/s: 660 s to read the job back; a node's 48 GiB from a 20 GB/s local tier, 2.6 s
    # (torch.load's 4.7 s on the H200 is the floor).
    inputs = GoodputInputs(storage_gbps=10.0, local_gbps=20.0, node_loss_share=0.0, object_store_every=1)
    assert inputs.local_restore == pytest.approx(4.699)
    local = inputs.policies()[3]
    assert local.local_downtime_s == pytest.approx(local.downtime_s - inputs.gpuguard_restore + 4.699)
    check = monte_carlo(local, failures=40_000, seed=5)
    assert check.agrees, check
    # The walk charges the local restore too: a closed form that charged object storage's is far off.
    assert abs(check.estimate - goodput(dataclasses.replace(local, local_downtime_s=None))) > 10 * check.stderr
    rows = {(r["policy"], r["kind"]): r for r in compare(inputs).to_dict()["per_failure"]}
    survived = rows[("gpuguard + local tier", "sudden, no replica")]["downtime_s"]
    assert survived == pytest.approx(rows[("gpuguard", "sudden, no replica")]["downtime_s"] - 660 + 4.699, abs=0.5)


def test_the_search_over_m_finds_what_trying_every_m_finds() -> None:
    # A fast local tier over slow object storage: m may be anything up to about 1,300; past 128 the search
    # tries a grid 5% apart and the neighbours of its best.
    inputs = GoodputInputs(storage_gbps=10.0, local_gbps=1000.0, node_loss_share=0.5, gpuguard_stall_s=2.0)
    for policy in inputs.policies()[3:]:
        found, value = best_setting(policy)
        last = math.ceil(inputs.gpuguard_durable / 0.5 / (1 + 2.0))
        assert last > 400
        every = [best_setting(policy, object_every=m)[1] for m in range(1, last + 1)]
        assert value == pytest.approx(max(every), abs=1e-12)
        assert found.object_every == every.index(max(every)) + 1
        assert found.interval_s >= found.min_interval_s - 1e-6
