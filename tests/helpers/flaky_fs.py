"""An in-memory fsspec filesystem whose writes fail as scripted (protocol ``flaky://``)."""

from __future__ import annotations

from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory filesystem whose next writes fail as scripted: a fake, not a mock."""

    protocol = "flaky"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    failures: ClassVar[list[BaseException | None]] = []  # None: that write goes through
    writes: ClassVar[int] = 0

    def _fail(self) -> None:
        FlakyFileSystem.writes += 1
        failure = FlakyFileSystem.failures.pop(0) if FlakyFileSystem.failures else None
        if failure is not None:
            raise failure

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode:
            self._fail()
        return super()._open(path, mode, **kwargs)

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        self._fail()
        super().pipe_file(path, value, *args, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def reset() -> None:
    FlakyFileSystem.store.clear()
    FlakyFileSystem.pseudo_dirs[:] = [""]
    FlakyFileSystem.failures.clear()
    FlakyFileSystem.writes = 0
