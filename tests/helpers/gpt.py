"""A small GPT with tied embeddings, and the ways users parallelise it: FSDP2, DP×TP, FSDP2+TP, HSDP+TP.

Every layout is built from the same seed, so a state saved in one layout can be compared, tensor for
tensor, with the same state loaded in another (`full_state` gathers the global tensors).

Layouts (``world`` ranks, gloo on CPU):

- ``plain``: no parallelism at all (one process, or data parallel replicas averaging gradients);
- ``fsdp``: ``fully_shard`` on every block and the root, over all ranks (tied embedding and head);
- ``dp_tp``: tensor parallelism (``parallelize_module``) on ``mesh["tp"]`` inside a DP×TP mesh, plain data
  parallelism over ``dp`` (gradients averaged by hand): every DP replica holds the same TP shards;
- ``fsdp_tp``: the same TP plan, then ``fully_shard`` over ``mesh["dp"]``: the block weights become
  ``_StridedShard`` on the 2-D mesh, the embedding a 1-D DTensor on ``mesh["dp"]``, replicated over TP;
- ``hsdp_tp``: a 3-D mesh (replicate × shard × tp): HSDP over the first two dims, TP on the last.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

VOCAB, DIM, HEADS, LAYERS, SEQ = 50, 32, 4, 2, 12


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.q = nn.Linear(DIM, DIM)
        self.k = nn.Linear(DIM, DIM)
        self.v = nn.Linear(DIM, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.ln2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, 3 * DIM + 2)  # uneven under every split we use
        self.fc2 = nn.Linear(3 * DIM + 2, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        h = self.ln1(x)
        # Heads are taken from the local width, so the block works with column-sharded q/k/v (TP).
        q, k, v = self.q(h), self.k(h), self.v(h)
        heads = q.shape[-1] * HEADS // DIM
        q, k, v = (t.view(batch, seq, heads, DIM // HEADS).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(DIM // HEADS)
        mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        attn = attn.masked_fill(mask, float("-inf")).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, seq, -1)
        x = x + self.proj(out)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class Gpt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        self.blocks = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build(layout: str, *, mixed_precision: bool = False, tp: int = 2, groups_reversed: bool = False) -> dict[str, Any]:
    """The model in ``layout`` on this process group, with AdamW over two param groups (decay, no decay).

    ``tp`` is the tensor-parallel size of the TP layouts (1 gives the DP×TP structure on 2 ranks);
    ``groups_reversed`` lists the optimizer's groups the other way round.
    """
    torch.manual_seed(0)
    model = Gpt()
    world = dist.get_world_size() if dist.is_initialized() else 1
    dp_group = None
    if layout == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        _fully_shard(model, init_device_mesh("cpu", (world,)), mixed_precision)
    elif layout in ("dp_tp", "fsdp_tp"):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
        _tensor_parallel(model, mesh["tp"])
        if layout == "fsdp_tp":
            _fully_shard(model, mesh["dp"], mixed_precision)
        else:
            dp_group = mesh["dp"].get_group()
    elif layout == "hsdp_tp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, world // (2 * tp), tp), mesh_dim_names=("rep", "shard", "tp"))
        _tensor_parallel(model, mesh["tp"])
        _fully_shard(model, mesh["rep", "shard"], mixed_precision)
    elif layout == "plain":
        dp_group = dist.group.WORLD if world > 1 else None
    else:
        raise ValueError(layout)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim != 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups[::-1] if groups_reversed else groups, lr=3e-3)
    tp_size = tp if layout in ("dp_tp", "fsdp_tp", "hsdp_tp") else 1
    return {"model": model, "optimizer": optimizer, "dp_group": dp_group, "layout": layout, "tp": tp_size}


def _fully_shard(model: Gpt, mesh: Any, mixed_precision: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def _tensor_parallel(model: Gpt, tp_mesh: Any) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "proj": RowwiseParallel()}
    plan |= {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, tp_mesh, plan)


def batch(step: int, dp_rank: int, size: int = 4) -> torch.Tensor:
    """The tokens of ``step`` for data-parallel rank ``dp_rank`` (TP ranks of one replica share them)."""
    generator = torch.Generator().manual_seed(step * 1009 + dp_rank)
    return torch.randint(0, VOCAB, (size, SEQ), generator=generator)


def dp_rank(state: dict[str, Any]) -> int:
    """Which data-parallel replica this rank feeds (the TP ranks of one replica are consecutive)."""
    return dist.get_rank() // state["tp"] if dist.is_initialized() else 0


def train_step(state: dict[str, Any], step: int) -> float:
    model, optimizer = state["model"], state["optimizer"]
    tokens = batch(step, dp_rank(state))
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))
    loss.backward()
    group = state.get("dp_group")
    if group is not None:  # plain data parallelism: average gradients by hand, in a fixed order
        size = dist.get_world_size(group)
        for param in model.parameters():
            grad = param.grad
            if grad is None:
                continue
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            dist.all_reduce(local, group=group)
            local /= size
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def full_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor as a global tensor, keyed by FQN (a collective for DTensors: every rank calls it)."""
    model, optimizer = state["model"], state["optimizer"]
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        out[f"model.{name}"] = _full(value)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                out[f"optim.{names[id(param)]}.{key}"] = _full(value)
    return out


def _full(value: Any) -> torch.Tensor:
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach().clone().contiguous()
