"""Pruning: delete committed checkpoints beyond the newest ``keep``, and uncommitted leftovers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from gpuguard.checkpoint import _leases as leases
from gpuguard.checkpoint._catalog import Catalog
from gpuguard.checkpoint._demoted import demoted_ids
from gpuguard.checkpoint._manifest import CHECKPOINT_DIR, MANIFEST
from gpuguard.checkpoint._storage import Storage

log = logging.getLogger("gpuguard.checkpoint")


def prune(catalog: Catalog, keep: int, in_flight: Callable[[], set[str]], keep_bytes: int | None = None) -> list[str]:
    """Delete committed checkpoints beyond the newest ``keep`` (and, with ``keep_bytes``, beyond that many
    bytes, counted from the newest), and uncommitted leftovers.

    Never deletes the newest committed checkpoint that is not demoted, nor a folder any writer holds a live
    lease on (see `_leases`), nor one this process is still writing. A checkpoint's manifest is deleted
    first, so a pruned folder is never mistaken for valid. Incomplete multipart uploads of saves that
    no live lease covers (writers killed mid-upload) are aborted.

    Returns:
        The ids deleted.
    """
    storage = catalog.storage
    manifests = catalog.manifests()
    committed = {m.id for m in manifests}
    # Demoted checkpoints are no resume points: they never count among the ``keep`` (or a bad newest one
    # would push the good ones out), and they go once older than the oldest one kept. Their markers stay (a few
    # hundred bytes each): a node-local tier may still hold a copy of the same id.
    demoted = demoted_ids(storage)
    good = [m for m in manifests if m.id not in demoted]
    kept = min(keep, len(good))
    if keep_bytes is not None:
        total, fits = 0, 0
        for manifest in reversed(good[len(good) - kept :]):
            total += manifest.total_bytes
            if fits and total > keep_bytes:  # the newest one is kept whatever its size
                break
            fits += 1
        kept = fits
    doomed = [m.id for m in good[: len(good) - kept]]
    oldest_kept = good[len(good) - kept].step if kept else None
    doomed += [m.id for m in manifests if m.id in demoted and oldest_kept is not None and m.step < oldest_kept]
    for name in doomed:
        storage.delete(storage.path(name, MANIFEST))
        storage.delete(storage.path(name), recursive=True)
        log.info("pruned %s", name)
    folders = storage.list_dirs()
    uploads = storage.list_uploads()
    # Listed after the folders and uploads: a save whose folder or upload is listed has written its lease
    # by now. Leases that expired or whose writer is known dead are removed here.
    busy = in_flight() | leases.leased(storage)
    _abort_uploads(storage, uploads, busy)
    return doomed + _collect(catalog, [f for f in folders if f not in committed], busy)


def collect_dead(catalog: Catalog, in_flight: Callable[[], set[str]]) -> list[str]:
    """Collect the leftovers of saves whose leases expired or whose writers are known dead, at once.

    Cheaper than `prune` (it reads the leases, not every manifest), so a writer runs it before its
    first save: in a crash loop, each new writer collects what the last one left, and the leftovers
    never pile up. Returns the ids deleted.
    """
    storage = catalog.storage
    uploads = storage.list_uploads()  # before the leases, as in `prune`
    live, gone = leases.sweep(storage)
    busy = in_flight() | live
    _abort_uploads(storage, uploads, busy)
    return _collect(catalog, sorted(gone - busy), busy)


def _abort_uploads(storage: Storage, uploads: list[tuple[str, str]], busy: set[str]) -> None:
    for path, upload_id in uploads:
        folder = path.split("/", 1)[0]
        if CHECKPOINT_DIR.match(folder) and folder not in busy:
            # A writer killed mid-upload: S3 keeps (and bills) the parts until the upload is aborted.
            storage.abort_upload(path, upload_id)
            log.info("aborted the incomplete upload of %s", path)


def _collect(catalog: Catalog, folders: list[str], busy: set[str]) -> list[str]:
    storage = catalog.storage
    collected = []
    for folder in folders:
        if not CHECKPOINT_DIR.match(folder) or folder in busy:
            continue  # not a checkpoint, or a save in flight in this process or another
        # Read after the leases: a save that committed since the listing has its manifest by now.
        if catalog.manifest(folder, missing_ok=True) is not None:
            continue
        storage.delete(storage.path(folder), recursive=True)
        log.info("collected %s, an uncommitted leftover", folder)
        collected.append(folder)
    return collected
