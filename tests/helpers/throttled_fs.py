"""An in-memory fsspec filesystem behind a slow link (protocol ``throttled://``): shard bytes go through
at `ThrottledFileSystem.bytes_per_s`, as over a congested network, while small files (leases, manifests,
state files) pass at once. What other writers do meanwhile can be checked against a save that lasts."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem


class _SlowFile(MemoryFile):  # type: ignore[misc]
    def write(self, data: Any) -> int:
        time.sleep(len(data) / ThrottledFileSystem.bytes_per_s)
        return int(super().write(data))


class ThrottledFileSystem(MemoryFileSystem):
    """Memory storage; writes of ``*.safetensors`` files move at ``bytes_per_s``."""

    protocol = "throttled"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    bytes_per_s: ClassVar[float] = 1e12

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if mode == "wb" and path.endswith(".safetensors"):
            path = self._strip_protocol(path)
            slow = _SlowFile(self, path)
            slow.commit()
            return slow
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("throttled", ThrottledFileSystem, clobber=True)


def reset(bytes_per_s: float) -> None:
    ThrottledFileSystem.store.clear()
    ThrottledFileSystem.pseudo_dirs[:] = [""]
    ThrottledFileSystem.bytes_per_s = bytes_per_s
