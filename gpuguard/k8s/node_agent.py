"""``python -m gpuguard.k8s.node_agent``: the node agent's minimal entry point (also ``gpuguard k8s node-check``).

It imports NVML, the health rules and the kubernetes client — never torch — so its image can be a
small Python image with ``pip install --no-deps gpuguard nvidia-ml-py kubernetes pyyaml pluggy``
(examples/kubernetes/Dockerfile.node-agent). A readiness endpoint (``/readyz`` on ``--health-port``)
answers 503 while the agent sees no GPU or cannot reach the API server, so a DaemonSet pod that
cannot do its job does not look healthy.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gpuguard.errors import ConfigError, GpuGuardError, KubernetesError

EXIT_OK, EXIT_NOT_READY, EXIT_USAGE = 0, 1, 2


def add_arguments(n: argparse.ArgumentParser) -> None:
    n.add_argument("--node", default=None, help="the node (default: NODE_NAME)")
    n.add_argument("--quiet-period", type=float, default=600.0, metavar="SECONDS", help="(default: 600)")
    n.add_argument("--interval", type=float, default=5.0, metavar="SECONDS", help="how often to look (default: 5)")
    n.add_argument("--once", action="store_true", help="look once; exit 1 when not ready (no GPU, no API server)")
    n.add_argument("--kubeconfig", help="a kubeconfig (default: in-cluster)")
    n.add_argument("--taint-key", default="gpuguard.io/unhealthy-gpu", help="(default: gpuguard.io/unhealthy-gpu)")
    n.add_argument(
        "--taint-effect",
        default="NoSchedule",
        choices=("NoSchedule", "PreferNoSchedule", "NoExecute"),
        help="(default: NoSchedule)",
    )
    n.add_argument("--mark", default="taint", choices=("taint", "label"), help="how to mark the node (default: taint)")
    n.add_argument("--dra", action="store_true", help="also DeviceTaintRules: create on reports, delete when healed")
    n.add_argument("--no-mark-reports", action="store_true", help="only give nodes back; never mark on reports")
    n.add_argument("--health-port", type=int, default=0, metavar="PORT", help="serve /readyz here (default: 0, off)")
    n.add_argument("--replay", metavar="PATH", help="read a recorded device instead of NVML ('h200')")


def serve_readiness(port: int, check: Any) -> ThreadingHTTPServer:
    """``GET /readyz``: 200 when the last look saw a GPU and reached the API server, else 503 and why."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            ok = self.path == "/readyz" and check.ready
            body = b"ok\n" if ok else f"not ready: {check.reason}\n".encode()
            self.send_response(200 if ok else (503 if self.path == "/readyz" else 404))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="gpuguard-node-agent-readyz", daemon=True).start()
    return server


def run(args: argparse.Namespace) -> int:
    from gpuguard.health.config import HealthConfig
    from gpuguard.health.monitor import HealthMonitor
    from gpuguard.k8s.cluster import connect
    from gpuguard.k8s.config import KubernetesConfig
    from gpuguard.k8s.node_check import NodeCheck

    node = args.node or os.environ.get("NODE_NAME", "")
    if not node:
        raise ConfigError("--node", node, "give the node's name, or NODE_NAME from the Downward API")
    for name in ("quiet_period", "interval"):
        if getattr(args, name) < 0 or (name == "interval" and args.interval == 0):
            raise ConfigError(
                f"--{name.replace('_', '-')}", getattr(args, name), "must be a positive number of seconds"
            )
    nvml: Any = None
    if args.replay is not None:
        from gpuguard.fakenvml import FakeNvml, load_recording

        load_recording(args.replay)
        nvml = FakeNvml.replay(args.replay)
    monitor = HealthMonitor(nvml, HealthConfig(), devices="all")
    first = monitor.start(threads=False)
    if not first.available:
        print(f"gpuguard: {first.error}", file=sys.stderr)

    def read_health() -> dict[str, str]:
        if not first.available:
            return {}
        monitor.process_events(0.0)
        return monitor.poll().states()  # keyed so that GPUs whose UUID is unknown stay apart

    config = KubernetesConfig(
        enabled="on",
        kubeconfig=args.kubeconfig,
        taint_key=args.taint_key,
        taint_effect=args.taint_effect,
        mark=args.mark,
        dra=args.dra,
    )
    cluster = connect(config, env={**os.environ, "NODE_NAME": node}, need_pod=False)
    if cluster is None:  # enabled="on" raises instead; kept for the type checker
        raise KubernetesError("no cluster configured", status=0, verb="configure", resource="cluster")
    check = NodeCheck(cluster, read_health, quiet_period_s=args.quiet_period, mark_reports=not args.no_mark_reports)
    server = serve_readiness(args.health_port, check) if args.health_port else None
    try:
        while True:
            try:
                print(check.once(), flush=True)
            except KubernetesError as exc:
                # the API server being away is no reason to stop watching; the mark stays meanwhile
                print(f"gpuguard: node check: {exc}", file=sys.stderr, flush=True)
            if not check.ready:
                print(f"gpuguard: node check not ready: {check.reason}", file=sys.stderr, flush=True)
            if args.once:
                return EXIT_OK if check.ready else EXIT_NOT_READY
            time.sleep(args.interval)
    finally:
        if server is not None:
            server.shutdown()
        monitor.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuguard-node-agent", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as exc:
        print(f"gpuguard-node-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GpuGuardError as exc:
        print(f"gpuguard-node-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
