"""Abandoning the collectives of a job that lost a rank: none of them can finish, none may hang.

The training thread is usually blocked inside the user's own collective when a peer dies (DDP's
all-reduce in backward, FSDP's all-gather in forward), and will be until the backend gives up: 10
minutes for NCCL, 30 for gloo by default. The survivors never use these process groups again (they
save through the side channel and storage, then exit), so every group is abandoned at once:

- NCCL: ``torch.distributed.distributed_c10d._abort_process_group()`` aborts every communicator
  within one NCCL group call (``ncclGroupStart``/``ncclCommAbort``.../``ncclGroupEnd``: aborting
  communicators one by one can deadlock, pytorch#119797), so a blocked ``work.wait()`` raises.
  Verified in the installed torch 2.13 (torch/distributed/distributed_c10d.py, ``_abort_process_group``,
  documented "experimental, only works with the NCCL backend"). It came with torch 2.5 (pytorch#132291;
  the group semantic needs NCCL >= 2.22); on older torch the fallback is the group's own abort:
  ``ProcessGroup.abort()`` (public on every group since torch 2.7, pytorch#148798), else
  ``ProcessGroupNCCL._abort()`` (torch 2.1, pytorch#96017). It is compatible with
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` (torchrun sets it to 1): the watchdog may abort first, on its
  own timeout; whichever comes first ends the wait. (Not run here: the project's machines have no
  two GPUs; the CPU tests cover gloo.)
- gloo: ``abort()`` does nothing to a pending collective in torch 2.13 (measured), so the sockets of
  gloo's pairs are shut down instead (`gpuguard.peers._procfs`), which fails the blocked collective
  with gloo's "Connection closed by peer" at once. A peer that died on a live node closes its own
  sockets, so that case needs nothing; a peer whose node vanished, or that hangs, would otherwise hold
  the collective until gloo's timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger("gpuguard.peers")


def abandon_collectives(own_listeners: set[int], peer_listeners: Iterable[int], keep_ports: set[int]) -> str:
    """Make every pending and future collective of this process fail now. Returns what was done, in words."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return "no process group"
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend:
        return _abort_nccl()
    shut = _shut_down_gloo(own_listeners, set(peer_listeners), keep_ports)
    return f"{backend}: shut down {shut} peer connection(s)"


def _abort_nccl() -> str:
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    abort_all = getattr(c10d, "_abort_process_group", None)
    try:
        if abort_all is not None:  # torch >= 2.5
            abort_all()
            return "nccl: aborted every process group"
        group = c10d._get_default_group()
        if hasattr(group, "abort"):  # torch >= 2.7
            group.abort()
        else:  # torch 2.4: the NCCL backend's own
            group._get_backend(torch.device("cuda"))._abort()  # type: ignore[attr-defined]
        return "nccl: aborted the default process group"
    except (RuntimeError, ValueError, AttributeError) as exc:  # already aborted by the watchdog, or torn down
        log.warning("gpuguard: aborting the NCCL process groups failed: %s", exc)
        return (
            f"nccl: abort failed ({exc}); the watchdog's timeout ends the wait (is_initialized={dist.is_initialized()})"
        )


def _shut_down_gloo(own_listeners: set[int], peer_listeners: set[int], keep_ports: set[int]) -> int:
    from gpuguard.peers._procfs import listening_ports, shut_down_connections

    # Listeners of process groups created after the guard started count too.
    mine = own_listeners | set(listening_ports(keep_ports))
    return shut_down_connections(mine, peer_listeners, keep_ports)
