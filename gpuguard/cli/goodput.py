"""``gpuguard goodput``: effective training time with periodic checkpoints alone, gpuguard with object
storage only, gpuguard with just-in-time saves of sudden failures, and both with a node-local tier.

Every assumption is printed with the result; the closed form is checked by a Monte Carlo run, at the
given interval and at each policy's best interval per tier.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from gpuguard.goodput import FAILURE_SOURCES, Check, GoodputInputs, Report, compare, per_failure


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "goodput",
        help="model effective training time: periodic checkpoints alone vs gpuguard (with just-in-time saves, "
        "with a node-local tier)",
        description=__doc__,
    )
    d = GoodputInputs()
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--step-time-s", type=float, default=d.step_time_s, help="seconds per training step")
    p.add_argument("--state-gib", type=float, default=d.state_gib, help="checkpoint bytes per GPU, in GiB")
    p.add_argument("--interval-s", type=float, default=d.interval_s, help="seconds of training between checkpoints")
    p.add_argument("--restart-s", type=float, default=d.restart_s, help="process start to training again")
    p.add_argument("--reschedule-s", type=float, default=d.reschedule_s, help="a new node scheduled and ready")
    p.add_argument(
        "--failure-rate",
        choices=FAILURE_SOURCES,
        default=d.failure_source,
        help="nvidia: 19 per 1,000 nodes per day; llama3: 419 in 54 days on 16,384 GPUs",
    )
    p.add_argument("--failures-per-node-day", type=float, help="your own failure rate (overrides --failure-rate)")
    p.add_argument(
        "--detectable-share",
        type=float,
        default=d.detectable_share,
        help="share of failures preceded by degradation gpuguard detects (an assumption: no public figure)",
    )
    p.add_argument(
        "--sudden-replicated-share",
        type=float,
        default=d.sudden_replicated_share,
        help="share of failures that strike without warning while a replica of the lost rank's state survives "
        "(data-parallel or HSDP jobs losing one replica): the survivors save them (an assumption)",
    )
    p.add_argument(
        "--inplace-share-detectable",
        type=float,
        default=d.inplace_share_detectable,
        help="share of detectable failures a restart in place clears (no reschedule)",
    )
    p.add_argument(
        "--inplace-share-sudden",
        type=float,
        default=round(d.inplace_share_sudden, 4),
        help="share of sudden failures a restart in place clears (Llama 3, Table 5: software bugs and NCCL "
        "watchdog timeouts, 61 of 419)",
    )
    p.add_argument(
        "--storage-gbps",
        type=float,
        help="aggregate storage bandwidth in GB/s that every checkpoint and restore of the whole job shares "
        "(default: Meta's Tectonic for Llama 3, 2 TB/s sustained for 16,384 GPUs, scaled to this job's GPUs)",
    )
    p.add_argument(
        "--max-storage-share",
        type=float,
        default=d.max_storage_share,
        help="the most of the storage's time checkpoints may take (bounds the best interval)",
    )
    tier = p.add_argument_group(
        "the local tier (gpuguard's local_dir: every checkpoint lands on node-local storage, every m-th also goes "
        "to object storage)"
    )
    tier.add_argument(
        "--local-gbps",
        type=float,
        help="write bandwidth of each node's local tier in GB/s (default: 6 GiB to /dev/shm by one writer on the "
        "H200 host, 2.28 GB/s; a node's ranks writing in parallel get more)",
    )
    tier.add_argument(
        "--local-capacity-gib",
        type=float,
        help="each node's local tier in GiB; must hold 2 checkpoints of state-gib x gpus-per-node (default: "
        "/dev/shm, half of a DGX H200's 2 TB of RAM)",
    )
    tier.add_argument(
        "--max-local-share",
        type=float,
        default=d.max_local_share,
        help="the most of the local storage's time checkpoints may take (bounds the local interval)",
    )
    tier.add_argument(
        "--object-store-every",
        type=int,
        help="every this-many-th checkpoint also goes to object storage, which gets one each --interval-s "
        "(default: per policy, the best the local bandwidth allows)",
    )
    tier.add_argument(
        "--node-loss-share",
        type=float,
        help="share of rolled-back failures that take their node's local tier with them, so they restore from "
        "object storage (default: 1 - inplace-share-sudden, the failures a restart in place does not clear)",
    )
    costs = p.add_argument_group("measured costs, seconds (default: the H200 measurements scaled to --state-gib)")
    for name, what in (
        ("periodic-stall-s", "a periodic-only save (torch.save: blocks until durable)"),
        ("periodic-restore-s", "restoring after a failure, periodic only"),
        ("gpuguard-stall-s", "gpuguard's snapshot stall"),
        ("gpuguard-durable-s", "gpuguard's save, start to durable"),
        ("gpuguard-restore-s", "gpuguard's resume"),
        ("jit-save-s", "the survivors' save after a sudden loss (default: as gpuguard-durable-s)"),
    ):
        costs.add_argument(f"--{name}", type=float, help=what)
    costs.add_argument(
        "--jit-detect-s", type=float, default=d.jit_detect_s, help="a sudden loss to every survivor knowing of it"
    )
    costs.add_argument(
        "--jit-replay-steps", type=float, default=d.jit_replay_steps, help="steps computed again after such a resume"
    )
    p.add_argument("--failures", type=int, default=100_000, help="failure cycles the Monte Carlo check samples")
    p.add_argument("--no-check", action="store_true", help="skip the Monte Carlo check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(handler=run)


def inputs_from(args: argparse.Namespace) -> GoodputInputs:
    return GoodputInputs(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        step_time_s=args.step_time_s,
        state_gib=args.state_gib,
        interval_s=args.interval_s,
        restart_s=args.restart_s,
        reschedule_s=args.reschedule_s,
        failure_source=args.failure_rate,
        failures_per_node_day=args.failures_per_node_day,
        detectable_share=args.detectable_share,
        sudden_replicated_share=args.sudden_replicated_share,
        inplace_share_detectable=args.inplace_share_detectable,
        inplace_share_sudden=args.inplace_share_sudden,
        storage_gbps=args.storage_gbps,
        max_storage_share=args.max_storage_share,
        local_gbps=args.local_gbps,
        local_capacity_gib=args.local_capacity_gib,
        max_local_share=args.max_local_share,
        object_store_every=args.object_store_every,
        node_loss_share=args.node_loss_share,
        jit_detect_s=args.jit_detect_s,
        jit_save_s=args.jit_save_s,
        jit_replay_steps=args.jit_replay_steps,
        periodic_stall_s=args.periodic_stall_s,
        periodic_restore_s=args.periodic_restore_s,
        gpuguard_stall_s=args.gpuguard_stall_s,
        gpuguard_durable_s=args.gpuguard_durable_s,
        gpuguard_restore_s=args.gpuguard_restore_s,
    )


def run(args: argparse.Namespace) -> int:
    from gpuguard.errors import ConfigError

    if args.failures < 100:
        raise ConfigError("--failures", args.failures, "must be 100 or more")
    try:
        inputs = inputs_from(args)
    except ConfigError as exc:  # name the flag the user typed, not the field behind it
        flag = _FLAGS.get(exc.field, "--" + exc.field.replace("_", "-"))
        raise ConfigError(flag, exc.value, exc.allowed) from None
    report = compare(inputs, check=not args.no_check, failures=args.failures, seed=args.seed)
    doc = report.to_dict()
    doc["sensitivity"] = _sensitivity(inputs)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render(report, doc["sensitivity"]))
    return 0


def _sensitivity(inputs: GoodputInputs) -> list[dict[str, float]]:
    """gpuguard's goodput (without and with just-in-time saves) as the detectable share varies, the rest of
    the failures split between sudden-with-replica and sudden-without as given."""
    rows = []
    sudden = 1 - inputs.detectable_share
    replicated = inputs.sudden_replicated_share / sudden if sudden > 0 else 0.0
    for share in (0.0, 0.1, 0.2, 0.3, 0.5):
        varied = dataclasses.replace(inputs, detectable_share=share, sudden_replicated_share=(1 - share) * replicated)
        report = compare(varied)
        rows.append(
            {
                "detectable_share": share,
                "goodput": report.gpuguard.goodput,
                "best_interval_goodput": report.gpuguard.best_goodput,
                "jit_goodput": report.gpuguard_jit.goodput,
                "jit_best_interval_goodput": report.gpuguard_jit.best_goodput,
                "local_goodput": report.gpuguard_local.goodput,
                "local_best_interval_goodput": report.gpuguard_local.best_goodput,
            }
        )
    return rows


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


# Fields whose flag is not the field's name with dashes.
_FLAGS = {"failure_source": "--failure-rate"}

# Column labels of the table at the given interval, in `Report.outcomes` order.
_SHORT = ("periodic only", "gpuguard", "+ just-in-time", "+ local tier", "+ jit + local tier")
_LONG = {"gpuguard": "gpuguard (object storage only)"}


def _check_line(c: Check) -> str:
    verdict = "agrees" if c.agrees else "DISAGREES"
    return (
        f"Monte Carlo, {c.name}: {c.estimate:.4%} ± {c.stderr:.4%} over {c.failures:,} failures; "
        f"closed form {c.closed_form:.4%} ({verdict})"
    )


def render(report: Report, sensitivity: list[dict[str, float]]) -> str:
    i, a = report.inputs, report.inputs.assumptions()
    lines = [
        f"gpuguard goodput: {i.nodes} nodes x {i.gpus_per_node} GPUs, {a['failures_per_day']:.3g} failures/day "
        f"(mean time between failures {a['mean_time_between_failures_h']:.2f} h)",
        "assumptions:",
    ]
    lines += [f"  {k:<30}{v}" for k, v in a.items() if k != "model"]
    lines += [f"  {'model':<30}{a['model']}", ""]
    outcomes = report.outcomes
    steps = i.step_time_s

    def row(name: str, cell: Any) -> str:
        return f"{name:<34}" + "".join(f"{cell(o):>23}" for o in outcomes)

    lines.append(f"at --interval-s {i.interval_s:g} (object storage gets a checkpoint each interval):")
    lines.append(f"{'':<34}" + "".join(f"{label:>23}" for label in _SHORT))
    lines += [
        row("local interval", lambda o: _duration(o.interval_s) + f" (m={o.object_every})" if o.local_tier else "-"),
        row("object storage GB/s (job)", lambda o: f"{o.object_gbps:.3g}"),
        row("local GB/s per node", lambda o: f"{o.local_gbps_per_node:.3g}" if o.local_tier else "-"),
        row("goodput (kept training / wall)", lambda o: f"{o.goodput:.2%}"),
        row("effective training per day", lambda o: f"{o.training_h_per_day:.2f} h"),
        row("checkpoint stall overhead", lambda o: f"{o.checkpoint_overhead:.3%}"),
        row(
            "training lost per failure",
            lambda o: f"{_duration(o.work_lost_per_failure_s)} ({o.work_lost_per_failure_s / steps:,.0f} steps)",
        ),
        row("wall time lost per failure", lambda o: _duration(o.wall_lost_per_failure_s)),
        row("GPU-hours lost per failure", lambda o: f"{o.wall_lost_per_failure_s * i.gpus / 3600:,.0f}"),
        row("object storage busy", lambda o: f"{o.storage_busy:.1%}"),
        row("local storage busy", lambda o: f"{o.local_busy:.1%}" if o.local_tier else "-"),
    ]
    p = report.periodic
    for o in outcomes[1:]:
        saved = (o.goodput - p.goodput) * 24 * i.gpus
        lines.append(f"{o.name} keeps {saved:,.0f} more GPU-hours of training per day than periodic only.")
    if report.checks:
        lines.append("")
        lines += [_check_line(c) for c in report.checks]
    lines += ["", "at each policy's best interval per tier (each bounded by its tier's bandwidth and share):"]
    lines.append(
        f"  {'policy':<37}{'local':>10}{'m':>4}{'object':>10}{'local GB/s':>12}{'object GB/s':>13}{'goodput':>9}"
        "  Monte Carlo"
    )
    for t in report.tiers():
        local = _duration(t["local_interval_s"]) if t["local_interval_s"] is not None else "-"
        node = f"{t['local_gbps_per_node']:.3g}/node" if t["local_interval_s"] is not None else "-"
        mc = t["monte_carlo"]
        check = f"{mc['estimate']:.2%} ± {mc['stderr']:.3%} {'agrees' if mc['agrees'] else 'DISAGREES'}" if mc else "-"
        lines.append(
            f"  {_LONG.get(t['policy'], t['policy']):<37}{local:>10}{t['object_store_every']:>4}"
            f"{_duration(t['object_interval_s']):>10}{node:>12}{t['object_gbps']:>13.3g}{t['goodput']:>9.2%}  {check}"
        )
    lines += ["", "per failure, by kind (training lost on a roll back: about half an interval plus the durable lag):"]
    lines.append(f"  {'policy':<37}{'kind':<28}{'share':>7}{'save':>11}{'lost':>12}{'downtime':>11}")
    for r in per_failure(i):
        lines.append(
            f"  {r['policy']:<37}{r['kind']:<28}{r['share']:>7.0%}{_duration(r['save_s']):>11}"
            f"{_duration(r['training_lost_s']):>12}{_duration(r['downtime_s']):>11}"
        )
    lines += ["", "gpuguard's goodput by the share of failures it sees coming (the sudden rest split as given):"]
    lines += [
        f"  {row['detectable_share']:>4.0%}: {row['goodput']:.2%} at this interval, {row['best_interval_goodput']:.2%} "
        f"at its best; with just-in-time saves {row['jit_goodput']:.2%}, {row['jit_best_interval_goodput']:.2%}"
        for row in sensitivity
    ]
    return "\n".join(lines)
