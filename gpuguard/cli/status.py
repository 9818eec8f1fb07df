"""``gpuguard status``: the health of this node's GPUs, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from gpuguard.cli._table import render_table
from gpuguard.errors import ConfigError
from gpuguard.health.config import HealthConfig
from gpuguard.health.model import DeviceHealth, HealthSnapshot, HealthState
from gpuguard.health.monitor import HealthMonitor

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status",
        help="show the health of this node's GPUs",
        description="Read every GPU through NVML once and show its health. Without a GPU, use --replay or --scenario.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--replay", metavar="PATH", help="answer from a recorded device ('h200' for the shipped one)")
    source.add_argument("--scenario", metavar="PATH", help="answer from a fault scenario (JSON or YAML)")
    p.add_argument("--at", metavar="SECONDS", type=float, help="scenario time to evaluate (with --scenario)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.add_argument("--check", action="store_true", help="exit 0 when every GPU is HEALTHY, 1 otherwise (a probe)")
    p.add_argument(
        "--watch",
        metavar="SECONDS",
        type=float,
        help="keep watching and show the GPUs every SECONDS (with --json: one JSON line each time)",
    )
    p.add_argument("--count", type=int, help="with --watch, stop after this many refreshes")
    p.add_argument(
        "--devices",
        default="all",
        metavar="WHICH",
        help="'all' GPUs on the node; 'job': the GPUs a guard in this environment would watch (CUDA, "
        "CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES, LOCAL_RANK); or NVML indices and UUIDs, "
        "comma-separated (MIG-... UUIDs are read through their parent GPU) (default: %(default)s)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--fail-open",
        dest="fail_mode",
        action="store_const",
        const="open",
        help="with --check, GPUs whose health is UNKNOWN pass (default)",
    )
    mode.add_argument(
        "--fail-closed",
        dest="fail_mode",
        action="store_const",
        const="closed",
        help="with --check, GPUs whose health is UNKNOWN fail",
    )
    p.set_defaults(handler=run, fail_mode="open")


def _nvml(args: argparse.Namespace) -> Any:
    if args.at is not None and args.scenario is None:
        raise ConfigError("--at", args.at, "needs --scenario PATH")
    if args.at is not None and args.at < 0:
        raise ConfigError("--at", args.at, "must be 0 seconds or later")
    if args.replay is None and args.scenario is None:
        return None  # the real NVML
    from gpuguard.fakenvml import FakeNvml, load_recording

    if args.replay is not None:
        load_recording(args.replay)  # fail now, with the file's name, rather than inside the monitor
        return FakeNvml.replay(args.replay)
    return FakeNvml.from_scenario(args.scenario)


def _devices(args: argparse.Namespace) -> Any:
    value = str(args.devices).strip()
    if value in ("all", "job"):
        return value
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ConfigError("--devices", args.devices, "give 'all', 'job', or NVML indices and UUIDs, comma-separated")
    return [int(item) if item.isdigit() else item for item in items]


def read_snapshot(args: argparse.Namespace) -> HealthSnapshot:
    nvml = _nvml(args)
    monitor = HealthMonitor(nvml, HealthConfig(fail_mode=args.fail_mode), devices=_devices(args))
    try:
        snapshot = monitor.start(threads=False)
        if args.scenario is not None and snapshot.available:
            from gpuguard.fakenvml import play

            snapshot = play(monitor, args.at or 0.0)
    finally:
        monitor.stop()
    return snapshot


def watch(args: argparse.Namespace) -> int:
    """A live status: the monitor's threads watch, the screen (or a JSON line) is refreshed."""
    if args.check or args.at is not None:
        raise ConfigError("--watch", args.watch, "cannot be combined with --check or --at")
    if args.watch <= 0:
        raise ConfigError("--watch", args.watch, "must be a number of seconds greater than 0")
    from gpuguard.fakenvml import FakeNvml, load_recording

    nvml: Any = None
    if args.replay is not None:
        load_recording(args.replay)
        nvml = FakeNvml.replay(args.replay)
    elif args.scenario is not None:
        nvml = FakeNvml.from_scenario(args.scenario, realtime=True)
    config = HealthConfig(fail_mode=args.fail_mode, poll_interval_s=min(1.0, args.watch))
    live = sys.stdout.isatty() and not args.json
    refreshes = 0
    with HealthMonitor(nvml, config, devices=_devices(args)) as monitor:
        while args.count is None or refreshes < args.count:
            snapshot = monitor.snapshot()
            if not snapshot.available:
                print(f"gpuguard: {snapshot.error}", file=sys.stderr)
                return EXIT_USAGE
            if args.json:
                print(json.dumps({"at": round(snapshot.taken_at, 3), **snapshot.to_dict()}), flush=True)
            else:
                header = f"gpuguard status, every {args.watch:g}s (Ctrl-C to stop)"
                print(("\033[H\033[2J" if live else "\n") + header + "\n\n" + format_snapshot(snapshot), flush=True)
            refreshes += 1
            if args.count is None or refreshes < args.count:
                time.sleep(args.watch)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if args.count is not None:
        if args.watch is None:  # it would be ignored: a script asking for N refreshes would get one
            raise ConfigError("--count", args.count, "goes with --watch SECONDS (refreshes to show)")
        if args.count < 1:
            raise ConfigError("--count", args.count, "must be 1 or more refreshes")
    if args.watch is not None:
        return watch(args)
    snapshot = read_snapshot(args)
    if not snapshot.available:
        if args.json:  # machines get JSON on stdout whatever happened: {"devices": [], "available": false, ...}
            print(json.dumps(snapshot.to_dict(), indent=2))
        print(
            f"gpuguard: {snapshot.error}. To try gpuguard without a GPU: "
            "gpuguard status --replay h200, or --scenario PATH --at SECONDS.",
            file=sys.stderr,
        )
        if args.check:
            return EXIT_OK if args.fail_mode == "open" else EXIT_UNHEALTHY
        return EXIT_USAGE
    if args.json:
        print(json.dumps(snapshot.to_dict(), indent=2))
    else:
        print(format_snapshot(snapshot))
        for note in (*snapshot.skipped, *snapshot.notes):
            print(f"gpuguard: {note}", file=sys.stderr)
    if args.check:
        passing = {HealthState.HEALTHY} | ({HealthState.UNKNOWN} if args.fail_mode == "open" else set())
        return EXIT_OK if all(d.state in passing for d in snapshot.devices) else EXIT_UNHEALTHY
    return EXIT_OK


def _cell(readings: dict[str, Any], *names: str, sep: str = "/") -> str:
    values = [readings.get(n) for n in names]
    if all(v is None for v in values):
        return "-"
    return sep.join("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _row(d: DeviceHealth) -> list[str]:
    r = dict(d.readings)
    temp = f"{r['temperature']}C" if "temperature" in r else "-"
    events = ",".join(e for e in r.get("clock_events", []) if e != "gpu_idle") or "-"
    reasons = "; ".join(f"{x.code}" + (f"({x.evidence['xid']})" if "xid" in x.evidence else "") for x in d.reasons)
    mig = "-" if d.mig_mode is None else d.mig_mode + (f" ({len(d.mig_devices)})" if d.mig_devices else "")
    return [
        str(d.index),
        d.uuid or d.pci_bus_id or "-",  # a GPU lost at start may have no readable UUID
        d.state.value,
        temp,
        _cell(r, "ecc_sbe_volatile", "ecc_dbe_volatile"),
        _cell(r, "remapped_correctable", "remapped_uncorrectable", "remap_pending"),
        events,
        mig,
        reasons or "-",
    ]


def format_snapshot(snapshot: HealthSnapshot) -> str:
    """The table, then one line per reason (with how it clears), then each GPU's signals off and unreadable."""
    headers = ["GPU", "UUID", "STATE", "TEMP", "ECC SBE/DBE", "REMAP COR/UNC/PEND", "CLOCK EVENTS", "MIG", "REASONS"]
    lines = [render_table(headers, [_row(d) for d in snapshot.devices])]
    details = [(d, reason) for d in snapshot.devices for reason in d.reasons]
    if details:
        lines.append("")
        for d, reason in details:
            clears = f"; clears {reason.clears}" if reason.clears else ""
            said = f"{reason.code}: {reason.message} -> {reason.remedy.value}{clears}"
            lines.append(f"GPU {d.index} {reason.state.value:<8} {said}")
    signals = [
        *(
            f"GPU {d.index} cannot read {name}: {error}"
            for d in snapshot.devices
            for name, error in d.signals_unreadable.items()
        ),
        *(f"GPU {d.index} does not support: {', '.join(d.signals_off)}" for d in snapshot.devices if d.signals_off),
        *(f"GPU {d.index} MIG devices: {', '.join(d.mig_devices)}" for d in snapshot.devices if d.mig_devices),
    ]
    if signals:
        lines += ["", *signals]
    return "\n".join(lines)
