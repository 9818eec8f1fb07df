"""The manifest: written last, it is the commit. Readers trust nothing without a valid one."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

from gpuguard._version import __version__
from gpuguard.checkpoint._crc import crc32c
from gpuguard.errors import CheckpointCorruptError

FORMAT: Final = "gpuguard-checkpoint"
# 2: the shard's byte section starts 64-byte aligned; the state file may describe shared storages.
# Added fields do not change the version (readers ignore what they do not know); see docs/FORMAT.md.
FORMAT_VERSION: Final = 2
READABLE_VERSIONS: Final = (1, 2)  # format 1 is read into aligned memory, so its misaligned tensors load too
MANIFEST: Final = "MANIFEST.json"
# Written by the committing rank when a multi-rank commit fails, so the other ranks stop waiting at once.
COMMIT_FAILED: Final = "COMMIT-FAILED.json"
CHECKPOINT_DIR: Final = re.compile(r"^step-(\d{12})-([0-9a-f]{8,32})$")


def checkpoint_name(step: int, token: str) -> str:
    return f"step-{step:012d}-{token}"


def shard_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def state_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.json"


def shard_record_file(rank: int, world_size: int) -> str:
    """Each rank's note that its files are durable; the committing rank gathers them into the manifest."""
    return f"rank-{rank:05d}-of-{world_size:05d}.done.json"


@dataclass(frozen=True)
class ShardRecord:
    """One rank's files: sizes and CRC-32C of the tensors file, of each tensor, and of the state file."""

    rank: int
    file: str
    bytes: int
    crc32c: int
    header_bytes: int
    tensors: dict[str, int]
    state_file: str
    state_bytes: int
    state_crc32c: int
    # DTensor chunks this rank wrote, by tensor name (global shape, offsets, block checksums);
    # see _sharding.chunk_records. Empty for unsharded state, and then absent from the JSON.
    chunks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rank": self.rank,
            "file": self.file,
            "bytes": self.bytes,
            "crc32c": f"{self.crc32c:08x}",
            "header_bytes": self.header_bytes,
            "tensors": {name: f"{crc:08x}" for name, crc in self.tensors.items()},
            "state_file": self.state_file,
            "state_bytes": self.state_bytes,
            "state_crc32c": f"{self.state_crc32c:08x}",
        }
        if self.chunks:
            out["chunks"] = self.chunks
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardRecord:
        return cls(
            rank=int(data["rank"]),
            file=str(data["file"]),
            bytes=int(data["bytes"]),
            crc32c=int(data["crc32c"], 16),
            header_bytes=int(data["header_bytes"]),
            tensors={str(k): int(v, 16) for k, v in data["tensors"].items()},
            state_file=str(data["state_file"]),
            state_bytes=int(data["state_bytes"]),
            state_crc32c=int(data["state_crc32c"], 16),
            chunks=dict(data.get("chunks", {})),
        )


@dataclass(frozen=True)
class Manifest:
    id: str
    step: int
    world_size: int
    reason: str
    evidence: dict[str, Any]
    created_at: str
    gpuguard_version: str
    torch_version: str
    shards: tuple[ShardRecord, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    layout: str = "per_rank"  # or "replicated": the shards split one state between them
    attempt: str = ""  # the save attempt whose files these are: a rank that did not commit checks it is its own

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes + s.state_bytes for s in self.shards)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "id": self.id,
            "step": self.step,
            "world_size": self.world_size,
            "reason": self.reason,
            "evidence": self.evidence,
            "created_at": self.created_at,
            "gpuguard_version": self.gpuguard_version,
            "torch_version": self.torch_version,
            "shards": [s.to_dict() for s in self.shards],
            "extra": self.extra,
            "layout": self.layout,
        }
        if self.attempt:
            body["attempt"] = self.attempt
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        # A self-checksum: on storage without atomic puts, a torn manifest must not read as valid.
        body["manifest_crc32c"] = f"{crc32c(canonical.encode()):08x}"
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> Manifest:
        """Parse and validate; any defect raises `CheckpointCorruptError` naming the manifest."""
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            claimed = body.pop("manifest_crc32c")
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
            if f"{crc32c(canonical):08x}" != claimed:
                raise ValueError("its checksum does not match its content")
            if body["format"] != FORMAT or body["format_version"] not in READABLE_VERSIONS:
                readable = " or ".join(f"v{v}" for v in READABLE_VERSIONS)
                raise ValueError(
                    f"format {body['format']!r} v{body['format_version']} is not {FORMAT} {readable} "
                    f"(gpuguard {__version__} reads those; a newer gpuguard wrote this one?)"
                )
            shards = tuple(ShardRecord.from_dict(s) for s in body["shards"])
            if sorted(s.rank for s in shards) != list(range(int(body["world_size"]))):
                raise ValueError("its shards do not cover every rank")
            return cls(
                id=str(body["id"]),
                step=int(body["step"]),
                world_size=int(body["world_size"]),
                reason=str(body["reason"]),
                evidence=dict(body["evidence"]),
                created_at=str(body["created_at"]),
                gpuguard_version=str(body["gpuguard_version"]),
                torch_version=str(body["torch_version"]),
                shards=shards,
                extra=dict(body.get("extra", {})),
                layout=str(body.get("layout", "per_rank")),
                attempt=str(body.get("attempt", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointCorruptError(f"{where}: not a valid manifest ({exc})", shard=MANIFEST) from None
