"""``gpuguard goodput``: effective training time with periodic checkpoints alone against gpuguard.

Every assumption is printed with the result; the closed form is checked by a Monte Carlo run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from gpuguard.goodput import FAILURE_SOURCES, GoodputInputs, Report, compare


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "goodput",
        help="model effective training time: periodic checkpoints alone vs gpuguard",
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
    costs = p.add_argument_group("measured costs, seconds (default: the H200 measurements scaled to --state-gib)")
    for name, what in (
        ("periodic-stall-s", "a periodic-only save (torch.save: blocks until durable)"),
        ("periodic-restore-s", "restoring after a failure, periodic only"),
        ("gpuguard-stall-s", "gpuguard's snapshot stall"),
        ("gpuguard-durable-s", "gpuguard's save, start to durable"),
        ("gpuguard-restore-s", "gpuguard's resume"),
    ):
        costs.add_argument(f"--{name}", type=float, help=what)
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
    inputs = inputs_from(args)
    report = compare(inputs, check=not args.no_check, failures=args.failures, seed=args.seed)
    doc = report.to_dict()
    doc["sensitivity"] = _sensitivity(inputs)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render(report, doc["sensitivity"]))
    return 0


def _sensitivity(inputs: GoodputInputs) -> list[dict[str, float]]:
    """gpuguard's goodput as the detectable share varies, at the same interval and at its best one."""
    rows = []
    for share in (0.0, 0.1, 0.2, 0.3, 0.5):
        outcome = compare(dataclasses.replace(inputs, detectable_share=share)).gpuguard
        rows.append(
            {"detectable_share": share, "goodput": outcome.goodput, "best_interval_goodput": outcome.best_goodput}
        )
    return rows


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def render(report: Report, sensitivity: list[dict[str, float]]) -> str:
    i, a = report.inputs, report.inputs.assumptions()
    lines = [
        f"gpuguard goodput: {i.nodes} nodes x {i.gpus_per_node} GPUs, {a['failures_per_day']:.3g} failures/day "
        f"(mean time between failures {a['mean_time_between_failures_h']:.2f} h)",
        "assumptions:",
    ]
    lines += [f"  {k:<30}{v}" for k, v in a.items() if k != "model"]
    lines += [f"  {'model':<30}{a['model']}", ""]
    p, g = report.periodic, report.gpuguard
    steps = i.step_time_s
    rows = [
        ("goodput (kept training / wall)", f"{p.goodput:.2%}", f"{g.goodput:.2%}"),
        ("effective training per day", f"{p.training_h_per_day:.2f} h", f"{g.training_h_per_day:.2f} h"),
        ("checkpoint stall overhead", f"{p.checkpoint_overhead:.3%}", f"{g.checkpoint_overhead:.3%}"),
        (
            "training lost per failure",
            f"{_duration(p.work_lost_per_failure_s)} ({p.work_lost_per_failure_s / steps:,.0f} steps)",
            f"{_duration(g.work_lost_per_failure_s)} ({g.work_lost_per_failure_s / steps:,.0f} steps)",
        ),
        ("wall time lost per failure", _duration(p.wall_lost_per_failure_s), _duration(g.wall_lost_per_failure_s)),
        (
            "GPU-hours lost per failure",
            f"{p.wall_lost_per_failure_s * i.gpus / 3600:,.0f}",
            f"{g.wall_lost_per_failure_s * i.gpus / 3600:,.0f}",
        ),
        ("best interval (same costs)", _duration(p.best_interval_s), _duration(g.best_interval_s)),
        ("goodput at the best interval", f"{p.best_goodput:.2%}", f"{g.best_goodput:.2%}"),
    ]
    lines.append(f"{'':<34}{'periodic only':>22}{'gpuguard':>22}")
    lines += [f"{name:<34}{x:>22}{y:>22}" for name, x, y in rows]
    saved = (g.goodput - p.goodput) * 24 * i.gpus
    lines.append(f"gpuguard keeps {saved:,.0f} more GPU-hours of training per day at this interval.")
    if report.checks:
        lines.append("")
        for c in report.checks:
            verdict = "agrees" if c.agrees else "DISAGREES"
            lines.append(
                f"Monte Carlo, {c.name}: {c.estimate:.4%} ± {c.stderr:.4%} over {c.failures:,} failures; "
                f"closed form {c.closed_form:.4%} ({verdict})"
            )
    lines += ["", "gpuguard's goodput by the share of failures it sees coming:"]
    lines += [
        f"  {row['detectable_share']:>4.0%}: {row['goodput']:.2%} at this interval, "
        f"{row['best_interval_goodput']:.2%} at its best"
        for row in sensitivity
    ]
    return "\n".join(lines)
