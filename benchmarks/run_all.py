"""Every benchmark, one report: benchmarks/results/<machine>.json, a Markdown table and PNG plots.

    python benchmarks/run_all.py [--machine NAME] [--out benchmarks/results] [--quick]

Each benchmark runs in its own process (so one's memory and threads do not disturb the next) with
``--json``; ratios are the ones each benchmark measured side by side in one run, from medians of
its repeats. ``--quick`` shrinks every size and repeat count to check the pipeline, not to quote.
The goodput model runs at 128 nodes x 8 GPUs under NVIDIA's failure rate, once with the H200 costs
and once with the checkpoint costs measured here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def benchmarks(quick: bool, cuda: bool) -> dict[str, list[str]]:
    """name -> command line (without --json)."""
    py = [sys.executable]
    if quick:
        return {
            "nvml_poll": [*py, str(HERE / "nvml_poll.py"), "--cycles", "200", "--repeats", "2"],
            "guard_overhead": [
                *py,
                str(HERE / "guard_overhead.py"),
                "--steps",
                "20",
                "--repeats",
                "2",
                "--calls",
                "20000",
                "--width",
                "256",
            ],
            "checkpoint": [
                *py,
                str(HERE / "checkpoint.py"),
                "--size-mib",
                "32",
                "--repeats",
                "2",
                "--settle-s",
                "0.1",
            ],
            "s3": [*py, str(HERE / "s3.py"), "--size-mib", "16", "--repeats", "1"],
            "sudden_loss": [*py, str(HERE / "sudden_loss.py"), "--ranks", "2", "--trials", "1", "--ballast-mib", "1"],
        }
    runs = {
        "nvml_poll": [*py, str(HERE / "nvml_poll.py")],
        "guard_overhead": [*py, str(HERE / "guard_overhead.py"), "--repeats", "3", "--calls", "100000"],
        "checkpoint": [*py, str(HERE / "checkpoint.py"), "--size-mib", "1024", "--repeats", "5"],
        "overlap": [*py, str(HERE / "overlap.py")],
        "s3": [*py, str(HERE / "s3.py"), "--size-mib", "128", "--repeats", "3"],
        "sudden_loss": [*py, str(HERE / "sudden_loss.py"), "--ranks", "4", "--trials", "5"],
    }
    if (HERE / "checkpoint_sharded.py").exists():  # FSDP2 / DTensor state on 2 and 4 gloo processes
        runs["sharded"] = [*py, str(HERE / "checkpoint_sharded.py"), "--size-mib", "256", "--repeats", "3"]
    if cuda:
        runs["checkpoint_cuda"] = [*runs["checkpoint"], "--device", "cuda"]
        runs["overlap_cuda"] = [*runs["overlap"], "--device", "cuda"]
    return runs


def run_one(name: str, command: list[str], timeout_s: float) -> dict[str, Any]:
    print(f"[run_all] {name}: {' '.join(Path(c).name if c.endswith('.py') else c for c in command[1:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [*command, "--json"], capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout_s:.0f} s"}
    wall = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}", "wall_s": wall}
    result: dict[str, Any] = json.loads(done.stdout)
    result["wall_s"] = wall
    result.setdefault("command", " ".join(["python", *(os.path.relpath(c, ROOT) for c in command[1:2]), *command[2:]]))
    return result


def goodput(checkpoint: dict[str, Any] | None, failures: int = 200_000) -> dict[str, Any]:
    """The goodput model at 128 x 8 under NVIDIA's rate: the H200 costs, and this machine's if measured."""
    from gpuguard.goodput import GoodputInputs, compare

    out = {"h200_costs": compare(GoodputInputs(nodes=128, gpus_per_node=8), check=True, failures=failures).to_dict()}
    if checkpoint and "results" in checkpoint:
        r = checkpoint["results"]
        gib = checkpoint["size_mib"] / 1024
        inputs = GoodputInputs(
            nodes=128,
            gpus_per_node=8,
            state_gib=gib,
            periodic_stall_s=r["torch.save"]["stall_s"],
            periodic_restore_s=r["torch.save"]["resume_s"],
            gpuguard_stall_s=r["gpuguard"]["stall_s"],
            gpuguard_durable_s=max(r["gpuguard"]["durable_s"], r["gpuguard"]["stall_s"]),
            gpuguard_restore_s=r["gpuguard"]["resume_s"],
        )
        out["this_machine_costs"] = compare(inputs, check=True, failures=failures).to_dict()
    return out


def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# gpuguard benchmarks: {report['name']}",
        "",
        f"Measured {report['when']} on {m.get('cpu', '?')}, {m.get('cpus')} CPUs, {m.get('memory_gib', '?')} GiB"
        f"{', ' + m['gpu'] if m.get('gpu') else ', no GPU'}; {m.get('platform')}; Python {m.get('python')}, "
        f"torch {m.get('torch')}. Load average at the start: {m.get('load_average_at_start', '?')}. "
        f"Reproduce: `{report['command']}`.",
        "",
    ]
    for key in ("checkpoint", "checkpoint_cuda"):
        c = report["benchmarks"].get(key)
        if not c or "results" not in c:
            continue
        lines += [
            f"## Checkpoint, {c['size_mib']} MiB on {c['device']}, median of {c['repeats']} interleaved repeats",
            "",
            f"`{c['command']}`",
            "",
            "| method | stall (s) | durable (s) | resume (s) | resume, new process (s) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in c["results"].items():
            lines.append(
                f"| {name} | {_f(r['stall_s'], 4)} | {_f(r['durable_s'])} | {_f(r['resume_s'])} "
                f"| {_f(r.get('resume_fresh_s', float('nan')))} |"
            )
        lines += ["", "| gpuguard ratio | value | goal |", "| --- | ---: | ---: |"]
        for name, value in c["ratios"].items():
            goal = c.get("goals", {}).get(name)
            verdict = "" if goal is None else f"≤ {goal} ({'met' if value <= goal else 'not met'})"
            lines.append(f"| {name.replace('_', ' ')} | {_f(value)} | {verdict} |")
        lines.append("")
    s3 = report["benchmarks"].get("s3")
    if s3 and "results" in s3:
        lines += [
            f"## S3 ({s3['endpoint']}), {s3['size_mib']} MiB, median of {s3['repeats']}",
            "",
            "| method | stall (s) | durable (s) | resume (s) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, r in s3["results"].items():
            lines.append(f"| {name} | {_f(r['stall_s'], 4)} | {_f(r['durable_s'])} | {_f(r['resume_s'])} |")
        lines.append("")
    lines += _other_benchmarks(report["benchmarks"])
    for label, g in report.get("goodput", {}).items():
        a, p, q, j = g["assumptions"], g["periodic"], g["gpuguard"], g["gpuguard_jit"]
        lines += [
            f"## Goodput, {a['nodes']} nodes x {a['gpus_per_node']} GPUs, {label.replace('_', ' ')}",
            "",
            f"{a['failure_rate']} ({a['failures_per_day']} failures/day); interval {a['checkpoint_interval_s']:g} s; "
            f"detectable share {a['detectable_share']}, sudden with a replica {a['sudden_replicated_share']}; "
            f"storage {a['storage_bandwidth']}; restart {a['restart_s']:g} s + reschedule "
            f"{a['reschedule_s']:g} s; periodic stall {a['periodic_stall_s']}; gpuguard stall "
            f"{a['gpuguard_stall_s']}, durable {a['gpuguard_durable_s']}.",
            "",
            "| | periodic only | gpuguard | gpuguard + just-in-time |",
            "| --- | ---: | ---: | ---: |",
            f"| goodput | {p['goodput']:.2%} | {q['goodput']:.2%} | {j['goodput']:.2%} |",
            f"| effective training per day (h) | {p['training_h_per_day']:.2f} | {q['training_h_per_day']:.2f} "
            f"| {j['training_h_per_day']:.2f} |",
            f"| training lost per failure (min) | {p['work_lost_per_failure_s'] / 60:.1f} "
            f"| {q['work_lost_per_failure_s'] / 60:.1f} | {j['work_lost_per_failure_s'] / 60:.1f} |",
            f"| wall time lost per failure (min) | {p['wall_lost_per_failure_s'] / 60:.1f} "
            f"| {q['wall_lost_per_failure_s'] / 60:.1f} | {j['wall_lost_per_failure_s'] / 60:.1f} |",
            f"| best interval (min) | {p['best_interval_s'] / 60:.1f} | {q['best_interval_s'] / 60:.1f} "
            f"| {j['best_interval_s'] / 60:.1f} |",
            f"| goodput at the best interval | {p['best_goodput']:.2%} | {q['best_goodput']:.2%} "
            f"| {j['best_goodput']:.2%} |",
            "",
            "At each policy's best interval per tier (the local tier: every checkpoint on node-local storage, every "
            "m-th also in object storage):",
            "",
            "| policy | local interval (min) | m | object interval (min) | local GB/s per node | object GB/s | goodput "
            "| Monte Carlo |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for t in g.get("tiers", []):
            local = "-" if t["local_interval_s"] is None else f"{t['local_interval_s'] / 60:.1f}"
            node = "-" if t["local_interval_s"] is None else f"{t['local_gbps_per_node']:.3g}"
            mc = t["monte_carlo"]
            check = f"{mc['estimate']:.2%}, {'agrees' if mc['agrees'] else 'DISAGREES'}" if mc else "-"
            lines.append(
                f"| {t['policy']} | {local} | {t['object_store_every']} | {t['object_interval_s'] / 60:.1f} | {node} "
                f"| {t['object_gbps']:.3g} | {t['goodput']:.2%} | {check} |"
            )
        lines.append("")
        for c in g["monte_carlo"]:
            lines.append(
                f"Monte Carlo, {c['name']}: {c['estimate']:.4%} ± {c['stderr']:.4%} ({c['failures']:,} failures) "
                f"against the closed form's {c['closed_form']:.4%}: {'agrees' if c['agrees'] else 'DISAGREES'}."
            )
        lines.append("")
    known = {"checkpoint", "checkpoint_cuda", "s3", "nvml_poll", "guard_overhead", "overlap", "overlap_cuda"}
    for key, value in report["benchmarks"].items():
        if key not in known and "error" not in value:  # a benchmark this report has no table for yet
            lines += [f"## {key}", "", f"`{value.get('command', '')}`: figures in {report['name']}.json.", ""]
    errors = {k: v["error"] for k, v in report["benchmarks"].items() if "error" in v}
    if errors:
        lines += ["## Failed", ""] + [f"- {k}: {v.splitlines()[-1] if v else v}" for k, v in errors.items()] + [""]
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]] + [""]
    return "\n".join(lines)


def _other_benchmarks(b: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str]] = []
    poll = b.get("nvml_poll", {})
    for name, r in poll.get("poll", {}).items():
        if "median_us" in r:
            rows.append((f"NVML poll cycle per GPU ({name})", f"{r['median_us']} µs median, p99 {r['p99_us']} µs"))
            rows.append((f"NVML poll cycles per second ({name})", f"{1e6 / r['median_us']:,.0f}"))
        elif "skipped" in r:
            rows.append((f"NVML poll ({name})", "skipped: " + r["skipped"][:80]))
    for r in poll.get("latency", []):
        rows.append((f"detection, fault → FAILING ({r['path']})", f"{r['median_ms']} ms median, max {r['max_ms']} ms"))
    guard = b.get("guard_overhead", {})
    if "training_step" in guard:
        t, u = guard["training_step"], guard["us_per_guard_step"]
        rows.append(
            (
                "training step without / with the guard",
                f"{t['step_ms_without']:.2f} / {t['step_ms_with']:.2f} ms (ratio {t['ratio']:.3f})",
            )
        )
        rows.append(("guard.step()", f"{u['single_process']} µs; {u['gloo_one_rank']} µs with gloo"))
        for r in guard.get("detection_latency", []):
            rows.append((f"decision latency ({r['path']})", f"{r['median_ms']} ms median, max {r['max_ms']} ms"))
    for key in ("overlap", "overlap_cuda"):
        o = b.get(key, {})
        for mode in ("snapshot", "overlap"):
            if mode in o:
                r = o[mode]
                rows.append(
                    (
                        f"periodic save, {mode} ({o['state_mib']} MiB, {o['device']})",
                        f"save() blocked {r['save_returned_ms']} ms, next step waited {r['next_step_waited_ms']} ms",
                    )
                )
    if not rows:
        return []
    return (
        ["## Health, guard and overlap", "", "| benchmark | figure |", "| --- | --- |"]
        + [f"| {a} | {v} |" for a, v in rows]
        + [""]
    )


def plots(report: dict[str, Any], out: Path, name: str) -> list[str]:
    """PNG charts: checkpoint stall and durable per method, and goodput per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    c = report["benchmarks"].get("checkpoint", {})
    if "results" in c:
        methods = list(c["results"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, title in zip(
            axes, ("stall_s", "durable_s"), ("training stall (s, log)", "time to durable (s)"), strict=True
        ):
            values = [c["results"][m][key] for m in methods]
            shown = [(m, v) for m, v in zip(methods, values, strict=True) if not math.isnan(v)]
            colors = ["tab:green" if m == "gpuguard" else "tab:gray" for m, _ in shown]
            ax.barh([m for m, _ in shown], [v for _, v in shown], color=colors)
            ax.set_title(title)
            if key == "stall_s":
                ax.set_xscale("log")
            ax.invert_yaxis()
            for i, (_, v) in enumerate(shown):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
        fig.suptitle(f"Checkpoint of {c['size_mib']} MiB on {c['device']}, median of {c['repeats']} ({name})")
        fig.tight_layout()
        path = out / f"{name}-checkpoint.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path))
    g = report.get("goodput", {}).get("h200_costs")
    if g:
        from gpuguard.goodput import GoodputInputs, compare

        shares = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
        base = GoodputInputs(nodes=128, gpus_per_node=8)
        # The sudden rest keeps the default split: three quarters of it with a surviving replica.
        split = base.sudden_replicated_share / (1 - base.detectable_share)
        rows = [
            compare(
                GoodputInputs(nodes=128, gpus_per_node=8, detectable_share=s, sudden_replicated_share=(1 - s) * split)
            )
            for s in shares
        ]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.axhline(rows[0].periodic.goodput * 100, color="tab:gray", label="periodic only (30 min)")
        ax.axhline(rows[0].periodic.best_goodput * 100, color="tab:gray", ls="--", label="periodic only, best interval")
        ax.plot([s * 100 for s in shares], [r.gpuguard.goodput * 100 for r in rows], "o-", color="tab:green")
        ax.plot([s * 100 for s in shares], [r.gpuguard.best_goodput * 100 for r in rows], "o--", color="tab:green")
        ax.plot([s * 100 for s in shares], [r.gpuguard_jit.goodput * 100 for r in rows], "s-", color="tab:blue")
        ax.plot([s * 100 for s in shares], [r.gpuguard_jit.best_goodput * 100 for r in rows], "s--", color="tab:blue")
        ax.lines[2].set_label("gpuguard (30 min)")
        ax.lines[3].set_label("gpuguard, best interval")
        ax.lines[4].set_label("gpuguard + just-in-time (30 min)")
        ax.lines[5].set_label("gpuguard + just-in-time, best interval")
        ax.set_xlabel("failures preceded by detectable degradation (%)")
        ax.set_ylabel("goodput (%)")
        ax.set_title(f"128 x 8 GPUs, {base.failures_per_day:.2f} failures/day (NVIDIA's rate), H200 costs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{name}-goodput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path))
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machine", help="a name for this machine (default: the host name)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the pipeline")
    parser.add_argument(
        "--only", nargs="*", help="run only these benchmarks, keeping the others' figures from <machine>.json"
    )
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from checkpoint import machine

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.machine or platform.node() or "machine")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    command = "python benchmarks/run_all.py" + (f" --machine {args.machine}" if args.machine else "")
    report: dict[str, Any] = {
        "name": name,
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command + (" --quick" if args.quick else ""),
        "machine": machine(),
        "quick": args.quick,
        "benchmarks": {},
    }
    previous = args.out / f"{name}.json"
    if args.only and previous.exists():
        report["benchmarks"] = json.loads(previous.read_text())["benchmarks"]
    for bench, cmd in benchmarks(args.quick, cuda).items():
        if args.only and bench not in args.only:
            continue
        report["benchmarks"][bench] = run_one(bench, cmd, args.timeout_s)
    report["goodput"] = goodput(report["benchmarks"].get("checkpoint"))
    report["plots"] = [os.path.basename(p) for p in plots(report, args.out, name)]
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"[run_all] wrote {args.out / (name + '.json')}, {name}.md and {len(report['plots'])} plot(s)")
    return 1 if any("error" in b for b in report["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
