"""Pruning: delete committed checkpoints beyond the newest ``keep``, and uncommitted leftovers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from gpuguard.checkpoint import _leases as leases
from gpuguard.checkpoint._catalog import Catalog
from gpuguard.checkpoint._manifest import CHECKPOINT_DIR, MANIFEST

log = logging.getLogger("gpuguard.checkpoint")


def prune(catalog: Catalog, keep: int, in_flight: Callable[[], set[str]]) -> list[str]:
    """Delete committed checkpoints beyond the newest ``keep``, and uncommitted leftovers.

    Never deletes the newest committed checkpoint, nor a folder any writer holds a live lease on
    (see `_leases`), nor one this process is still writing. A checkpoint's manifest is deleted
    first, so a pruned folder is never mistaken for valid. Incomplete multipart uploads of saves that
    no live lease covers (writers killed mid-upload) are aborted.

    Returns:
        The ids deleted.
    """
    storage = catalog.storage
    manifests = catalog.manifests()
    committed = {m.id for m in manifests}
    doomed = [m.id for m in manifests[: max(0, len(manifests) - keep)]]
    for name in doomed:
        storage.delete(storage.path(name, MANIFEST))
        storage.delete(storage.path(name), recursive=True)
        log.info("pruned %s", name)
    folders = storage.list_dirs()
    uploads = storage.list_uploads()
    # Listed after the folders and uploads: a save whose folder or upload is listed has written its lease
    # by now. Leases that expired or whose writer is known dead are removed here.
    busy = in_flight() | leases.leased(storage)
    for path, upload_id in uploads:
        folder = path.split("/", 1)[0]
        if CHECKPOINT_DIR.match(folder) and folder not in busy:
            # A writer killed mid-upload: S3 keeps (and bills) the parts until the upload is aborted.
            storage.abort_upload(path, upload_id)
            log.info("aborted the incomplete upload of %s", path)
    for folder in folders:
        if not CHECKPOINT_DIR.match(folder) or folder in committed or folder in busy:
            continue  # committed, or a save in flight in this process or another
        # Read after the leases: a save that committed since the listing has its manifest by now.
        if catalog.manifest(folder, missing_ok=True) is not None:
            continue
        storage.delete(storage.path(folder), recursive=True)
        log.info("collected %s, an uncommitted leftover", folder)
        doomed.append(folder)
    return doomed
