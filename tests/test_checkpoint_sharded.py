"""Sharded (DTensor / FSDP2) checkpoints with real gloo process groups on CPU: saved on 4 ranks and
resumed on 2, saved on 2 and resumed on 4, saved sharded and loaded unsharded and the other way round.
Every tensor must be bitwise equal to the original global tensor; with the world size unchanged,
training must continue bitwise as if never interrupted."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from helpers import sharded
from safetensors.torch import load_file, save_file

from gpuguard import CheckpointCorruptError, CheckpointStore


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(world_size: int, plan: list[tuple[str, str, str]], out: Path, s3: dict[str, Any]) -> None:
    mp.spawn(sharded.worker, args=(world_size, _port(), plan, str(out), s3), nprocs=world_size, join=True)


def tensors(out: Path, tag: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{tag}.safetensors"))


def infos(out: Path, tag: str, world_size: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in range(world_size)]


def assert_identical(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    for name, tensor in expected.items():
        assert tensor.dtype == got[name].dtype and torch.equal(tensor, got[name]), name


def plain_state(seed: int) -> dict[str, Any]:
    """The unsharded twin of the workers' DTensor model: same names, global shapes, AdamW."""
    return sharded.dstate(None, seed=seed)


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> tuple[str, dict[str, Any]]:
    """A bucket on the real S3 server (moto over HTTP): the 2-rank checkpoint lives there."""
    import uuid

    import s3fs

    from conftest import s3_options

    bucket = f"sharded-{uuid.uuid4().hex[:12]}"
    options = s3_options(s3_endpoint)
    s3fs.S3FileSystem(**options).call_s3("create_bucket", Bucket=bucket)
    return f"s3://{bucket}/two", options


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, s3: tuple[str, dict[str, Any]]) -> tuple[Path, Path]:
    """Four gloo jobs, run once for the module:

    1. 4 ranks save DTensors at step 3 (``four``) and train on;
    2. 2 ranks load ``four`` (4 → 2); save their own DTensors (``two``, on S3); FSDP2 saves (``fsdp``);
    3. 4 ranks load ``four`` and train on (4 → 4, the continuation); load ``two`` (2 → 4, ranged GETs);
    4. 2 ranks load FSDP2's checkpoint and train on; load a checkpoint a single plain process wrote.
    """
    root = tmp_path_factory.mktemp("sharded")
    out, ckpt = root / "out", root / "ckpt"
    out.mkdir()
    # A plain (unsharded, single-process) checkpoint of the same model, trained 3 steps.
    torch.manual_seed(7)
    plain = plain_state(seed=1234)
    sharded.train(plain, 3)
    with CheckpointStore(str(ckpt / "plain")) as store:
        store.save(plain, 3).wait()
    save_file(sharded.full_tensors(plain), str(out / "plain-saved.safetensors"))
    url = {name: str(ckpt / name) for name in ("four", "fsdp", "plain")} | {"two": s3[0]}
    two = [("dload", url["four"], "four-to-two"), ("dsave", url["two"], "two"), ("fsave", url["fsdp"], "fsdp")]
    four = [("dload", url["four"], "four-to-four"), ("dload", url["two"], "two-to-four")]
    last = [("fload", url["fsdp"], "fsdp-to-two"), ("dload", url["plain"], "plain-to-two"), ("refuse", "", "refuse")]
    spawn(4, [("dsave", url["four"], "four")], out, s3[1])
    spawn(2, two, out, s3[1])
    spawn(4, four, out, s3[1])
    spawn(2, last, out, s3[1])
    return out, ckpt


def test_saved_on_four_resumed_on_two_is_bitwise_the_global_state(runs: tuple[Path, Path]) -> None:
    out, _ = runs
    assert_identical(tensors(out, "four-saved"), tensors(out, "four-to-two-loaded"))
    assert [i["step"] for i in infos(out, "four-to-two-loaded", 2)] == [3, 3]


def test_saved_on_two_resumed_on_four_is_bitwise_the_global_state(runs: tuple[Path, Path]) -> None:
    out, _ = runs
    assert_identical(tensors(out, "two-saved"), tensors(out, "two-to-four-loaded"))


def test_same_world_size_continues_bitwise_as_if_never_interrupted(runs: tuple[Path, Path]) -> None:
    out, _ = runs
    assert_identical(tensors(out, "four-saved"), tensors(out, "four-to-four-loaded"))
    assert_identical(tensors(out, "four-after"), tensors(out, "four-to-four-after"))
    # The continuation is not trivially equal to the checkpoint: training moved on.
    assert not torch.equal(tensors(out, "four-after")["model.w0"], tensors(out, "four-saved")["model.w0"])


def test_fsdp2_fully_shard_saves_and_continues_bitwise(runs: tuple[Path, Path]) -> None:
    out, _ = runs
    assert_identical(tensors(out, "fsdp-saved"), tensors(out, "fsdp-to-two-loaded"))
    assert_identical(tensors(out, "fsdp-after"), tensors(out, "fsdp-to-two-after"))


def test_plain_single_process_checkpoint_loads_into_a_sharded_model(runs: tuple[Path, Path]) -> None:
    out, _ = runs
    assert_identical(tensors(out, "plain-saved"), tensors(out, "plain-to-two-loaded"))


def test_sharded_checkpoint_loads_into_an_unsharded_process(
    runs: tuple[Path, Path], s3: tuple[str, dict[str, Any]]
) -> None:
    out, ckpt = runs
    for name, tag in (("four", "four-saved"), ("two", "two-saved"), ("fsdp", "fsdp-saved")):
        if name == "fsdp":
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.GELU(), torch.nn.Linear(11, 3))
            state: dict[str, Any] = {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.01)}
        else:
            state = plain_state(seed=99)
        url, options = (s3[0], s3[1]) if name == "two" else (str(ckpt / name), None)
        with CheckpointStore(url, options) as store:
            assert store.load(state) == 3
        assert_identical(tensors(out, tag), sharded.full_tensors(state))


def test_each_replica_chunk_is_written_once_with_its_global_offsets(runs: tuple[Path, Path]) -> None:
    _, ckpt = runs
    manifest = json.loads(next((ckpt / "four").glob("step-*/MANIFEST.json")).read_text())
    written: dict[str, list[tuple[list[int], list[int]]]] = {}
    for shard in manifest["shards"]:
        for name, chunk in shard["chunks"].items():
            assert name.startswith("optimizer") or chunk["global_shape"] == list(sharded.SHAPES[name.split("/")[1]])
            written.setdefault(name, []).append((chunk["offsets"], chunk["sizes"]))
    # w0 [Shard(0), Shard(1)] on 2x2 over (7, 5): four distinct chunks, uneven.
    assert sorted(written["model/w0"]) == [([0, 0], [4, 3]), ([0, 3], [4, 2]), ([4, 0], [3, 3]), ([4, 3], [3, 2])]
    # w1 [Shard(1), Replicate()] over (5, 9): two chunks, each written by one of its two replicas.
    assert sorted(written["model/w1"]) == [([0, 0], [5, 5]), ([0, 5], [5, 4])]
    assert sorted(written["model/w2"]) == [([0], [5]), ([5], [4])]
    assert written["model/b"] == [([0], [3])]  # fully replicated: one copy in all
    assert sorted(written["optimizer/state/model.w0/exp_avg"]) == sorted(written["model/w0"])  # by parameter name


def test_a_flipped_byte_in_a_chunk_fails_the_load_naming_shard_and_tensor(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    _, ckpt = runs
    import shutil

    copy = tmp_path / "four"
    shutil.copytree(ckpt / "four", copy)
    folder = next(copy.glob("step-*"))
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    shard = manifest["shards"][1]
    chunk = shard["chunks"]["model/w0"]
    path = folder / shard["file"]
    data = bytearray(path.read_bytes())
    data[chunk["file_offset"] + 2] ^= 0x40
    path.write_bytes(bytes(data))
    state = plain_state(seed=99)
    before = state["model"].w0.detach().clone()
    with CheckpointStore(str(copy)) as store, pytest.raises(CheckpointCorruptError, match="model/w0") as info:
        store.load(state)
    assert info.value.shard == shard["file"] and info.value.tensor == "model/w0"
    assert torch.equal(state["model"].w0, before)  # nothing restored from a corrupt checkpoint


def _rewrite_manifest(folder: Path, change: Any) -> None:
    """Edit a manifest as a buggy writer would have written it: valid JSON with a valid self-checksum."""
    import crc32c

    path = folder / "MANIFEST.json"
    body = json.loads(path.read_text())
    body.pop("manifest_crc32c")
    change(body)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["manifest_crc32c"] = f"{crc32c.crc32c(canonical):08x}"
    path.write_text(json.dumps(body, sort_keys=True, indent=1))


@pytest.mark.parametrize("defect", ["duplicated", "missing"])
def test_verify_fails_a_checkpoint_whose_chunks_do_not_tile_a_tensor(
    runs: tuple[Path, Path], tmp_path: Path, defect: str, cli: Any
) -> None:
    """The DP×TP defect: replicas wrote the same chunk, every checksum passed, verify said OK and no load
    could place the chunks. A chunk twice, or a chunk missing, now fails verify, the CLI and the load."""
    _, ckpt = runs
    import shutil

    copy = tmp_path / "four"
    shutil.copytree(ckpt / "four", copy)

    def change(body: dict[str, Any]) -> None:
        shards = body["shards"]
        if defect == "duplicated":  # a second rank describes the first rank's chunk of w0 as its own
            first = next(s for s in shards if s["chunks"]["model/w0"]["offsets"] == [0, 0])
            second = next(s for s in shards if s["chunks"]["model/w0"]["offsets"] != [0, 0])
            offset = second["chunks"]["model/w0"]["file_offset"]
            second["chunks"]["model/w0"] = dict(first["chunks"]["model/w0"], file_offset=offset)
        else:  # one rank's chunk of big is not listed
            del next(s for s in shards if "model/big" in s["chunks"])["chunks"]["model/big"]

    _rewrite_manifest(next(copy.glob("step-*")), change)
    tensor = "model/w0" if defect == "duplicated" else "model/big"
    with CheckpointStore(str(copy)) as store:
        report = store.verify()
        assert not report.ok
        problem = next(p for p in report.problems if p["tensor"] == tensor)
        assert ("overlap" if defect == "duplicated" else "cover 3") in problem["error"], report.problems
        with pytest.raises(CheckpointCorruptError, match=tensor):
            store.load(plain_state(seed=99))
    result = cli("checkpoints", "verify", str(copy))
    assert result.returncode == 1 and f"tensor {tensor!r}" in result.stdout, result.stdout + result.stderr


def test_unsupported_placements_are_refused_before_anything_is_written(runs: tuple[Path, Path]) -> None:
    out, _ = runs
    for info in infos(out, "refuse", 2):
        assert "'extras/t'" in info["partial"] and "Partial" in info["partial"] and "Replicate()" in info["partial"]
        assert info["partial_files"] == "[]"


def test_a_reshard_reads_about_the_ranks_share_not_every_chunk(runs: tuple[Path, Path]) -> None:
    out, _ = runs
    big = 1024 * 520 * 4  # model/big and its two AdamW moments dominate the checkpoint
    # Saved on 2 ranks, big's chunks are 1.02 MB each, and a rank of 4 needs half of one; saved on 4, a
    # rank of 2 needs two whole chunks. For chunks of 1 MiB and more the checksum blocks cost at most
    # 1/64 of a chunk per edge; the small tensors (a few KiB, one block each) are read whole.
    for tag, world_size in (("two-to-four-loaded", 4), ("four-to-two-loaded", 2)):
        share = 3 * big // world_size
        for info in infos(out, tag, world_size):
            assert share <= info["bytes_read"] <= 1.1 * share + 16 * 1024, (tag, info)


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (9,), (3,), (1, 4), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("mesh", [(2,), (4,), (2, 2), (3, 2), (1, 4)], ids=str)
def test_chunk_arithmetic_matches_torch_chunk_for_every_coordinate(
    shape: tuple[int, ...], mesh: tuple[int, ...]
) -> None:
    """The chunk a rank holds, computed from shape, mesh and placements alone, is the piece that
    DTensor's Shard (torch.chunk, padded with empty pieces) gives it, for every placement mix."""
    from itertools import product

    from torch.distributed.tensor import Replicate, Shard

    from gpuguard.checkpoint._sharding import local_region

    whole = torch.arange(torch.Size(shape).numel()).reshape(shape)
    options = [Replicate(), *(Shard(d) for d in range(len(shape))), Shard(-1)]
    for placements in product(options, repeat=len(mesh)):
        for coordinate in product(*(range(n) for n in mesh)):
            expected = whole
            for size, index, placement in zip(mesh, coordinate, placements, strict=True):
                if isinstance(placement, Shard):
                    pieces = list(torch.chunk(expected, size, dim=placement.dim))
                    dim = placement.dim % len(shape)
                    empty = list(expected.shape)
                    empty[dim] = 0
                    pieces += [expected.new_empty(empty)] * (size - len(pieces))
                    expected = pieces[index]
            offsets, sizes = local_region(shape, mesh, coordinate, placements)
            got = whole[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
            assert got.shape == expected.shape and torch.equal(got, expected), (placements, coordinate)


def _by_state_dict_names(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A decoded or exported state's tensors under full_tensors' names (model.w0, optimizer.0.exp_avg).
    As stored, the optimizer's state is keyed by parameter name (docs/FORMAT.md): its position is the
    parameter's in the model, whose optimizer lists them in that order."""
    order = [f"model.{name}" for name, _ in plain_state(seed=0)["model"].named_parameters()]
    out = {}
    for name, value in tensors.items():
        parts = name.removeprefix(prefix).split("/")
        if parts[0] == "model":
            out["model." + "/".join(parts[1:])] = value
        elif parts[0] == "optimizer" and parts[1] == "state":
            index = parts[2] if parts[2].isdigit() else str(order.index(parts[2]))
            out[f"optimizer.{index}.{parts[3]}"] = value
    return out


def test_the_documented_decoder_assembles_a_sharded_checkpoint(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from helpers.format_decoder import decode_elsewhere

    out, ckpt = runs
    folder = next((ckpt / "four").glob("step-*"))
    _, decoded = decode_elsewhere(folder, tmp_path / "decoded")  # no gpuguard in that process
    assert_identical(tensors(out, "four-saved"), _by_state_dict_names(decoded))


@pytest.mark.parametrize("fmt", ["torch", "safetensors", "dcp"])
def test_a_sharded_checkpoint_exports_whole_tensors(runs: tuple[Path, Path], tmp_path: Path, fmt: str) -> None:
    out, ckpt = runs
    target = tmp_path / f"export-{fmt}"
    with CheckpointStore(str(ckpt / "fsdp")) as store:
        assert store.export(fmt, str(target))["step"] == 3
    expected = tensors(out, "fsdp-saved")
    if fmt == "safetensors":
        got = _by_state_dict_names(load_file(str(target)))
    elif fmt == "torch":
        state = torch.load(target, weights_only=True)
        got = {f"model.{k}": v for k, v in state["model"].items()}
        got |= {f"optimizer.{i}.{k}": v for i, per in state["optimizer"]["state"].items() for k, v in per.items()}
    else:
        from torch.distributed.checkpoint.state_dict_loader import load

        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.GELU(), torch.nn.Linear(11, 3))
        template = {"model": model.state_dict()}
        load(template, checkpoint_id=str(target), no_dist=True)
        got = {f"model.{k}": v for k, v in template["model"].items()}
        expected = {k: v for k, v in expected.items() if k.startswith("model.")}
    assert_identical(expected, got)


def test_chunks_that_follow_one_another_in_a_file_are_read_in_one_request(runs: tuple[Path, Path]) -> None:
    # Loaded whole by one process, each rank's file of ``four`` is needed whole but for the RNG states of
    # the other ranks: a few ranged reads per file (one GET each on object stores), not one per chunk.
    from helpers import counting_fs

    out, ckpt = runs
    counting_fs.reset()
    try:
        manifest = json.loads(next((ckpt / "four").glob("step-*/MANIFEST.json")).read_text())
        chunks = sum(len(shard["chunks"]) for shard in manifest["shards"])
        state = plain_state(seed=99)
        with CheckpointStore("counted://four") as store:
            store.storage.fs.put(str(ckpt / "four"), store.storage.root, recursive=True)
            assert store.load(state) == 3
            read = store.last_load_bytes_read
        assert_identical(tensors(out, "four-saved"), sharded.full_tensors(state))
        reads = counting_fs.CountingFileSystem.reads
        headers = [r for r in reads if r[1] == 0]
        data = [r for r in reads if r[1] != 0]
        # 39 chunks in 4 files, each file read in at most 4 runs (the gaps: other ranks' RNG states and
        # per-rank copies of plain tensors between the chunks each rank was given to write)
        assert len(data) <= 4 * len(manifest["shards"]) < chunks, (chunks, data)
        assert sum(end - start for _, start, end in data) == read  # nothing read twice, nothing beyond
        assert len(headers) <= len(manifest["shards"])
    finally:
        counting_fs.reset()


@pytest.mark.parametrize("shape", [(11, 5), (98,), (8, 8), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("mesh", [(2, 2), (3, 2), (2, 2, 2), (2, 1, 2)], ids=str)
def test_strided_and_n_dimensional_pieces_match_dtensor_for_every_coordinate(
    shape: tuple[int, ...], mesh: tuple[int, ...]
) -> None:
    """FSDP2 over TP gives _StridedShard (sharded right to left); 3-D meshes chain three splits. The piece a
    rank holds, from shape, mesh and placements alone, is DTensor's own (its _split_tensor on the indices),
    and a piece that is not a box is said so rather than placed wrongly."""
    from itertools import product

    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from gpuguard.checkpoint._sharding import NotABoxError, local_region

    options = [Replicate(), *(Shard(d) for d in range(len(shape))), *(_StridedShard(0, split_factor=f) for f in (2, 3))]
    boxes = 0
    for placements in product(options, repeat=len(mesh)):
        for coordinate in product(*(range(n) for n in mesh)):
            index = [torch.arange(n) for n in shape]
            for size, at, placement in zip(mesh, coordinate, placements, strict=True):
                if isinstance(placement, (Shard, _StridedShard)):
                    along = (
                        _StridedShard(0, split_factor=placement.split_factor)
                        if isinstance(placement, _StridedShard)
                        else Shard(0)
                    )
                    index[placement.dim] = along._split_tensor(index[placement.dim], size, with_padding=False)[0][at]
            try:
                offsets, sizes = local_region(shape, mesh, coordinate, placements)
            except NotABoxError:
                assert any(
                    len(i) > 1 and not torch.equal(i, torch.arange(int(i[0]), int(i[0]) + len(i))) for i in index
                )
                continue
            assert sizes == tuple(len(i) for i in index), (placements, coordinate)
            if all(sizes):
                boxes += 1
                for i, o, n in zip(index, offsets, sizes, strict=True):
                    assert torch.equal(i, torch.arange(o, o + n)), (placements, coordinate)
    assert boxes > 0
