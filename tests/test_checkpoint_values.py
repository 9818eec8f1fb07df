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


# The dtypes a checkpoint must bring back bit for bit: safetensors' own codes, plus gpuguard's codes
# for complex128, complex32, the float8 fnuz variants and packed float4 (see checkpoint/_layout.py).
MUST_ROUND_TRIP = frozenset(
    {
        "bool",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex32",
        "complex64",
        "complex128",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    }
)
# Refused by path before anything is written: sub-byte integers, raw bits and quantized tensors, whose
# storage no checkpoint format describes.
MUST_REFUSE = frozenset(
    {*(f"int{n}" for n in range(1, 8)), *(f"uint{n}" for n in range(1, 8))}
    | {"bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"}
    | {"qint8", "qint32", "quint8", "quint2x4", "quint4x2"}
)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def test_every_torch_dtype_is_either_kept_or_refused() -> None:
    # A dtype a new torch adds fails here until someone decides which list it belongs to.
    assert not MUST_ROUND_TRIP & MUST_REFUSE
    assert {_name(d) for d in DTYPES} == MUST_ROUND_TRIP | MUST_REFUSE


@pytest.mark.parametrize("name", sorted(MUST_ROUND_TRIP))
def test_a_dtype_comes_back_bit_for_bit(name: str) -> None:
    dtype = getattr(torch, name)
    sample = _sample(dtype)
    assert sample is not None, f"torch cannot make a {dtype} tensor any more"
    with CheckpointStore(f"memory://dtype-{name}") as store:
        assert store.save({"model": {"w": sample}}, step=1).wait() is not None
        target: dict[str, object] = {"model": None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # ComplexHalf is "experimental"
            store.load(target)
        loaded = target["model"]["w"]  # type: ignore[index]
        assert loaded.dtype == dtype and loaded.shape == sample.shape
        assert torch.equal(loaded.view(torch.uint8), sample.view(torch.uint8))


@pytest.mark.parametrize("name", sorted(MUST_REFUSE))
def test_a_dtype_no_checkpoint_can_hold_is_refused_by_path(name: str) -> None:
    dtype = getattr(torch, name)
    sample = _sample(dtype)
    assert sample is not None
    with CheckpointStore(f"memory://dtype-{name}") as store:
        with pytest.raises(UnsupportedStateError) as refused:
            store.save({"model": {"w": sample}}, step=1)
        assert f"state['model']['w']: dtype {dtype} cannot be stored" in str(refused.value)
        assert store.list() == [] and store.storage.list_dirs() == [] and store.prune() == []


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
