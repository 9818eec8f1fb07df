"""Every dtype torch has is stored or refused by path; torch.Size and aliases come back as they were."""

from __future__ import annotations

import warnings

import pytest
import torch

from gpuguard import CheckpointStore, UnsupportedStateError

DTYPES = sorted({d for n in dir(torch) if isinstance(d := getattr(torch, n), torch.dtype)}, key=str)


def _sample(dtype: torch.dtype) -> torch.Tensor | None:
    """A few elements of ``dtype`` with varied bytes, or None when torch cannot make one."""
    raw = torch.arange(32, dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2  # a bool byte other than 0 or 1 is undefined behaviour in torch
    try:
        return raw.view(dtype)
    except (RuntimeError, TypeError):
        try:
            return torch.empty(4, dtype=dtype)
        except (RuntimeError, TypeError):
            return None


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def test_every_dtype_is_stored_or_refused_by_path(dtype: torch.dtype) -> None:
    sample = _sample(dtype)
    if sample is None:
        pytest.skip(f"torch cannot create a {dtype} tensor")
    with CheckpointStore(f"memory://dtype-{str(dtype).removeprefix('torch.')}") as store:
        try:
            pending = store.save({"model": {"w": sample}}, step=1)
        except UnsupportedStateError as exc:
            assert f"state['model']['w']: dtype {dtype} cannot be stored" in str(exc)
            assert store.list() == [] and store.prune() == []
            return
        assert pending.wait() is not None
        target: dict[str, object] = {"model": None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # ComplexHalf is "experimental"
            store.load(target)
        loaded = target["model"]["w"]  # type: ignore[index]
        assert loaded.dtype == dtype and loaded.shape == sample.shape
        assert torch.equal(loaded.view(torch.uint8), sample.view(torch.uint8))


def test_a_meta_tensor_is_refused_and_leaves_nothing() -> None:
    with CheckpointStore("memory://meta") as store:
        with pytest.raises(UnsupportedStateError, match=r"state\['model'\]\['w'\]: a meta tensor holds no data"):
            store.save({"model": {"w": torch.empty(3, device="meta")}}, step=1)
        assert store.storage.list_dirs() == [] and store.prune() == []
        assert store.save({"w": torch.ones(1)}, step=2).wait() is not None


def test_torch_size_comes_back_as_torch_size() -> None:
    with CheckpointStore("memory://size") as store:
        store.save({"meta": {"shape": torch.Size([2, 3]), "pair": (1, 2)}}, step=1).wait()
        target: dict[str, object] = {"meta": None}
        store.load(target)
        meta = target["meta"]
        assert isinstance(meta["shape"], torch.Size) and meta["shape"] == torch.Size([2, 3])  # type: ignore[index]
        assert type(meta["pair"]) is tuple  # type: ignore[index]


def test_aliases_in_a_plain_dict_stay_aliased() -> None:
    shared = torch.arange(6.0)
    with CheckpointStore("memory://alias") as store:
        store.save({"buffers": {"a": shared, "b": shared, "c": shared.clone()}}, step=1).wait()
        target: dict[str, object] = {"buffers": None}
        store.load(target)
        buffers = target["buffers"]
        a, b, c = buffers["a"], buffers["b"], buffers["c"]  # type: ignore[index]
        assert a is b and a is not c
        assert torch.equal(a, shared) and torch.equal(c, shared)
