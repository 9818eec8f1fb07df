import dataclasses
import json
import math

import pytest

from gpuguard.cli import main
from gpuguard.errors import ConfigError
from gpuguard.goodput import GoodputInputs, Policy, compare, expected_cycle, goodput, monte_carlo


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
    ],
    ids=["bare", "blocking-save", "gpuguard-like", "failures-every-few-intervals"],
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
    p, g = report.periodic, report.gpuguard
    assert g.goodput > p.goodput
    assert g.work_lost_per_failure_s < p.work_lost_per_failure_s
    # A cheap snapshot makes short intervals pay: gpuguard's best interval is far shorter.
    assert g.best_interval_s < p.best_interval_s / 3
    assert g.best_goodput >= g.goodput
    assert all(c.agrees for c in report.checks)
    doc = report.to_dict()
    assert doc["assumptions"]["failures_per_day"] == pytest.approx(2.432)
    assert "12.55 (torch.save" in doc["assumptions"]["periodic_stall_s"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"detectable_share": 1.5}, r"detectable_share.*1\.5.*from 0 to 1"),
        ({"nodes": 0}, r"nodes.*0.*1 or greater"),
        ({"interval_s": -5.0}, r"interval_s.*-5.*greater than 0"),
        ({"failure_source": "made-up"}, r"failure_source.*made-up.*nvidia, llama3"),
        ({"interval_s": 2.0, "gpuguard_durable_s": 10.0}, r"interval_s.*2.*queue"),
        ({"restart_s": float("nan")}, r"restart_s.*finite"),
    ],
    ids=["share", "nodes", "interval", "source", "interval-below-lag", "nan"],
)
def test_bad_input_names_field_value_and_what_is_allowed(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GoodputInputs(**kwargs)  # type: ignore[arg-type]


def test_the_command_prints_assumptions_and_both_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["goodput", "--nodes", "128", "--gpus-per-node", "8", "--failures", "2000"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA: 19 remediations per 1,000 nodes per day" in out
    assert "detectable_share" in out and "restart_s" in out
    assert "periodic only" in out and "gpuguard" in out
    assert "Monte Carlo" in out


def test_the_command_in_json_uses_the_given_costs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["goodput", "--json", "--no-check", "--failure-rate", "llama3", "--periodic-stall-s", "20"]
    assert main([*argv, "--gpuguard-stall-s", "0.5", "--gpuguard-durable-s", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["assumptions"]["periodic_stall_s"] == "20 (given)"
    assert doc["assumptions"]["failure_rate"].startswith("Meta Llama 3")
    assert doc["periodic"]["checkpoint_overhead"] == pytest.approx(20 / 1820)
    assert doc["monte_carlo"] == []
    assert [row["detectable_share"] for row in doc["sensitivity"]] == [0.0, 0.1, 0.2, 0.3, 0.5]


def test_the_command_rejects_bad_input_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["goodput", "--detectable-share", "2", "--no-check"]) == 2
    assert "detectable_share" in capsys.readouterr().err


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
    eight = measured["hardware_bound_sketch"]["write_8_threads_s"]
    assert min(eight) <= g.H200_PARALLEL_WRITE_S_PER_GIB * gib <= max(eight)
