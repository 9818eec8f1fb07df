"""An in-memory fsspec filesystem whose state-file writes wait at a gate (protocol ``gated://``).

It holds a save in flight for as long as a test needs, the way a slow upload or a stalled writer
does, so that what other stores (other processes, in production) do meanwhile can be checked.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class GatedFileSystem(MemoryFileSystem):
    """Memory storage; writing a rank's state file (after its shard) under `hold` blocks until `gate` is set
    (with `hold_manifest`, the manifest's write instead: the commit itself)."""

    protocol = "gated"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    gate: ClassVar[threading.Event] = threading.Event()
    waiting: ClassVar[threading.Event] = threading.Event()
    hold: ClassVar[str] = ""  # only paths containing this wait
    refuse_renewals: ClassVar[bool] = False  # a lease, once written, cannot be rewritten (a lost link)
    hold_manifest: ClassVar[bool] = False

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        if GatedFileSystem.refuse_renewals and "/.leases/" in path and self.exists(path):
            raise PermissionError(f"{path}: refused")
        name = path.rsplit("/", 1)[-1]
        if GatedFileSystem.hold_manifest:
            held = name == "MANIFEST.json"
        else:
            held = name.startswith("rank-") and name.endswith("-of-00001.json")
        if held and GatedFileSystem.hold in path:
            GatedFileSystem.waiting.set()
            GatedFileSystem.gate.wait(60)  # a guard against a test that forgets to open it
        super().pipe_file(path, value, *args, **kwargs)


fsspec.register_implementation("gated", GatedFileSystem, clobber=True)


def reset() -> None:
    GatedFileSystem.store.clear()
    GatedFileSystem.pseudo_dirs[:] = [""]
    GatedFileSystem.gate = threading.Event()
    GatedFileSystem.waiting = threading.Event()
    GatedFileSystem.hold = ""
    GatedFileSystem.refuse_renewals = False
    GatedFileSystem.hold_manifest = False
