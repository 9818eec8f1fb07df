"""Verifying: re-read every file of a checkpoint and report every checksum that fails."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpuguard.checkpoint._catalog import Catalog
from gpuguard.checkpoint._loading import Loader
from gpuguard.checkpoint._manifest import CHECKPOINT_DIR, MANIFEST
from gpuguard.checkpoint._sharding import tiling_problems
from gpuguard.errors import CheckpointCorruptError, CheckpointNotFoundError

Progress = Callable[[int, int], None]


@dataclass
class VerifyReport:
    """What `CheckpointStore.verify` found: ``ok`` is False when any problem is listed."""

    id: str
    bytes_read: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # newer checkpoints whose manifest is invalid

    @property
    def ok(self) -> bool:
        return not self.problems and not self.skipped

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ok": self.ok,
            "bytes_read": self.bytes_read,
            "problems": self.problems,
            "skipped": self.skipped,
        }


def verify(
    catalog: Catalog, loader: Loader, checkpoint_id: str | None = None, *, progress: Progress | None = None
) -> VerifyReport:
    """Re-read every shard of a checkpoint and check every checksum.

    Args:
        checkpoint_id: the newest committed one when None.
        progress: called with (bytes read, bytes in all) after each file.

    An invalid manifest is reported as a problem of its checkpoint; with no id, newer checkpoints
    whose manifest is invalid are listed in ``skipped`` (and make the report not ok).

    Raises:
        CheckpointNotFoundError: nothing committed, or not that id.
    """
    skipped: list[dict[str, Any]] = []
    if checkpoint_id is None:
        invalid: list[tuple[str, str]] = []
        manifests = catalog.manifests(invalid)
        newest = manifests[-1].step if manifests else -1
        # A newer folder with an invalid manifest is what a resume would have wanted: say so.
        skipped = [
            {"id": name, "shard": MANIFEST, "error": why}
            for name, why in invalid
            if int(CHECKPOINT_DIR.match(name).group(1)) >= newest  # type: ignore[union-attr]
        ]
        if not manifests:
            if skipped:
                report = VerifyReport(skipped[-1]["id"])
                report.problems = [{"shard": MANIFEST, "tensor": None, "error": s["error"]} for s in skipped[-1:]]
                report.skipped = skipped[:-1]
                return report
            raise CheckpointNotFoundError(f"no committed checkpoint under {catalog.url}")
        checkpoint_id = manifests[-1].id
    try:
        manifest = catalog.manifest(checkpoint_id)
    except CheckpointCorruptError as exc:  # the manifest itself: a report, like any other corruption
        report = VerifyReport(checkpoint_id)
        report.problems.append({"shard": MANIFEST, "tensor": None, "error": str(exc)})
        return report
    assert manifest is not None
    report = VerifyReport(manifest.id, skipped=skipped)
    # Checksums say the bytes are the ones written; this says they can be loaded: every sharded tensor's
    # chunks tile its global shape exactly (no chunk twice, no element missing).
    for problem in tiling_problems(manifest.shards):
        report.problems.append({"shard": problem.shard or MANIFEST, "tensor": problem.tensor, "error": str(problem)})
    total = manifest.total_bytes
    for record in manifest.shards:
        found: list[CheckpointCorruptError] = []
        loader.check_shard(manifest.id, record, found)
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
