"""Finding committed checkpoints: list the folders, read and validate their manifests."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuguard.checkpoint._manifest import CHECKPOINT_DIR, MANIFEST, Manifest
from gpuguard.checkpoint._storage import Storage
from gpuguard.errors import CheckpointCorruptError, CheckpointNotFoundError

log = logging.getLogger("gpuguard.checkpoint")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as its manifest describes it."""

    id: str
    step: int
    world_size: int
    reason: str
    evidence: Mapping[str, Any]
    created_at: str
    total_bytes: int
    url: str
    extra: Mapping[str, Any] = field(default_factory=dict)  # the saver's ``extra`` (the guard's loss window)
    demoted: bool = False  # found bad after a restore: never resumed from again (see `CheckpointStore.demote`)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "step": self.step,
            "world_size": self.world_size,
            "reason": self.reason,
            "evidence": dict(self.evidence),
            "created_at": self.created_at,
            "bytes": self.total_bytes,
            "url": self.url,
            "extra": dict(self.extra),
            "demoted": self.demoted,
        }


class Catalog:
    """The committed checkpoints under one root: folders with a valid manifest."""

    def __init__(self, storage: Storage, url: str) -> None:
        self.storage = storage
        self.url = url
        self._warned: set[str] = set()  # folders whose bad manifest was said: once per process, not per listing

    def _ignoring(self, folder: str, exc: Exception) -> None:
        if folder not in self._warned:
            self._warned.add(folder)
            log.warning("ignoring %s: %s", folder, exc)

    def manifests(self, invalid: list[tuple[str, str]] | None = None) -> list[Manifest]:
        """Every valid manifest, oldest first (by step, then commit time).

        Args:
            invalid: receives (folder, why) for each folder whose manifest exists but is not valid.
        """
        found = []
        for folder in self.storage.list_dirs():
            if not CHECKPOINT_DIR.match(folder):
                continue
            try:
                manifest = self.manifest(folder)
            except CheckpointNotFoundError:
                continue  # no manifest: in flight, or a leftover
            except CheckpointCorruptError as exc:
                self._ignoring(folder, exc)
                if invalid is not None:
                    invalid.append((folder, str(exc)))
                continue
            if manifest is not None:
                found.append(manifest)
        found.sort(key=lambda m: (m.step, m.created_at))
        return found

    def manifest(self, name: str, *, missing_ok: bool = False) -> Manifest | None:
        """The manifest of ``name``; with ``missing_ok``, None when it is absent or invalid."""
        path = self.storage.path(name, MANIFEST)
        try:
            raw = self.storage.cat(path)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise CheckpointNotFoundError(f"no committed checkpoint {name!r} under {self.url}") from None
        try:
            manifest = Manifest.from_json(raw, where=path)
        except CheckpointCorruptError as exc:
            if missing_ok:
                self._ignoring(name, exc)
                return None
            raise
        if manifest.id != name:
            if missing_ok:
                return None
            raise CheckpointCorruptError(f"{path}: names checkpoint {manifest.id!r}", shard=MANIFEST)
        return manifest

    def info(self, manifest: Manifest, *, demoted: bool = False) -> CheckpointInfo:
        return CheckpointInfo(
            id=manifest.id,
            step=manifest.step,
            world_size=manifest.world_size,
            reason=manifest.reason,
            evidence=manifest.evidence,
            created_at=manifest.created_at,
            total_bytes=manifest.total_bytes,
            url=f"{self.url.rstrip('/')}/{manifest.id}",
            extra=manifest.extra,
            demoted=demoted,
        )
