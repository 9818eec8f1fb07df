"""``gpuguard checkpoints``: list, verify and export the checkpoints under a URL.

Exit codes: 0 all good; 1 corruption found (a shard, a tensor, or a manifest); 2 bad usage (an unknown
protocol, a malformed URL, a format that cannot hold a dtype) or nothing to verify or export; 3 the
storage failed (unreachable, missing bucket, no permission). With ``--json`` every outcome, errors
included, is one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from gpuguard.cli._table import render_table
from gpuguard.errors import CheckpointCorruptError, ConfigError, GpuGuardError, StorageError

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE, EXIT_STORAGE = 0, 1, 2, 3
# gpuguard.checkpoint._export.FORMATS, named here so that the parser builds without importing torch.
FORMATS = ("torch", "safetensors", "dcp")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("checkpoints", help="list and verify checkpoints", description=__doc__)
    sub = p.add_subparsers(dest="checkpoints_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("url", help="where the checkpoints live: s3://bucket/run, file:///path, ...")
    common.add_argument("--storage-options", metavar="JSON", help="fsspec storage options, as a JSON object")
    common.add_argument("--json", action="store_true", help="print JSON for machines")
    ls = sub.add_parser("list", parents=[common], help="committed checkpoints, oldest first")
    ls.set_defaults(handler=_reporting(run_list))
    verify = sub.add_parser("verify", parents=[common], help="re-read every shard and check every checksum")
    verify.add_argument("id", nargs="?", help="a checkpoint id (default: the newest committed one)")
    verify.set_defaults(handler=_reporting(run_verify))
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write a checkpoint (plain or sharded) as a torch.save file, safetensors or a DCP folder",
        description="Every tensor is read whole (sharded chunks assembled) and verified. torch: one file that "
        "torch.load(OUT, weights_only=True) reads; safetensors: the tensors, the rest of the state as JSON in "
        "the file's metadata; dcp: a folder that torch.distributed.checkpoint.load reads.",
    )
    export.add_argument("out", metavar="OUT", help="the local file (for dcp: a new folder) to write")
    export.add_argument("--to", choices=FORMATS, required=True, help="the format to write")
    export.add_argument("--id", help="a checkpoint id (default: the newest committed one)")
    export.add_argument(
        "--key", help="only this entry of the state, e.g. model: a module's state_dict keys (default: everything)"
    )
    export.add_argument("--rank", type=int, default=0, help="whose per-rank state, RNG included (default: 0)")
    export.set_defaults(handler=_reporting(run_export))


def _reporting(handler: Any) -> Any:
    """Errors as exit codes, and as JSON on stdout under ``--json`` (a script reads one stream)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except GpuGuardError as exc:
            if isinstance(exc, StorageError):
                code = EXIT_STORAGE
            else:
                code = EXIT_CORRUPT if isinstance(exc, CheckpointCorruptError) else EXIT_USAGE
            if args.json:
                doc = {"ok": False, "error": str(exc), "kind": type(exc).__name__, "url": args.url}
                print(json.dumps(doc, indent=2))
            else:
                print(f"gpuguard: error: {exc}", file=sys.stderr)
            return code

    return run


def _store(args: argparse.Namespace) -> Any:
    from gpuguard.checkpoint import CheckpointStore

    options: dict[str, Any] = {}
    if args.storage_options:
        try:
            options = json.loads(args.storage_options)
        except json.JSONDecodeError as exc:
            raise ConfigError("--storage-options", args.storage_options, f"must be a JSON object ({exc.msg})") from None
        if not isinstance(options, dict):
            raise ConfigError("--storage-options", args.storage_options, "must be a JSON object")
    return CheckpointStore(args.url, options)


def _refuse_a_missing_folder(url: str) -> None:
    """A local folder that is not there is a typo far more often than an empty store: listing it as "no
    committed checkpoints" (exit 0) made a mistyped path look like a run that never saved. (A path under a
    file is the storage's error, exit 3; `verify` and `export` already say there is no checkpoint, exit 2.)"""
    local = _local_folder(url)
    if local is None or os.path.isdir(local):
        return
    if os.path.exists(local):
        raise ConfigError("URL", url, f"must name an existing checkpoint folder: {local} is a file, not a folder")
    above = os.path.dirname(os.path.abspath(local))
    while above != os.path.dirname(above) and not os.path.exists(above):
        above = os.path.dirname(above)
    if os.path.isdir(above):
        raise ConfigError("URL", url, f"must name an existing checkpoint folder: {local} does not exist")


def _local_folder(url: str) -> str | None:
    """The local path of a ``file://`` URL or a plain path; None for other storage (s3://, memory://, ...)."""
    if url.startswith("file://"):
        return url.removeprefix("file://")
    return None if "://" in url else url


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def run_list(args: argparse.Namespace) -> int:
    _refuse_a_missing_folder(args.url)
    store = _store(args)
    try:
        infos = store.list()
        markers = store.demoted() if any(i.demoted for i in infos) else {}
    finally:
        store.close()
    if args.json:
        listed = [i.to_dict() | ({"demotion": markers.get(i.id, {})} if i.demoted else {}) for i in infos]
        print(json.dumps({"url": args.url, "checkpoints": listed}, indent=2))
        return EXIT_OK
    if not infos:
        print(f"no committed checkpoints under {args.url}")
        return EXIT_OK

    def reason(info: Any) -> str:
        # A demoted checkpoint is never resumed from (found bad after a restore); its marker says why.
        why = markers.get(info.id, {}).get("reason", "?")
        return f"{info.reason} (DEMOTED: {why})" if info.demoted else info.reason

    rows = [[i.id, str(i.step), reason(i), str(i.world_size), _size(i.total_bytes), i.created_at] for i in infos]
    print(render_table(["ID", "STEP", "REASON", "RANKS", "SIZE", "CREATED"], rows))
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    live = sys.stderr.isatty() and not args.json

    def progress(done: int, total: int) -> None:
        if live:
            pct = 100 * done / total if total else 100
            print(f"\rverifying {pct:5.1f}%  {_size(done)} of {_size(total)}", end="", file=sys.stderr, flush=True)

    try:
        report = store.verify(args.id, progress=progress)
    finally:
        store.close()
        if live:
            print(file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK if report.ok else EXIT_CORRUPT
    for skipped in report.skipped:
        print(f"{skipped['id']}: CORRUPT {skipped['shard']}: {skipped['error']} (skipped; a resume loads an older one)")
    if not report.problems:
        print(f"{report.id}: OK ({_size(report.bytes_read)} read, every checksum matches)")
    else:
        for problem in report.problems:
            where = problem["shard"] + (f" tensor {problem['tensor']!r}" if problem["tensor"] else "")
            print(f"{report.id}: CORRUPT {where}: {problem['error']}")
    return EXIT_OK if report.ok else EXIT_CORRUPT


def run_export(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        done = store.export(args.to, args.out, args.id, key=args.key, rank=args.rank)
    finally:
        store.close()
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        what = f"{done['tensors']} tensors" + (f" of {args.key!r}" if args.key else "")
        print(f"{done['id']} (step {done['step']}): {what} written as {args.to} to {args.out} ({_size(done['bytes'])})")
    return EXIT_OK
