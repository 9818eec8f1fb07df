"""An in-memory fsspec filesystem with a capacity (protocol ``quota://``): a full disk, without root.

It fails the way a full local disk does (write(2), man 2 write: ``ENOSPC`` "the device containing the
file has no room for the data"): the write that does not fit raises ``OSError(ENOSPC)``, and what was
written before it stays, a partial file taking space, until someone deletes it.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class QuotaFileSystem(MemoryFileSystem):
    protocol = "quota"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    capacity: ClassVar[int] = 2**40

    @classmethod
    def used(cls) -> int:
        return sum(len(f.getbuffer()) for f in cls.store.values())

    @classmethod
    def _room(cls, more: int) -> None:
        if cls.used() + more > cls.capacity:
            raise OSError(errno.ENOSPC, "No space left on device")

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        QuotaFileSystem._room(len(value))
        super().pipe_file(path, value, *args, **kwargs)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = super()._open(path, mode, **kwargs)
        if "w" in mode:
            write = f.write

            def bounded(data: Any) -> int:
                room = QuotaFileSystem.capacity - QuotaFileSystem.used() - f.tell()
                if len(data) > room:
                    write(bytes(memoryview(data)[: max(0, room)]))  # the part that fit stays
                    raise OSError(errno.ENOSPC, "No space left on device")
                return int(write(data))

            f.write = bounded
        return f


fsspec.register_implementation("quota", QuotaFileSystem, clobber=True)


def reset() -> None:
    QuotaFileSystem.store.clear()
    QuotaFileSystem.pseudo_dirs[:] = [""]
    QuotaFileSystem.capacity = 2**40
