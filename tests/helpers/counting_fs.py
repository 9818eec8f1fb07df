"""An in-memory fsspec filesystem that records every ranged read (protocol ``counted://``): what a load
asks of the storage, call by call, as an object store's request log would show it (one GET each)."""

from __future__ import annotations

from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class CountingFileSystem(MemoryFileSystem):
    """Memory storage; `reads` lists (file name, start, end) for every ``cat_file`` of a shard."""

    protocol = "counted"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    reads: ClassVar[list[tuple[str, int | None, int | None]]] = []

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        if path.endswith(".safetensors"):
            CountingFileSystem.reads.append((path.rsplit("/", 1)[-1], start, end))
        return bytes(super().cat_file(path, start=start, end=end, **kwargs))


fsspec.register_implementation("counted", CountingFileSystem, clobber=True)


def reset() -> None:
    CountingFileSystem.store.clear()
    CountingFileSystem.pseudo_dirs[:] = [""]
    CountingFileSystem.reads.clear()
