"""The format is open: docs/FORMAT.md's own decoder reads what gpuguard writes without gpuguard, and
`gpuguard checkpoints export` writes torch, safetensors and DCP files that their own loaders read back."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.format_decoder import decode_elsewhere, describe
from helpers.training import assert_same, fresh_like, make_state

from gpuguard import CheckpointStore


def _rich_state() -> dict[str, Any]:
    """Every marker of the tree: modules, AdamW, a scheduler, tuples, non-finite floats, int keys,
    dtypes, sizes, numpy arrays, aliases, views of one storage, and the RNG entry."""
    state = make_state()
    base = torch.arange(12.0)
    state["extras"] |= {
        "floats": (math.inf, -math.inf, math.nan, 0.5),
        "dtype": torch.bfloat16,
        "shape": torch.Size([2, 3]),
        "array": np.arange(5, dtype=np.int16),
        "views": {"whole": base, "tail": base[4:], "same": base},
        "$odd": {"$key": 1},
        "path/with~slash": torch.ones(2),
    }
    return state


def _by_name(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """docs/FORMAT.md: an optimizer whose parameters all belong to a module of the state is stored keyed
    by "<state key>.<parameter name>", positions replaced in its groups' params too."""
    names = {
        id(p): f"{k}.{n}" for k, m in state.items() if isinstance(m, torch.nn.Module) for n, p in m.named_parameters()
    }
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = optimizer.state_dict()
    return {
        "state": {order[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def _expected(state: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    plain = {
        k: _by_name(v, state)
        if isinstance(v, torch.optim.Optimizer)
        else v.state_dict()
        if hasattr(v, "state_dict")
        else v
        for k, v in state.items()
    }
    shape = {k: describe(v, k, tensors) for k, v in plain.items()}
    return json.loads(json.dumps(shape)), tensors


def _assert_decoded(got: tuple[Any, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
    shape, tensors = got
    expected_shape, expected_tensors = _expected(state)
    rng = shape.pop("__gpuguard_rng__")
    assert shape == expected_shape
    assert sorted(tensors) == sorted([*expected_tensors, *(n for n in tensors if n.startswith("__gpuguard_rng__"))])
    for name, value in expected_tensors.items():
        assert tensors[name].dtype == value.dtype and torch.equal(tensors[name], value), name
    assert rng["dict"][0][0] == "torch" and tensors["__gpuguard_rng__/torch"].dtype == torch.uint8
    python = dict(rng["dict"])["python"]["tuple"]
    assert python[0] == 3 and len(python[1]["tuple"]) == 625


def test_the_documented_decoder_reads_a_checkpoint_without_gpuguard(tmp_path: Path) -> None:
    state = _rich_state()
    with CheckpointStore(f"file://{tmp_path}/ckpt") as store:
        info = store.save(state, step=42).wait()
    assert info is not None
    _assert_decoded(decode_elsewhere(tmp_path / "ckpt" / info.id, tmp_path / "decoded"), state)


@pytest.mark.slow  # another fresh process (the plain case above runs in the main suite)
def test_the_documented_decoder_reads_a_replicated_checkpoint(tmp_path: Path) -> None:
    state = make_state()
    url, name = f"file://{tmp_path}/ckpt", "step-000000000007-0000a11c"
    with CheckpointStore(url) as rank0, CheckpointStore(url) as rank1:
        first = rank0.save(state, step=7, rank=0, world_size=2, checkpoint_id=name, replicated=True)
        # wait() means committed on every rank: rank 1 sees the manifest rank 0 wrote
        assert rank1.save(state, step=7, rank=1, world_size=2, checkpoint_id=name, replicated=True).wait() is not None
        assert first.wait() is not None
    manifest = json.loads((tmp_path / "ckpt" / name / "MANIFEST.json").read_text())
    assert manifest["layout"] == "replicated" and all(s["tensors"] for s in manifest["shards"])  # split in two
    _assert_decoded(decode_elsewhere(tmp_path / "ckpt" / name, tmp_path / "decoded", rank=1), state)


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "dcp"])
def test_export_round_trips(fmt: str, tmp_path: Path) -> None:
    state = make_state()
    out = tmp_path / ("export.pt" if fmt == "torch" else "export.safetensors" if fmt == "safetensors" else "dcp")
    with CheckpointStore(f"file://{tmp_path}/ckpt") as store:
        store.save(state, step=9).wait()
        report = store.export(fmt, str(out))
    assert report["step"] == 9 and report["format"] == fmt and report["bytes"] > 0
    _assert_reloads(fmt, out, state)


def test_the_cli_exports_and_a_corrupt_checkpoint_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpuguard.cli import main  # in this process: a fresh one costs seconds of imports on a loaded machine

    state = make_state()
    url = f"file://{tmp_path}/ckpt"
    with CheckpointStore(url) as store:
        info = store.save(state, step=9).wait()
    assert info is not None
    capsys.readouterr()
    assert main(["checkpoints", "export", url, str(tmp_path / "export.pt"), "--to", "torch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == info.id
    _assert_reloads("torch", tmp_path / "export.pt", state)
    shard = tmp_path / "ckpt" / info.id / "rank-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["checkpoints", "export", url, str(tmp_path / "bad.pt"), "--to", "torch"]) == 1
    assert "fails its checksum" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()


@pytest.mark.parametrize(
    ("fmt", "out", "message"),
    [
        ("torch", "missing/export.pt", r"out: '.*missing/export.pt' is not valid; a file in an existing folder"),
        ("safetensors", "a-file/export.safetensors", r"out: '.*a-file/export.safetensors' is not valid; a file in an"),
        ("torch", ".", r"out: '.*' is not valid; a file to write the torch export to; this is a folder"),
        ("dcp", "a-file", r"out: '.*a-file' is not valid; an empty or new folder for the DCP checkpoint; this is a"),
        ("dcp", "a-file/dcp", r"out: '.*a-file/dcp' is not valid; an empty or new folder .*a-file is a file"),
        ("torch", "a-file", r"out: '.*a-file' is not valid; a new file for the torch export; it exists"),
        ("safetensors", "a-file", r"out: '.*a-file' is not valid; a new file for the safetensors export; it exists"),
        ("dcp", "full", r"out: '.*full' is not valid; an empty or new folder for the DCP checkpoint; this one holds"),
    ],
    ids=[
        "torch-no-folder",
        "safetensors-under-a-file",
        "torch-onto-a-folder",
        "dcp-onto-a-file",
        "dcp-under-a-file",
        "torch-over-a-file",
        "safetensors-over-a-file",
        "dcp-into-a-full-folder",
    ],
)
def test_the_cli_refuses_an_output_path_it_cannot_write(
    fmt: str, out: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A usage error (exit 2, the option named), never a torch or safetensors traceback (which exited 1)."""
    from gpuguard.cli import main

    url = f"file://{tmp_path}/ckpt"
    with CheckpointStore(url) as store:
        store.save(make_state(), step=3).wait()
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept").write_text("someone's")
    capsys.readouterr()
    assert main(["checkpoints", "export", url, str(tmp_path / out), "--to", fmt]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert main(["checkpoints", "export", url, str(tmp_path / out), "--to", fmt, "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["kind"] == "ConfigError"
    # nothing overwritten, nothing left beside
    assert (tmp_path / "a-file").read_text() == "not a folder" and (tmp_path / "full" / "kept").exists()
    assert not list(tmp_path.glob("**/*.partial-*"))


def _assert_reloads(fmt: str, out: Path, state: dict[str, Any]) -> None:
    restored = fresh_like()
    if fmt == "torch":
        loaded = torch.load(out, weights_only=True)
        for key in ("model", "optimizer", "scheduler"):
            restored[key].load_state_dict(loaded[key])
        restored["extras"] = loaded["extras"]
    elif fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        tensors = load_file(out)
        assert tensors.keys() >= {"model/0.weight", "optimizer/state/0/exp_avg"}
        with safe_open(str(out), "pt") as f:
            tree = json.loads(f.metadata()["gpuguard_tree"])
        assert tree["extras"]["$dict"][0] == ["epoch", 2]
        restored["model"].load_state_dict(
            {k.removeprefix("model/"): v for k, v in tensors.items() if k[:6] == "model/"}
        )
        restored["extras"] = state["extras"]
        for i, per_param in enumerate(state["optimizer"].state_dict()["state"].values()):
            for name, value in per_param.items():
                assert torch.equal(tensors[f"optimizer/state/{i}/{name}"], value)
        restored["optimizer"], restored["scheduler"] = state["optimizer"], state["scheduler"]
    else:
        from torch.distributed.checkpoint.state_dict_loader import load

        template = {k: restored[k].state_dict() for k in ("model", "optimizer", "scheduler")}
        load(template, checkpoint_id=str(out), no_dist=True)
        for key in ("model", "optimizer", "scheduler"):
            restored[key].load_state_dict(template[key])
        restored["extras"] = state["extras"]
    assert_same(state, restored)


def test_export_of_one_key_to_safetensors_is_the_modules_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = make_state()
    with CheckpointStore(f"file://{tmp_path}/ckpt") as store:
        store.save(state, step=3).wait()
        store.export("safetensors", str(tmp_path / "model.safetensors"), key="model")
        with pytest.raises(ValueError, match=r"key: 'modle' is not valid; one of 'model'"):
            store.export("torch", str(tmp_path / "x.pt"), key="modle")
        complex_state = {"z": torch.ones(3, dtype=torch.complex128)}
        store.save(complex_state, step=4, rng=False).wait()
        with pytest.raises(ValueError, match=r"tensor 'z' is torch.complex128, which safetensors has no code for"):
            store.export("safetensors", str(tmp_path / "z.safetensors"))
    model = fresh_like()["model"]
    model.load_state_dict(load_file(tmp_path / "model.safetensors"))
    pairs = zip(model.state_dict().values(), state["model"].state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
