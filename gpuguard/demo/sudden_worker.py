"""``gpuguard demo --sudden``'s training job, under gpuguard-run (gloo, CPU): one rank may die without warning.

Run as ``gpuguard-run --standalone --nproc-per-node N -m gpuguard.demo.sudden_worker --dir D ...``.

``--layout ddp``: ``DistributedDataParallel`` with ``replicated=True``; ``ddp-per-rank``: the same with
``replicated=False`` (each rank's state its own); ``hsdp``: FSDP2 ``fully_shard`` on a 2 x 2 (replicate,
shard) mesh; ``fsdp``: FSDP2 on a 1-D mesh (no replicas). With ``--kill-rank R
--kill-step S --kill-phase P`` rank R SIGKILLs itself during step S:

- ``forward``: inside the model's forward (a hook on a hidden layer);
- ``backward``: inside backward: DDP, in its all-reduce of the first bucket (the other ranks wait in
  theirs); FSDP2, as the first layer's output gradient is ready (the later layers' reduce-scatters done,
  the next one's peers waiting);
- ``between``: after ``guard.step(S)`` returned, before the next forward;
- ``periodic``: a few milliseconds after ``guard.step(S)`` started a periodic checkpoint (S a
  multiple of ``--periodic-every``), while it is being written;
- ``optimizer``: as ``optimizer.step()`` of step S returns (after its gradients were exchanged).

Before dying it writes ``killed.json`` (rank, step, phase, wall time). Every other rank writes
``rank-N.json`` (how it ended); rank 0 writes the final weights after an uninterrupted finish.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import gpuguard


def build(layout: str) -> tuple[torch.nn.Module, torch.nn.Sequential, torch.optim.Optimizer, Any]:
    """(the model as trained, its layers, the optimizer, the scheduler)."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    )
    model: torch.nn.Module = layers
    if layout.startswith("ddp"):
        ddp = torch.nn.parallel.DistributedDataParallel(layers)
        ddp.register_comm_hook(None, reduce_each_gradient)
        model = ddp
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        world = dist.get_world_size()
        if layout == "hsdp":
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
        for layer in (layers[0], layers[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(layers, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.7)
    return model, layers, optimizer, scheduler


class ReportOnLeaving:
    """Writes this rank's report as the guard leaves, while its SIGTERM handler still stands: once the guard
    has closed, the launcher's SIGTERM (sent as soon as the first rank exits) would end the process at once."""

    def __init__(self, report: dict[str, Any], out: Path) -> None:
        self.report = report
        self.out = out

    @gpuguard.hookimpl
    def gpuguard_on_evacuation(self, decision: Any, exit_code: int, checkpoint: Any) -> None:
        sudden = decision.evidence.get("sudden_loss")
        self.report |= {
            "exit_code": exit_code,
            "evacuated_at": sudden.get("step") if sudden else None,
            "message": decision.message,
            "sudden_loss": sudden,
            "left_at": time.time(),
        }
        partial = self.out.with_suffix(".partial")
        partial.write_text(json.dumps(self.report))
        os.replace(partial, self.out)


def reduce_each_gradient(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects annotations it cannot read
    """DDP's all-reduce, one gradient at a time, in the bucket's order (the same on every rank).

    DDP re-buckets its gradients after the first step of every launch, and a ring all-reduce over
    more than two ranks rounds a bucket's sums differently when its layout changes: a resumed run would
    differ from an uninterrupted one in the last bits. Reducing each gradient alone makes every sum
    independent of the bucketing.
    """
    if KILL_IN_ALLREDUCE["armed"]:
        KILL_IN_ALLREDUCE["armed"] = False
        KILL_IN_ALLREDUCE["die"]()
    world = dist.get_world_size()
    for gradient in bucket.gradients():
        dist.all_reduce(gradient)
        gradient.div_(world)
    future = torch.futures.Future()  # type: ignore[var-annotated]
    future.set_result(bucket.buffer())
    return future


KILL_IN_ALLREDUCE: dict[str, Any] = {"armed": False, "die": None}


def digest(state: dict[str, Any]) -> str:
    """A fingerprint of everything a resume must bring back: parameters, optimizer and scheduler state,
    this rank's RNG and data position."""
    import hashlib

    h = hashlib.sha256()
    for name in ("model", "optimizer", "scheduler"):
        flat = _leaves(state[name].state_dict())
        for key, value in flat:
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                h.update(local.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(value).encode())
    h.update(torch.get_rng_state().numpy().tobytes())
    h.update(json.dumps(state["progress"], sort_keys=True).encode())
    return h.hexdigest()


def _leaves(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{prefix}/{k}")]
    if isinstance(value, (list, tuple)):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{prefix}/{i}")]
    return [(prefix, value)]


def _raise(folder: Path, rank: int, step: int) -> None:
    record = {"rank": rank, "step": step, "phase": "raise", "at": time.time(), "pid": os.getpid()}
    (folder / "killed.json").write_text(json.dumps(record))
    raise RuntimeError(f"a bug in rank {rank}'s step {step}")


def die(folder: Path, rank: int, step: int, phase: str) -> None:
    """SIGKILL this rank (phase ``stop``: SIGSTOP it, a hang whose sockets stay open, as a vanished node's do)."""
    record = {"rank": rank, "step": step, "phase": phase, "at": time.time(), "pid": os.getpid()}
    (folder / ("stopped.json" if phase == "stop" else "killed.json")).write_text(json.dumps(record))
    os.kill(os.getpid(), signal.SIGSTOP if phase == "stop" else signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--layout",
        choices=("ddp", "ddp-per-rank", "hsdp", "fsdp"),
        default="ddp",
        help="ddp-per-rank: DDP with replicated=False, so that no rank's state counts as another's copy",
    )
    p.add_argument("--periodic-every", type=int, default=0)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=-1)
    p.add_argument("--kill-phase", default="forward")
    p.add_argument("--step-sleep", type=float, default=0.01)
    p.add_argument("--ballast-mib", type=float, default=0.0, help="replicated state that never changes, to size saves")
    p.add_argument("--trace", action="store_true", help="write a digest of each rank's state at every step")
    args = p.parse_args(argv)
    folder = args.dir
    folder.mkdir(parents=True, exist_ok=True)

    started = time.time()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s pid %(process)d %(name)s: %(message)s")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, layers, optimizer, scheduler = build(args.layout)
    torch.manual_seed(1000 + rank)  # dropout differs between ranks: each rank's RNG must come back as its own
    progress = {"batches": 0}
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress}
    if args.ballast_mib:
        ballast = torch.nn.Linear(1, int(args.ballast_mib * 2**18), bias=False)
        if not args.layout.startswith("ddp"):  # sharded like the model, as a real FSDP2 job's every module is
            from torch.distributed.fsdp import fully_shard

            fully_shard(ballast, mesh=next(iter(layers.parameters())).device_mesh)  # type: ignore[attr-defined]
        state["ballast"] = ballast
    victim = rank == args.kill_rank
    current = {"step": -1}
    if victim and args.kill_phase == "raise":  # not a loss: the rank's own error, as a bug would raise
        layers[3].register_forward_pre_hook(
            lambda m, a: _raise(folder, rank, current["step"]) if current["step"] == args.kill_step else None
        )
    if victim and args.kill_phase == "forward":
        layers[3].register_forward_pre_hook(
            lambda m, a: die(folder, rank, current["step"], "forward") if current["step"] == args.kill_step else None
        )
    if victim and args.kill_phase in ("backward", "stop"):
        if args.layout.startswith("ddp"):  # inside DDP's all-reduce of the first bucket: the others wait in theirs
            KILL_IN_ALLREDUCE["die"] = lambda: die(folder, rank, current["step"], args.kill_phase)
        else:  # as the first layer's output gradient is ready: the later layers' reduce-scatters have run
            # (A hook on a parameter never fires under FSDP2: autograd flows through the unsharded tensors,
            # and the sharded parameters' gradients are assigned by the reduce-scatter.)
            def arm(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
                if current["step"] == args.kill_step and output.requires_grad:
                    output.register_hook(lambda g: die(folder, rank, current["step"], "backward"))  # type: ignore[no-untyped-call]

            layers[0].register_forward_hook(arm)
    if victim and args.kill_phase == "optimizer":  # its parameters updated, its step not yet completed
        optimizer.register_step_post_hook(
            lambda o, a, k: (
                die(folder, rank, current["step"], "optimizer") if current["step"] == args.kill_step else None
            )
        )
    report: dict[str, Any] = {"rank": rank, "world_size": world, "started_at": started}
    out = folder / f"rank-{rank}.json"
    try:
        with gpuguard.Guard(
            checkpoint_dir=f"file://{folder / 'checkpoints'}",
            state=state,
            sync_every=5,
            checkpoint_every_steps=args.periodic_every or None,
            checkpoint_every_s=0,
            replicated=args.layout == "ddp",  # ddp-per-rank: the guard is not told the ranks hold copies
            commit_timeout_s=20,
            plugins=[ReportOnLeaving(report, out)],
        ) as guard:
            report["resumed_at"] = guard.resume()
            report["training_at"] = time.time()
            if args.trace:
                report["resumed_digest"] = digest(state)
            for step in range(report["resumed_at"], args.steps):
                current["step"] = step
                KILL_IN_ALLREDUCE["armed"] = KILL_IN_ALLREDUCE["die"] is not None and step == args.kill_step
                g = torch.Generator().manual_seed(step * 1000 + rank)
                x = torch.randn(32, 16, generator=g)
                progress["batches"] += 1  # the data position advances as a batch is drawn
                loss = torch.nn.functional.mse_loss(model(x), x[:, :1].cos())
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                time.sleep(args.step_sleep)
                guard.step(step)
                if args.trace:
                    with (folder / f"trace-rank-{rank}.jsonl").open("a") as trace:
                        trace.write(json.dumps({"step": step, "digest": digest(state)}) + "\n")
                if victim and step == args.kill_step and args.kill_phase == "between":
                    die(folder, rank, step, "between")
                if victim and step == args.kill_step and args.kill_phase == "periodic":
                    threading.Timer(0.003, die, (folder, rank, step, "periodic")).start()
        report["exit_code"] = 0
        report["batches"] = progress["batches"]
    except gpuguard.Evacuation:
        raise  # the report is written: ReportOnLeaving
    if rank == 0:
        from safetensors.torch import save_file

        weights = model.state_dict()
        if not args.layout.startswith("ddp"):
            weights = {k: v.full_tensor() for k, v in weights.items()}
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(folder / "final.safetensors"))
    elif not args.layout.startswith("ddp"):
        for value in model.state_dict().values():
            value.full_tensor()  # a collective: every rank takes part
    out.write_text(json.dumps(report))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
