"""Restoring from two tiers: each rank's node-local copy and the job's object storage, agreed by every rank.

A checkpoint id names the same save in both tiers: the local tier holds, per rank, that rank's complete
part of it as a one-process checkpoint (same manifest, same CRC-32C checksums); object storage holds the
job-wide one. A restore is `agree_newest` over ids:

- a rank's candidates are the ids it holds committed in its local tier, plus the ids committed in
  object storage; the candidates of the job are those every rank lists, newest first;
- a rank checks a candidate by reading and verifying its local copy (nothing applied), and when that
  copy is missing, fails its checksums or does not fit the live state (a DTensor piece of another layout),
  the object-storage copy of the same id; each tier that fails
  is named in a log line (rank, tier, id, why);
- a candidate no tier of some rank verifies makes every rank fall back together to an older one.

Only manifests are trusted, never a pointer: a "latest" file could name a save whose content never landed.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from gpuguard.checkpoint._collective import RankGroup, default_group
from gpuguard.checkpoint._consensus import agree_newest
from gpuguard.checkpoint._demoted import demoted_ids
from gpuguard.checkpoint._loading import PreparedLoad
from gpuguard.checkpoint._local_copy import prepare_copy_load
from gpuguard.checkpoint._manifest import Manifest
from gpuguard.checkpoint.store import CheckpointStore
from gpuguard.errors import CheckpointCorruptError, CheckpointMismatchError, GpuGuardError

log = logging.getLogger("gpuguard.checkpoint")

LOCAL = "local"
OBJECT = "object storage"


@dataclass(frozen=True)
class TierCandidate:
    """One checkpoint id as this rank can read it: its local copy, its object-storage copy, or both."""

    id: str
    step: int
    local: Manifest | None
    remote: Manifest | None


@dataclass(frozen=True)
class Restored:
    """What a tiered restore put into the state: the same id and step on every rank; the tier is this rank's."""

    id: str
    step: int
    tier: str
    extra: Mapping[str, Any] = field(default_factory=dict)  # the restored copy's manifest's (the loss window)


def load_tiered(
    local: CheckpointStore | None,
    remote: CheckpointStore,
    state: MutableMapping[str, Any],
    *,
    rank: int,
    world_size: int,
    exclude: Collection[str] = (),
    group: RankGroup | None = None,
) -> Restored:
    """Load the newest checkpoint every rank verified in some tier into ``state`` (every rank calls it).

    Args:
        local: this rank's local tier (a one-process store holding this rank's parts), or None.
        remote: the job's object storage.
        exclude: ids never to load (demoted after a restore); demoted ones (markers in ``remote``) are never
            loaded from either tier.

    Raises:
        CheckpointNotFoundError: no rank lists any checkpoint in any tier.
        CheckpointCorruptError: none verified on every rank.
        CheckpointError, StorageError: as `CheckpointStore.load`.
    """
    group = default_group(world_size) if group is None else group
    exclude = set(exclude) | demoted_ids(remote.storage)  # the markers live in object storage, for both tiers
    where = {LOCAL: local.url if local is not None else None, OBJECT: remote.url}

    def listing() -> list[TierCandidate]:
        mine: dict[str, Manifest] = {}
        if local is not None:
            try:
                mine = {m.id: m for m in local._catalog.manifests() if m.id not in exclude}
            except GpuGuardError as exc:  # a local tier that cannot be listed is one this rank does not have
                log.warning("rank %d: local tier %s cannot be listed (%s): using object storage", rank, local.url, exc)
        theirs = {m.id: m for m in remote._catalog.manifests() if m.id not in exclude}
        found = [
            TierCandidate(cid, (mine.get(cid) or theirs[cid]).step, mine.get(cid), theirs.get(cid))
            for cid in set(mine) | set(theirs)
        ]
        return sorted(found, key=lambda c: (c.step, c.id), reverse=True)

    prepared: list[PreparedLoad] = []

    def check(candidate: TierCandidate) -> tuple[PreparedLoad, str]:
        failures: list[str] = []
        if candidate.local is not None and local is not None:
            try:
                part = prepare_copy_load(local._loader, candidate.local, state)
            except (CheckpointCorruptError, CheckpointMismatchError) as exc:  # this copy only: not the checkpoint
                failures.append(f"{LOCAL} ({exc})")
                log.warning(
                    "rank %d: the %s tier's copy of %s fails verification, skipped: %s%s",
                    rank,
                    LOCAL,
                    candidate.id,
                    exc,
                    "; trying object storage" if candidate.remote is not None else "",
                )
            else:
                prepared.append(part)
                return part, LOCAL
        if candidate.remote is None:
            raise CheckpointCorruptError(
                f"{candidate.id}: no verified copy on rank {rank}: "
                + "; ".join(failures)
                + "; not committed in object storage"
            )
        try:
            part = remote._loader.prepare_one(candidate.remote, state, rank, True, world_size)
        except CheckpointCorruptError as exc:
            log.warning(
                "rank %d: the %s tier's copy of %s fails verification, skipped: %s", rank, OBJECT, candidate.id, exc
            )
            failures.append(f"{OBJECT} ({exc})")
            raise CheckpointCorruptError(
                f"{candidate.id}: no verified copy on rank {rank}: {'; '.join(failures)}",
                shard=exc.shard,
                tensor=exc.tensor,
            ) from None
        prepared.append(part)
        return part, OBJECT

    try:
        agreed = agree_newest(
            group,
            listing,
            check,
            fallback=True,
            nothing="no committed checkpoint in " + " or ".join(f"{k} ({v})" for k, v in where.items() if v),
        )
    except BaseException:
        for part in prepared:
            part.discard()
        raise
    value, tier = agreed.value
    for part in prepared:
        if part is not value:
            part.discard()
    value.apply(state)
    log.warning(
        "rank %d restored %s (step %d) from the %s tier (%s)",
        rank,
        agreed.candidate.id,
        agreed.candidate.step,
        tier,
        where[tier],
    )
    manifest = agreed.candidate.local if tier == LOCAL else agreed.candidate.remote
    return Restored(agreed.candidate.id, agreed.candidate.step, tier, manifest.extra if manifest else {})
