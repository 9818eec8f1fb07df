"""The snapshot's host copy: every byte lands where the layout says, whatever the tensors look like."""

from pathlib import Path

import pytest
import torch

from gpuguard import CheckpointStore
from gpuguard.checkpoint._staging import host_copy


def _pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    sources = [
        torch.randn(1000, 37, generator=g),  # plain fp32, a size that does not split evenly
        torch.randint(-(2**40), 2**40, (513,), generator=g),  # int64
        torch.randn(64, 64, generator=g).t(),  # not contiguous: copy_ path
        torch.randn(257, generator=g).to(torch.bfloat16),
        torch.tensor(3.5),  # 0-d, like an optimizer's step
        torch.randn(17, 3, generator=g, dtype=torch.complex64).conj(),  # lazily conjugated: copy_ path
        torch.rand(999, generator=g) > 0.5,  # bool
        torch.empty(0),
    ]
    return [(torch.zeros(s.shape, dtype=s.dtype), s) for s in sources]


@pytest.mark.parametrize("threads", [1, 2, 3, 7], ids=lambda n: f"{n}-threads")
def test_host_copy_moves_every_value(threads: int) -> None:
    pairs = _pairs()
    host_copy(pairs, threads=threads, min_split_bytes=0)  # split even these small tensors between threads
    for dst, src in pairs:
        assert torch.equal(dst, src.resolve_conj()), (src.dtype, src.shape)


def test_a_snapshot_large_enough_to_split_round_trips(tmp_path: Path) -> None:
    # Over the 64 MiB below which one thread copies: the threaded path, through the public API.
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=True) for _ in range(17)])
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointStore(f"file://{tmp_path}", keep=1) as store:
        store.prepare({"model": model})
        pending = store.save({"model": model}, step=3)
        with torch.no_grad():  # the snapshot is complete when save returns: changing the model now is safe
            for p in model.parameters():
                p.zero_()
        pending.wait()
        assert store.verify().ok
        assert store.load({"model": model}) == 3
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_a_failed_snapshot_writes_nothing_and_frees_its_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A host snapshot's writer waits for the whole copy (so as not to compete with it for the cores):
    # when the copy fails, that writer must end with the error and give the staging buffer back.
    import gpuguard.checkpoint._staging as staging

    state = {"w": torch.arange(1000.0)}
    real = staging.host_copy

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the copy engine failed")

    with CheckpointStore(f"file://{tmp_path}", keep=2, staging_buffers=1) as store:
        monkeypatch.setattr(staging, "host_copy", failing)
        with pytest.raises(RuntimeError, match="copy engine"):
            store.save(state, step=1)
        monkeypatch.setattr(staging, "host_copy", real)
        assert store.latest() is None
        pending = store.save(state, step=2)  # the one buffer is free again: no hang
        assert pending.wait(timeout=60) is not None
        assert [c.step for c in store.list()] == [2]
        assert not [p for p in tmp_path.rglob("*") if "000000000001" in p.name]
