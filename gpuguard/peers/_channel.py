"""The side channel: keys on a store that every rank reaches without a collective.

Under torchrun (and so ``gpuguard-run``) the launcher's agent hosts a TCPStore, and each worker's
default process group is a client of it when ``TORCHELASTIC_USE_AGENT_STORE=True``
(torch/distributed/elastic/agent/server/local_elastic_agent.py sets it with ``MASTER_ADDR`` and
``MASTER_PORT``; torch/distributed/rendezvous.py ``_create_c10d_store`` then connects as a client).
That store lives in the agent process, so it outlives the death of any worker: the survivors of a
sudden loss can still talk. Without torchrun the store of ``MASTER_ADDR:MASTER_PORT`` is usually
hosted by rank 0's own process (``env://``), and it dies with rank 0; `SideChannel.kind` says which.

Every operation is bounded by the client's timeout (a get of a missing key would otherwise wait for
it), and every store error becomes `SideChannelError`, here and nowhere else.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Final

from gpuguard.errors import SideChannelError

PREFIX: Final = "gpuguard/peers"


class SideChannel:
    """Byte values under one prefix of a c10d store.

    Args:
        store: a ``torch.distributed`` store (TCPStore, HashStore, PrefixStore ...).
        prefix: the namespace, one per launch (the guard's run token), so a restart never reads the
            keys of the attempt before it.
        kind: ``agent`` (the launcher's store: outlives every worker) or ``rank0`` (dies with rank 0).

    Example:
        >>> import torch.distributed as dist
        >>> channel = SideChannel(dist.HashStore(), "run-1", kind="agent")
        >>> channel.set("k", b"v"); channel.get("k"), channel.get("missing")
        (b'v', None)
    """

    def __init__(self, store: Any, prefix: str, *, kind: str) -> None:
        from torch.distributed import PrefixStore  # type: ignore[attr-defined]

        self._store = PrefixStore(f"{PREFIX}/{prefix}/", store)
        self.kind = kind

    @property
    def outlives_every_rank(self) -> bool:
        """True when no worker's death takes the channel with it."""
        return self.kind == "agent"

    def set(self, key: str, value: bytes) -> None:
        self._call(f"set {key}", self._store.set, key, value)

    def get(self, key: str) -> bytes | None:
        """The value, or None when the key was never set (without waiting for it)."""
        if not self._call(f"check {key}", self._store.check, [key]):
            return None
        return bytes(self._call(f"get {key}", self._store.get, key))

    def first(self, key: str, value: bytes) -> bytes:
        """Set ``key`` unless it is set; returns the value that holds (the first writer's)."""
        return bytes(self._call(f"compare_set {key}", self._store.compare_set, key, "", value))

    def add(self, key: str, amount: int) -> int:
        return int(self._call(f"add {key}", self._store.add, key, amount))

    def _call(self, operation: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (RuntimeError, OSError, ValueError) as exc:  # DistStoreError, DistNetworkError are RuntimeErrors
            raise SideChannelError(
                f"side channel ({self.kind} store): {operation} failed: {exc}", operation=operation
            ) from exc


def connect(prefix: str, timeout_s: float) -> SideChannel | None:
    """The launcher's store (``agent``), else the store at ``MASTER_ADDR:MASTER_PORT`` (``rank0``).

    Returns None when there is neither (a process group initialised some other way): sudden-loss
    protection is then off, and the guard says so once.

    Raises:
        SideChannelError: the store named by the environment did not answer within ``timeout_s``.
    """
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    kind = "agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True) else "rank0"
    try:
        store = TCPStore(host, int(port), is_master=False, timeout=_dt.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError, ValueError) as exc:
        raise SideChannelError(
            f"side channel: cannot reach the store at {host}:{port}: {exc}", operation="connect"
        ) from exc
    return SideChannel(store, prefix, kind=kind)
