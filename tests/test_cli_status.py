"""``gpuguard status`` as a user runs it: a fresh process, real arguments, exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import H200_UUID, ROOT

SHARED_PROBE = ROOT.parent / "shared" / "fixtures" / "nvml-h200-probe.json"
SCENARIO = ROOT / "examples" / "scenarios" / "degrade-then-fail.json"


def test_replay_of_the_real_h200_is_healthy(cli: Any, h200_probe: Path) -> None:
    probe = SHARED_PROBE if SHARED_PROBE.exists() else h200_probe
    result = cli("status", "--replay", str(probe), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [(d["index"], d["uuid"], d["state"], d["reasons"]) for d in out["devices"]] == [
        (0, H200_UUID, "HEALTHY", [])
    ]


def test_table_shows_each_gpu_and_the_reasons(cli: Any) -> None:
    result = cli("status", "--scenario", str(SCENARIO), "--at", "6")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["GPU", "UUID", "STATE", "TEMP"]
    assert "HEALTHY" in lines[2] and "FAILING" in lines[3]
    assert any("XID 48" in line and "RESET_GPU" in line for line in lines)


@pytest.mark.parametrize(
    ("at", "states", "code"),
    [("0", ["HEALTHY", "HEALTHY"], 0), ("6", ["HEALTHY", "FAILING"], 1), ("10", ["LOST", "FAILING"], 1)],
)
def test_scenario_check_exit_codes(cli: Any, at: str, states: list[str], code: int) -> None:
    result = cli("status", "--scenario", str(SCENARIO), "--at", at, "--check", "--json")
    assert result.returncode == code
    assert [d["state"] for d in json.loads(result.stdout)["devices"]] == states


def test_without_nvml_status_says_so_in_one_line(cli: Any) -> None:
    result = cli("status")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "NVML is not available" in line
    assert "--replay" in line and "--scenario" in line
    assert result.stdout == ""


def test_without_nvml_check_follows_the_fail_mode(cli: Any) -> None:
    assert cli("status", "--check").returncode == 0
    assert cli("status", "--check", "--fail-closed").returncode == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "no/such/file.json"], "scenario: 'no/such/file.json' is not valid; no such file"),
        (["--replay", "no/such/probe.json"], "recording: 'no/such/probe.json' is not valid; no such file"),
        (["--at", "3"], "--at: 3.0 is not valid; needs --scenario PATH"),
        # --count was ignored without --watch (one table, exit 0) and -1 printed nothing, exit 0
        (
            ["--replay", "h200", "--count", "3"],
            "--count: 3 is not valid; goes with --watch SECONDS (refreshes to show)",
        ),
        (
            ["--replay", "h200", "--watch", "0.1", "--count", "-1"],
            "--count: -1 is not valid; must be 1 or more refreshes",
        ),
    ],
    ids=["missing-scenario", "missing-recording", "at-without-scenario", "count-without-watch", "count-below-1"],
)
def test_bad_input_exits_2_with_one_line(cli: Any, args: list[str], message: str) -> None:
    result = cli("status", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"gpuguard: error: {message}"]


def test_malformed_scenario_names_the_field(cli: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gpus": 1, "events": [{"at": 0, "gpu": 0, "field": "ecc_nope", "add": 1}]}))
    result = cli("status", "--scenario", str(bad), "--at", "1")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpuguard: error: events[0].field: 'ecc_nope' is not valid; allowed:")


def test_watch_shows_a_fault_as_it_happens(cli: Any, tmp_path: Path) -> None:
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"gpus": 2, "events": [{"at": 0.3, "gpu": 1, "xid": 48}]}))
    result = cli("status", "--scenario", str(scenario), "--watch", "0.4", "--count", "3", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3 and lines[0]["at"] < lines[-1]["at"]
    assert [d["state"] for d in lines[0]["devices"]] == ["HEALTHY", "HEALTHY"]
    assert [d["state"] for d in lines[-1]["devices"]] == ["HEALTHY", "FAILING"]
    table = cli("status", "--replay", "h200", "--watch", "0.1", "--count", "2")
    assert table.stdout.count("gpuguard status, every 0.1s") == 2


def test_watch_refuses_check_and_at(cli: Any) -> None:
    result = cli("status", "--scenario", str(SCENARIO), "--at", "3", "--watch", "1")
    assert result.returncode == 2
    assert "--watch: 1.0 is not valid; cannot be combined with --check or --at" in result.stderr
