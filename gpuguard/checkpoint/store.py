"""`CheckpointStore`: save a training state fast, commit it atomically, find it, load it back.

The store is a facade over one module per concern: `_saving` (snapshot and background write),
`_committing` (the manifest), `_catalog` (finding), `_loading`, `_verifying` and `_pruning`.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

from gpuguard.checkpoint._catalog import Catalog, CheckpointInfo
from gpuguard.checkpoint._collective import TorchGroup, solo
from gpuguard.checkpoint._committing import Committer
from gpuguard.checkpoint._demoted import demote, demoted_ids, read_demoted
from gpuguard.checkpoint._export import export
from gpuguard.checkpoint._loading import Loader
from gpuguard.checkpoint._manifest import CHECKPOINT_DIR
from gpuguard.checkpoint._pending import PendingSave, SaveTimings
from gpuguard.checkpoint._probe import measure_write_rate
from gpuguard.checkpoint._pruning import prune
from gpuguard.checkpoint._retry import RetryPolicy
from gpuguard.checkpoint._saving import REASONS, Reason, Saver, default_attempt
from gpuguard.checkpoint._staging import LentSnapshot
from gpuguard.checkpoint._storage import Storage
from gpuguard.checkpoint._tree import FlatState
from gpuguard.checkpoint._verifying import Progress, VerifyReport, verify
from gpuguard.errors import CheckpointCorruptError, CheckpointNotFoundError, ConfigError

__all__ = ["REASONS", "CheckpointInfo", "CheckpointStore", "PendingSave", "Reason", "SaveTimings", "VerifyReport"]


class CheckpointStore:
    """Checkpoints under one fsspec URL: one folder per checkpoint, the manifest written last commits it.

    Args:
        url: where checkpoints live, e.g. ``s3://bucket/run1``, ``file:///mnt/ckpt``, ``memory://run``.
        storage_options: for the fsspec filesystem (endpoint, credentials, ...).
        keep: committed checkpoints to keep when pruning; the newest valid one is never deleted.
        keep_bytes: also keep no more than this many bytes of committed checkpoints (counted from the
            newest; None: no bound); the newest valid one is kept whatever its size.
        io_threads: concurrent writers per shard (threads for local disks, parts for S3).
        staging_buffers: snapshots that may be in flight at once.
        retry: backoff for transient storage errors, and the deadline of every storage operation.
        lease_s: how long a save's lease keeps pruners (in any process) off its folder without a
            renewal. A save renews its lease every ``lease_s / 8`` for as long as it runs, so this
            bounds nothing about the save itself: it is how soon a crashed writer's leftovers can be
            collected by a pruner that cannot tell it died (one on another machine or in another
            container; on the same machine and PID namespace they are collected at once).

    Example:
        >>> store = CheckpointStore("memory://example", keep=2)
        >>> model = torch.nn.Linear(2, 2)
        >>> store.save({"model": model}, step=10).wait().step
        10
        >>> store.load({"model": model})
        10
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        keep: int = 3,
        keep_bytes: int | None = None,
        io_threads: int = 8,
        staging_buffers: int = 2,
        retry: RetryPolicy | None = None,
        lease_s: float = 120.0,
    ) -> None:
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ConfigError("keep", keep, "must be a whole number, 1 or greater")
        if keep_bytes is not None and (
            not isinstance(keep_bytes, int) or isinstance(keep_bytes, bool) or keep_bytes < 1
        ):
            raise ConfigError("keep_bytes", keep_bytes, "must be a whole number of bytes, 1 or greater, or None")
        if not isinstance(io_threads, int) or io_threads < 1:
            raise ConfigError("io_threads", io_threads, "must be a whole number, 1 or greater")
        if not isinstance(staging_buffers, int) or isinstance(staging_buffers, bool) or staging_buffers < 1:
            raise ConfigError("staging_buffers", staging_buffers, "must be a whole number, 1 or greater")
        if not isinstance(lease_s, (int, float)) or isinstance(lease_s, bool) or not 0 < lease_s < float("inf"):
            raise ConfigError("lease_s", lease_s, "must be a finite number of seconds greater than 0")
        self.url = url
        self.keep = keep
        self.keep_bytes = keep_bytes
        self.storage = Storage(url, storage_options, retry=retry, io_threads=io_threads)
        self._catalog = Catalog(self.storage, url)
        self._committer = Committer(self.storage, self._catalog)
        self._saver = Saver(self.storage, self._committer, staging_buffers, float(lease_s))
        self._loader = Loader(self.storage, self._catalog, self._saver.staging)

    @property
    def last_step_wait_s(self) -> float:
        """How long the last optimizer step waited for a deferred copy (see ``overlap_with``)."""
        return self._saver.last_step_wait_s

    @last_step_wait_s.setter
    def last_step_wait_s(self, value: float) -> None:
        self._saver.last_step_wait_s = value

    @property
    def overlap_refused(self) -> str | None:
        """Why ``overlap_with`` is ignored from now on (a tensor it defers changed outside
        ``optimizer.step()``), or None while overlapping is allowed."""
        return self._saver.overlap.refused

    @property
    def last_load_bytes_read(self) -> int:
        """Tensor bytes the last sharded load read (a reshard reads about this rank's share)."""
        return self._loader.last_bytes_read

    @property
    def last_loaded(self) -> CheckpointInfo | None:
        """The checkpoint the last `load` put into the state (the same one on every rank), or None before one."""
        manifest = self._loader.last_loaded
        return None if manifest is None else self._catalog.info(manifest)

    # -- saving ---------------------------------------------------------------------------------

    def prepare(
        self,
        state: Mapping[str, Any],
        *,
        rng: bool = True,
        background: bool = False,
        replicated: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> float:
        """Allocate the staging buffer for this state now, so that a save later does not.

        Run it when training starts, at a step boundary, on the training thread: it walks the state
        (``state_dict()`` runs its hooks, which FSDP2 must not have run while forward or backward
        computes). With DTensors in a process group, every rank calls it: the ranks agree (a small
        collective) on who writes which chunk, which the buffer's layout depends on.

        Args:
            background: return once the layout is planned and allocate the buffer (pinning may take
                seconds) on a thread; the training thread then pays only for the walk.
            replicated: the saves will pass ``replicated=True``: the buffer holds this rank's part
                only, as theirs do.
            rank: as the saves will pass it (default: torch.distributed's).
            world_size: as the saves will pass it (default: torch.distributed's).

        Returns:
            The seconds the calling thread spent.
        """
        return self._saver.prepare(
            state, rng=rng, background=background, replicated=replicated, rank=rank, world_size=world_size
        )

    @property
    def prepared_bytes(self) -> int:
        """Tensor bytes of this rank's shard, as the last `prepare` laid it out (0 before one)."""
        return self._saver.prepared_bytes

    def measure_write_rate(self, nbytes: int) -> float:
        """Bytes per second this store takes ``nbytes`` durably, written as a shard is (a probe file
        under the store's URL, removed afterwards). For estimating a save's time before one is needed."""
        return measure_write_rate(self.storage, nbytes)

    def save(
        self,
        state: Mapping[str, Any],
        step: int,
        *,
        reason: Reason = "manual",
        evidence: Mapping[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        checkpoint_id: str | None = None,
        rng: bool = True,
        extra: Mapping[str, Any] | None = None,
        replicated: bool = False,
        commit_timeout_s: float = 600.0,
        overlap_with: Sequence[torch.optim.Optimizer] = (),
        attempt: str | None = None,
    ) -> PendingSave:
        """Snapshot ``state`` and write it in the background.

        Returns once the snapshot is in the staging buffer: after that, training may step and the
        save is unaffected. With ``world_size`` > 1 every rank calls this with the same
        ``checkpoint_id``, and rank 0 commits once every rank's files are durable (waiting up to
        ``commit_timeout_s`` for them).

        With ``overlap_with``, the tensors those optimizers own (parameters and optimizer state, which
        change only in ``optimizer.step()``) are copied while training runs its next forward and
        backward; each of those optimizers' next ``step()`` waits for the copy. Everything else (buffers,
        RNG states, schedulers) is copied before ``save`` returns. The stall becomes the copy of the
        rest plus max(0, copy time - forward/backward time). That is safe only while those tensors change
        in ``optimizer.step()`` alone, which is checked: their version counters are compared after the
        copy (a change: that save fails, nothing is committed) and at the next optimizer step; at the
        first change overlapping stops for good (`overlap_refused` says why). Writes through ``.data``
        or from outside PyTorch bypass version counters: do not overlap such a state.

        With ``replicated``, every rank holds the same state (plain data parallelism): the tensors
        are split between the ranks by size, each rank snapshots and writes only its part, and a
        load reads every part, so time to durable falls with the number of ranks and a job may
        resume with a different number of them.

        DTensor values (FSDP2's ``fully_shard``, tensor parallelism, any DTensor in ``state``) are
        saved as chunks: each rank writes its local shard once (one replica of each chunk writes it),
        and the manifest holds each chunk's global shape, offsets and per-block checksums, so a load
        on any world size and mesh reads only the pieces that overlap its own shards.

        Who writes a DTensor chunk is decided over the whole job: each distinct chunk is written once,
        by one of the ranks that hold it (replicas on a submesh, HSDP replicas and data-parallel copies
        of tensor-parallel shards share the writing), and the commit refuses chunks that do not tile a
        tensor exactly.

        In a process group of ``world_size`` ranks, ``save`` is a collective (one small gather; a
        second one when the state's sharding is new): every rank calls it at the same point.

        ``attempt`` binds a multi-rank save to one attempt: rank 0 commits only records written under
        the same token, never a crashed attempt's leftovers under a reused ``checkpoint_id``. By
        default, in a process group, rank 0 draws a fresh token for every save and the gather hands it
        to every rank; without one, it comes from torchrun's ``TORCHELASTIC_RUN_ID`` and
        ``TORCHELASTIC_RESTART_COUNT``, which a relaunch outside torchrun repeats: pass ``attempt``.

        A committed checkpoint is immutable: a save under an id that is already committed writes
        nothing and its ``wait()`` raises `CheckpointExistsError`.

        Raises:
            UnsupportedStateError: the state holds something that cannot be stored without pickling.
            ConfigError: a bad step, reason, rank or checkpoint id.

        The returned save's ``wait()`` returns once the checkpoint is committed, on every rank: rank 0
        writes the manifest; the other ranks read it back (see `PendingSave.wait`). It raises
        `StorageError` when the storage fails (each operation ends within the retry policy's deadline);
        what the save wrote is removed at once (best effort) and the previous checkpoint is intact.
        """
        return self._saver.save(
            state,
            step,
            reason=reason,
            evidence=evidence,
            rank=rank,
            world_size=world_size,
            checkpoint_id=checkpoint_id,
            rng=rng,
            extra=extra,
            replicated=replicated,
            commit_timeout_s=commit_timeout_s,
            overlap_with=overlap_with,
            attempt=attempt,
        )

    def _save_flat(self, flat: FlatState, step: int, **options: Any) -> PendingSave:
        """`save` of a state already taken apart, possibly as another rank, with no collective: for the
        survivors of a sudden loss (`gpuguard.peers`), who write a dead rank's files from their replica of
        its state under an ``attempt`` they agreed on over the side channel (see `Saver.save_flat`)."""
        return self._saver.save_flat(flat, step, survivors=True, **options)

    def _save_from(self, flat: FlatState, step: int, source: LentSnapshot | None, **options: Any) -> PendingSave:
        """`save` of a state already taken apart (``flat``, changed by it), its snapshot copied from ``source``
        off the training thread when given: another store's snapshot of the same state, holding every tensor
        this save writes (the guard's local tier; see `Saver.save_flat`)."""
        return self._saver.save_flat(flat, step, source=source, **options)

    def abandon_in_flight(self) -> builtins.list[str]:
        """Saves in flight now will never commit (a rank they wait for is gone): their commit waits end at
        once, nothing of theirs is committed, and their files are collected by a later prune. Returns their ids."""
        return self._saver.abandon()

    def commit(
        self,
        checkpoint_id: str,
        *,
        step: int,
        world_size: int,
        reason: str = "manual",
        evidence: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        layout: str = "per_rank",
        timeout_s: float = 600.0,
        attempt: str | None = None,
    ) -> CheckpointInfo:
        """Write the manifest once every rank's files are durable (multi-rank saves call this on rank 0).

        Raises:
            TimeoutError: some rank's record of this ``attempt`` did not appear within ``timeout_s``.
            StorageError: a rank's files are gone; nothing is committed.
        """
        return self._committer.gather(
            checkpoint_id,
            step=step,
            world_size=world_size,
            reason=reason,
            evidence=evidence,
            extra=extra,
            layout=layout,
            timeout_s=timeout_s,
            attempt=default_attempt() if attempt is None else attempt,
        )

    # -- finding --------------------------------------------------------------------------------

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints with a valid manifest, oldest first. Folders without one are skipped.

        Demoted ones are listed too, with ``demoted=True`` (see `demote`).
        """
        demoted = demoted_ids(self.storage)
        return [self._catalog.info(m, demoted=m.id in demoted) for m in self._catalog.manifests()]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint that is not demoted, or None when the location exists and holds none.

        Raises:
            StorageError: the storage failed or did not answer within the deadline, the bucket is
                missing, or listing is not allowed: never read as "no checkpoint".
        """
        demoted = demoted_ids(self.storage)
        manifests = [m for m in self._catalog.manifests() if m.id not in demoted]
        return self._catalog.info(manifests[-1]) if manifests else None

    # -- demoting -------------------------------------------------------------------------------

    def demote(self, checkpoint_id: str, reason: str, **details: Any) -> None:
        """Mark a committed checkpoint as bad for good: `latest`, `load` without an id and `Guard.resume`
        pass over it from now on, in this process and every later one.

        For a checkpoint whose bytes verify but whose content is not worth training from (found after a
        restore: NaN parameters, a loss far outside the window it recorded). Writes the small file
        ``demoted/<id>.json`` under the store's URL (docs/FORMAT.md) with ``reason`` and ``details``
        (JSON-able), through the storage's deadline and retries. Deleting that file undoes it. Pruning
        does not count demoted checkpoints among the ``keep`` newest.

        Raises:
            ConfigError: ``checkpoint_id`` is not a checkpoint's id.
            StorageError: the marker could not be written.
        """
        if not isinstance(checkpoint_id, str) or not CHECKPOINT_DIR.match(checkpoint_id):
            raise ConfigError(
                "checkpoint_id", checkpoint_id, "must be a checkpoint's id, e.g. step-000000000100-1a2b3c4d"
            )
        demote(self.storage, checkpoint_id, reason, details)

    def demoted(self) -> dict[str, dict[str, Any]]:
        """The demoted checkpoints' ids with their markers' contents (reason, step, ranks, numbers)."""
        return read_demoted(self.storage)

    # -- loading and verifying -------------------------------------------------------------------

    def load(
        self,
        state: MutableMapping[str, Any],
        checkpoint_id: str | None = None,
        *,
        rank: int = 0,
        fallback: bool = False,
        strict: bool = True,
        world_size: int | None = None,
        process_group: Any = None,
        no_dist: bool = False,
        exclude: Sequence[str] = (),
    ) -> int:
        """Load a checkpoint into the live objects in ``state``; returns its step.

        Transactional: every file is read and checked against its CRC-32C, and every entry against
        the live state (names, shapes, dtypes, types), before anything is written; a corrupt shard
        or a mismatch changes nothing. Module and optimizer tensors go back to their own devices
        (their ``load_state_dict`` copies); other tensors to the device they were saved from.

        DTensors in ``state`` (FSDP2, tensor parallel) receive their own shards of a sharded or plain
        checkpoint saved on any world size: each rank reads only the overlapping chunks' bytes.

        In a process group (the default one when initialized), ``load`` is a collective and every
        rank returns the same step: each rank reads and checks its own part first, and the ranks agree
        (a small gather per checkpoint tried) on the newest checkpoint that every rank could load.
        If any rank's part fails, every rank falls back together (with ``fallback``) or raises, and
        every rank logs which checkpoint, which rank and why. No rank changes its state before all
        have passed.

        Args:
            checkpoint_id: a specific checkpoint; the newest committed one when None.
            rank: whose shard to load.
            fallback: when the newest one is corrupt (on any rank), try older ones instead of raising.
            strict: raise when ``state`` has a key the checkpoint lacks.
            world_size: this job's number of ranks (default: torch.distributed's, else 1). A
                per-rank checkpoint saved by another number of ranks is refused: loading it would
                silently drop or invent ranks' state (resharding is not done here).
            process_group: the ``torch.distributed`` group whose ranks agree (default: the default group).
            no_dist: load on this process alone, with no collective (tools; one rank's inspection).
            exclude: checkpoint ids never to load (ones found bad after a restore; see `Guard.resume`).
                Demoted checkpoints (`demote`) are never chosen either, unless named by ``checkpoint_id``.

        Raises:
            CheckpointMismatchError: the checkpoint does not fit ``state`` or this world size;
                names every entry that does not fit; ``state`` is unchanged.
            CheckpointNotFoundError: nothing committed (or not that id).
            CheckpointCorruptError: names the shard and tensor; only when ``fallback`` is off or
                every checkpoint is corrupt (on some rank). Also when every committed checkpoint not
                in ``exclude`` is demoted: that is never "nothing committed".
            CheckpointError: another rank failed (its error's kind, naming the rank).
        """
        group = None
        if no_dist:
            group = solo
        elif process_group is not None:
            group = TorchGroup(process_group)
        # an id asked for by name is loaded even when demoted: a person's choice
        demoted = demoted_ids(self.storage) if checkpoint_id is None else set()
        try:
            return self._loader.load(
                state,
                checkpoint_id,
                rank=rank,
                fallback=fallback,
                strict=strict,
                world_size=world_size,
                group=group,
                exclude=frozenset(exclude) | demoted,
            )
        except CheckpointNotFoundError:
            # Never "nothing committed" (a caller's cue to start from step 0) when all there is was found bad.
            found_bad = [m.id for m in self._catalog.manifests() if m.id in demoted] if demoted else []
            if found_bad:
                raise CheckpointCorruptError(
                    f"every committed checkpoint under {self.url} was demoted after a restore (demoted/ there says "
                    f"why; delete a marker to trust its checkpoint again): {', '.join(found_bad)}"
                ) from None
            raise

    @property
    def last_loaded_id(self) -> str | None:
        """The id of the checkpoint the last `load` applied (None before one)."""
        return self._loader.last_loaded_id

    def verify(self, checkpoint_id: str | None = None, *, progress: Progress | None = None) -> VerifyReport:
        """Re-read every shard of a checkpoint and check every checksum.

        Args:
            checkpoint_id: the newest committed one when None.
            progress: called with (bytes read, bytes in all) after each file.

        An invalid manifest is reported as a problem of its checkpoint; with no id, newer checkpoints
        whose manifest is invalid are listed in the report's ``skipped`` (and make it not ok).

        Raises:
            CheckpointNotFoundError: nothing committed, or not that id.
            StorageError: the storage failed.
        """
        return verify(self._catalog, self._loader, checkpoint_id, progress=progress)

    def export(
        self,
        to: str,
        out: str,
        checkpoint_id: str | None = None,
        *,
        key: str | None = None,
        rank: int = 0,
    ) -> dict[str, Any]:
        """Write a checkpoint (plain or sharded) in another format, to a local path: no lock-in.

        Args:
            to: ``torch`` (a file ``torch.load(out, weights_only=True)`` reads), ``safetensors`` (a file
                of the tensors, the rest of the state as JSON in its metadata) or ``dcp`` (a folder
                ``torch.distributed.checkpoint.load`` reads).
            out: the file (or, for ``dcp``, the new folder) to write.
            checkpoint_id: the newest committed one when None.
            key: only ``state[key]``: with ``key="model"`` a safetensors export is the module's state dict.
            rank: whose per-rank state to take (RNG states, per-rank tensors).

        Every tensor is read whole (sharded chunks assembled) and verified first. See docs/FORMAT.md.

        Example:
            >>> store = CheckpointStore("memory://export")
            >>> _ = store.save({"model": torch.nn.Linear(2, 2)}, step=1).wait()
            >>> store.export("torch", "/tmp/gpuguard-export-example.pt")["step"]
            1

        Raises:
            ConfigError: an unknown format or key, or a dtype the format cannot hold.
            CheckpointNotFoundError, CheckpointCorruptError, StorageError: as for `load`.
        """
        return export(self._catalog, self._loader, to, out, checkpoint_id=checkpoint_id, key=key, rank=rank)

    # -- retention ------------------------------------------------------------------------------

    def prune(self) -> builtins.list[str]:
        """Delete committed checkpoints beyond the newest ``keep`` (and beyond ``keep_bytes``), and
        uncommitted leftovers.

        Never deletes the newest committed checkpoint, nor a folder this store is still writing.
        A checkpoint's manifest is deleted first, so a pruned folder is never mistaken for valid.

        Returns:
            The ids deleted.
        """
        return prune(self._catalog, self.keep, self._saver.in_flight, self.keep_bytes)

    def close(self) -> None:
        """Wait for saves in flight and release the writer threads."""
        self._saver.close()
        self.storage.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
