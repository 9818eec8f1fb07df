"""``gpuguard checkpoints list|verify``: in a fresh process, and (what each says) through its ``main``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gpuguard import CheckpointStore


def _saved(tmp_path: Path, steps: tuple[int, ...] = (10, 20)) -> str:
    url = f"file://{tmp_path}/run"
    with CheckpointStore(url) as store:
        for step in steps:
            store.save({"a": torch.zeros(1000), "b": torch.ones(10)}, step=step, reason="periodic", rng=False).wait()
    return url


def _folders(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "run").iterdir() if p.name.startswith("step-"))


def test_list_table_and_json(cli: Any, tmp_path: Path) -> None:
    url = _saved(tmp_path)
    table = cli("checkpoints", "list", url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "STEP", "REASON", "RANKS", "SIZE", "CREATED"]
    assert [line.split()[1] for line in lines[2:]] == ["10", "20"]
    out = json.loads(cli("checkpoints", "list", url, "--json").stdout)
    assert [(c["step"], c["reason"], c["world_size"]) for c in out["checkpoints"]] == [
        (10, "periodic", 1),
        (20, "periodic", 1),
    ]


def test_verify_passes_then_names_the_corrupt_tensor(cli_here: Any, tmp_path: Path) -> None:
    cli = cli_here
    url = _saved(tmp_path)
    ok = cli("checkpoints", "verify", url)
    assert ok.returncode == 0 and "OK" in ok.stdout
    latest = _folders(tmp_path)[-1]
    shard = latest / "rank-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + header])["a"]["data_offsets"][0]
    data[8 + header + start + 4] ^= 1
    shard.write_bytes(bytes(data))
    bad = cli("checkpoints", "verify", url, latest.name)
    assert bad.returncode == 1
    assert "CORRUPT rank-00000-of-00001.safetensors tensor 'a'" in bad.stdout
    report = json.loads(cli("checkpoints", "verify", url, "--json").stdout)
    assert report["ok"] is False
    assert [(p["shard"], p["tensor"]) for p in report["problems"]] == [("rank-00000-of-00001.safetensors", "a")]
    # the older checkpoint is still good
    older = _folders(tmp_path)[0].name
    assert cli("checkpoints", "verify", url, older).returncode == 0


def test_verify_without_checkpoints_exits_2(cli_here: Any, tmp_path: Path) -> None:
    cli = cli_here
    result = cli("checkpoints", "verify", f"file://{tmp_path}/empty")
    assert result.returncode == 2
    assert result.stderr.strip() == f"gpuguard: error: no committed checkpoint under file://{tmp_path}/empty"


def test_a_local_folder_that_is_not_there_is_named_not_listed_as_empty(cli_here: Any, tmp_path: Path) -> None:
    # A mistyped path said "no committed checkpoints" and exited 0: it looked like a run that never saved.
    cli = cli_here
    for url in (str(tmp_path / "typo"), f"file://{tmp_path}/typo"):
        result = cli("checkpoints", "list", url)
        assert result.returncode == 2, url
        assert f"must name an existing checkpoint folder: {tmp_path}/typo does not exist" in result.stderr
    (tmp_path / "a-file").write_text("x")
    listed = cli("checkpoints", "list", str(tmp_path / "a-file"), "--json")
    assert listed.returncode == 2 and "is a file, not a folder" in json.loads(listed.stdout)["error"]


def test_bad_storage_options_exit_2(cli_here: Any, tmp_path: Path) -> None:
    cli = cli_here
    result = cli("checkpoints", "list", str(tmp_path), "--storage-options", "{nope")
    assert result.returncode == 2
    assert result.stderr.startswith("gpuguard: error: --storage-options: '{nope' is not valid; must be a JSON object")


def test_verify_reports_a_garbage_manifest_with_exit_1_and_json(cli_here: Any, tmp_path: Path) -> None:
    cli = cli_here
    url = _saved(tmp_path)
    older, newest = _folders(tmp_path)
    (newest / "MANIFEST.json").write_bytes(b"{garbage")
    named = cli("checkpoints", "verify", url, newest.name, "--json")
    assert named.returncode == 1, named.stderr
    report = json.loads(named.stdout)
    assert report["ok"] is False and report["id"] == newest.name
    assert [p["shard"] for p in report["problems"]] == ["MANIFEST.json"]
    assert "not a valid manifest" in report["problems"][0]["error"]
    # without an id: the older checkpoint verifies, and the newest one it skipped is reported
    newest_skipped = cli("checkpoints", "verify", url, "--json")
    assert newest_skipped.returncode == 1
    report = json.loads(newest_skipped.stdout)
    assert report["id"] == older.name and report["problems"] == []
    assert [s["id"] for s in report["skipped"]] == [newest.name]
    text = cli("checkpoints", "verify", url)
    assert text.returncode == 1
    assert f"{newest.name}: CORRUPT MANIFEST.json" in text.stdout and f"{older.name}: OK" in text.stdout


def test_storage_failures_exit_3_with_json(cli_here: Any, tmp_path: Path) -> None:
    cli = cli_here
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the checkpoint folder should be")
    result = cli("checkpoints", "list", f"file://{blocked}/run", "--json")
    assert result.returncode == 3, (result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["kind"] == "StorageError" and "listing" in doc["error"]
    nothing = cli("checkpoints", "verify", f"file://{tmp_path}/empty", "--json")
    assert nothing.returncode == 2 and json.loads(nothing.stdout)["kind"] == "CheckpointNotFoundError"
