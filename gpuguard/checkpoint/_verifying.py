"""Verifying: re-read every file of a checkpoint and report every checksum that fails."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpuguard.checkpoint._catalog import Catalog
from gpuguard.checkpoint._loading import Loader
from gpuguard.errors import CheckpointCorruptError, CheckpointNotFoundError

Progress = Callable[[int, int], None]


@dataclass
class VerifyReport:
    """What `CheckpointStore.verify` found: ``ok`` is False when any problem is listed."""

    id: str
    bytes_read: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "ok": self.ok, "bytes_read": self.bytes_read, "problems": self.problems}


def verify(
    catalog: Catalog, loader: Loader, checkpoint_id: str | None = None, *, progress: Progress | None = None
) -> VerifyReport:
    """Re-read every shard of a checkpoint and check every checksum.

    Args:
        checkpoint_id: the newest committed one when None.
        progress: called with (bytes read, bytes in all) after each file.

    Raises:
        CheckpointNotFoundError: nothing committed, or not that id.
        CheckpointCorruptError: the manifest itself is invalid.
    """
    if checkpoint_id is None:
        manifests = catalog.manifests()
        if not manifests:
            raise CheckpointNotFoundError(f"no committed checkpoint under {catalog.url}")
        checkpoint_id = manifests[-1].id
    manifest = catalog.manifest(checkpoint_id)
    assert manifest is not None
    report = VerifyReport(manifest.id)
    total = manifest.total_bytes
    for record in manifest.shards:
        found: list[CheckpointCorruptError] = []
        try:
            loader.read_shard(manifest.id, record, found)
        except CheckpointCorruptError as exc:  # the file as a whole: missing, truncated, bad header
            found.append(exc)
        report.bytes_read += record.bytes
        if progress:
            progress(report.bytes_read, total)
        try:
            loader.read_state(manifest.id, record)
        except CheckpointCorruptError as exc:
            found.append(exc)
        report.bytes_read += record.state_bytes
        if progress:
            progress(report.bytes_read, total)
        report.problems += [{"shard": e.shard, "tensor": e.tensor, "error": str(e)} for e in found]
    return report
