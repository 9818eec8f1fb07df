"""Pruning: delete committed checkpoints beyond the newest ``keep``, and uncommitted leftovers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from gpuguard.checkpoint._catalog import Catalog
from gpuguard.checkpoint._manifest import CHECKPOINT_DIR, MANIFEST

log = logging.getLogger("gpuguard.checkpoint")


def prune(catalog: Catalog, keep: int, in_flight: Callable[[], set[str]]) -> list[str]:
    """Delete committed checkpoints beyond the newest ``keep``, and uncommitted leftovers.

    Never deletes the newest committed checkpoint, nor a folder still being written.
    A checkpoint's manifest is deleted first, so a pruned folder is never mistaken for valid.

    Returns:
        The ids deleted.
    """
    storage = catalog.storage
    manifests = catalog.manifests()
    committed = {m.id for m in manifests}
    newest_step = manifests[-1].step if manifests else -1
    doomed = [m.id for m in manifests[: max(0, len(manifests) - keep)]]
    busy = in_flight()
    for folder in storage.list_dirs():
        match = CHECKPOINT_DIR.match(folder)
        if match and folder not in committed and folder not in busy and int(match.group(1)) <= newest_step:
            doomed.append(folder)  # an interrupted save, older than what is committed
    for name in doomed:
        storage.delete(storage.path(name, MANIFEST))
        storage.delete(storage.path(name), recursive=True)
        log.info("pruned %s", name)
    return doomed
