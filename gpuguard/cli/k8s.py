"""``gpuguard k8s``: the manifests a guarded training job needs, and the way back for a marked node."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any

from gpuguard.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    from gpuguard.k8s.manifests import SUPPORTED_VERSIONS

    p = subparsers.add_parser("k8s", help="Kubernetes helpers", description=__doc__)
    sub = p.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)
    m = sub.add_parser(
        "manifests",
        help="print an indexed Job, ServiceAccount, RBAC and node check for a guarded training job",
        description="Prints YAML for kubectl apply -f -. Comments at the top say what the release needs.",
    )
    m.add_argument("--name", required=True, help="the Job's name")
    m.add_argument("--image", required=True, help="the trainer image")
    m.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    m.add_argument("--nodes", type=int, default=1, help="nodes (pods of the indexed Job)")
    m.add_argument("--namespace", default="default")
    m.add_argument("--checkpoint-dir", help="GPUGUARD_CHECKPOINT_DIR, e.g. s3://bucket/run1")
    m.add_argument(
        "--kubernetes-version",
        default=SUPPORTED_VERSIONS[0],
        help=f"the cluster's release: {', '.join(SUPPORTED_VERSIONS)} (default: {SUPPORTED_VERSIONS[0]})",
    )
    m.add_argument(
        "--feature-gate",
        action="append",
        default=[],
        metavar="NAME",
        help="a feature gate that is on in the cluster (e.g. ContainerRestartRules on 1.34); repeatable",
    )
    m.add_argument("--mark", choices=("taint", "label", "none"), default="taint", help="how to mark a bad node")
    m.add_argument("--no-taint", action="store_true", help="do not mark nodes or devices (= --mark none --no-dra)")
    m.add_argument("--no-dra", action="store_true", help="no DeviceTaintRules for DRA-allocated GPUs")
    m.add_argument("--leave", choices=("exit", "evict", "delete"), default="exit", help="how a pod leaves")
    m.add_argument("--no-pod-health", action="store_true", help="do not read the pod's KEP-4680 device health")
    m.add_argument(
        "--restart-in-place",
        action="store_true",
        help="restart the trainer container in place on exit 76 (ContainerRestartRules: 1.35+, or a gate on 1.34)",
    )
    m.add_argument("--no-node-check", action="store_true", help="no DaemonSet that untaints healed nodes")
    m.add_argument("--node-check-quiet-period", type=int, default=600, metavar="SECONDS")
    m.add_argument("--script", default="train.py", help="the training script and its arguments")
    m.set_defaults(handler=run_manifests)

    u = sub.add_parser(
        "untaint",
        help="remove gpuguard's taint, label and record from a node (others' taints stay)",
        description="Give a repaired node back: removes only gpuguard's own marks, with your credentials.",
    )
    u.add_argument("node", help="the node's name")
    u.add_argument("--kubeconfig", help="a kubeconfig (default: KUBECONFIG or ~/.kube/config, or in-cluster)")
    u.add_argument("--taint-key", default="gpuguard.io/unhealthy-gpu", help="gpuguard's taint and label key")
    u.add_argument("--dra", action="store_true", help="also delete gpuguard's DeviceTaintRules for the node's devices")
    u.set_defaults(handler=run_untaint)

    n = sub.add_parser(
        "node-check",
        help="on a marked node, remove gpuguard's mark once the GPUs stay healthy for a quiet period",
        description="Runs in the node-check DaemonSet (NODE_NAME from the Downward API).",
    )
    n.add_argument("--node", default=None, help="the node (default: NODE_NAME)")
    n.add_argument("--quiet-period", type=float, default=600.0, metavar="SECONDS")
    n.add_argument("--interval", type=float, default=30.0, metavar="SECONDS", help="how often to look")
    n.add_argument("--once", action="store_true", help="look once and exit")
    n.add_argument("--kubeconfig", help="a kubeconfig (default: in-cluster)")
    n.add_argument("--taint-key", default="gpuguard.io/unhealthy-gpu")
    n.add_argument("--dra", action="store_true", help="also delete gpuguard's DeviceTaintRules for the node")
    n.add_argument("--replay", metavar="PATH", help="read a recorded device instead of NVML ('h200')")
    n.set_defaults(handler=run_node_check)


def run_manifests(args: argparse.Namespace) -> int:
    from gpuguard.k8s.config import KubernetesConfig
    from gpuguard.k8s.manifests import JobSpec, to_yaml

    actions = KubernetesConfig(
        mark="none" if args.no_taint else args.mark,
        dra=not (args.no_taint or args.no_dra),
        leave=args.leave,
        pod_health=not args.no_pod_health,
    )
    spec = JobSpec(
        name=args.name,
        image=args.image,
        gpus=args.gpus,
        nodes=args.nodes,
        checkpoint_dir=args.checkpoint_dir,
        namespace=args.namespace,
        kubernetes=actions,
        restart_in_place=args.restart_in_place,
        script=shlex.split(args.script),
        kubernetes_version=args.kubernetes_version,
        feature_gates=frozenset(args.feature_gate),
        node_check=not args.no_node_check,
        node_check_quiet_period_s=args.node_check_quiet_period,
    )
    print(to_yaml(spec), end="")
    return EXIT_OK


def _cluster(args: argparse.Namespace, node: str) -> Any:
    from gpuguard.errors import KubernetesError
    from gpuguard.k8s.cluster import connect
    from gpuguard.k8s.config import KubernetesConfig

    config = KubernetesConfig(enabled="on", kubeconfig=args.kubeconfig, taint_key=args.taint_key, dra=args.dra)
    cluster = connect(config, env={**os.environ, "NODE_NAME": node}, need_pod=False)
    if cluster is None:  # enabled="on" raises instead; kept for the type checker
        raise KubernetesError("no cluster configured", status=0, verb="configure", resource="cluster")
    return cluster


def run_untaint(args: argparse.Namespace) -> int:
    from gpuguard.k8s.dra import Dra
    from gpuguard.k8s.node_marks import unmark

    cluster = _cluster(args, args.node)
    removed = unmark(cluster, args.node)
    if args.dra:
        removed += Dra(cluster).remove_rules(args.node)
    print(f"{args.node}: removed " + "; ".join(removed) if removed else f"{args.node}: no gpuguard mark")
    return EXIT_OK


def run_node_check(args: argparse.Namespace) -> int:
    from gpuguard.errors import KubernetesError
    from gpuguard.health.config import HealthConfig
    from gpuguard.health.monitor import HealthMonitor
    from gpuguard.k8s.node_check import NodeCheck

    node = args.node or os.environ.get("NODE_NAME", "")
    if not node:
        raise ConfigError("--node", node, "give the node's name, or NODE_NAME from the Downward API")
    for name in ("quiet_period", "interval"):
        if getattr(args, name) < 0 or (name == "interval" and args.interval == 0):
            flag = f"--{name.replace('_', '-')}"
            raise ConfigError(flag, getattr(args, name), "must be a positive number of seconds")
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
        monitor.process_events(0.0)
        return {d.uuid: d.state.value for d in monitor.poll().devices}

    check = NodeCheck(_cluster(args, node), read_health, quiet_period_s=args.quiet_period)
    try:
        while True:
            try:
                print(check.once(), flush=True)
            except KubernetesError as exc:
                # the API server being away is no reason to stop watching; the mark stays meanwhile
                print(f"gpuguard: node check: {exc}", file=sys.stderr, flush=True)
                if args.once:
                    return EXIT_FAILED
            if args.once:
                return EXIT_OK
            time.sleep(args.interval)
    finally:
        monitor.stop()
