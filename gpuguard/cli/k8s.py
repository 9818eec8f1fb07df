"""``gpuguard k8s``: the manifests a guarded training job needs, and the way back for a marked node."""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> None:
    from gpuguard.k8s._versions import JOBSET_VERSIONS
    from gpuguard.k8s.manifests import KINDS, RESTART_MODES, SUPPORTED_VERSIONS
    from gpuguard.k8s.node_agent import add_arguments

    p = subparsers.add_parser("k8s", help="Kubernetes helpers", description=__doc__)
    sub = p.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)
    m = sub.add_parser(
        "manifests",
        help="print the workload (Job, JobSet or TrainJob), RBAC, node agent and guardrails for a guarded job",
        description="Prints YAML for kubectl apply -f -. Comments at the top say what each exit code does on this "
        "workload and release, and what the release needs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m.add_argument("--name", required=True, help="the workload's name")
    m.add_argument("--image", required=True, help="the trainer image")
    m.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    m.add_argument("--nodes", type=int, default=1, help="nodes (one pod each)")
    m.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="job (one node), jobset or trainjob (a gang: Kubeflow Trainer v2); auto: job for one node, jobset "
        "for more; pytorchjob is refused (exit codes 1-127 are permanent there)",
    )
    m.add_argument("--namespace", default="default", help="the namespace the job runs in")
    m.add_argument("--checkpoint-dir", help="GPUGUARD_CHECKPOINT_DIR, e.g. s3://bucket/run1")
    m.add_argument(
        "--kubernetes-version",
        default=SUPPORTED_VERSIONS[0],
        choices=SUPPORTED_VERSIONS,
        help="the cluster's minor version: which API versions and fields the manifests may use",
    )
    m.add_argument(
        "--jobset-version", default="0.10", help=f"the JobSet release installed: {', '.join(JOBSET_VERSIONS)}"
    )
    m.add_argument(
        "--feature-gate",
        action="append",
        default=[],
        metavar="NAME",
        help="a feature gate that is on in the cluster (e.g. ContainerRestartRules on 1.34); repeatable",
    )
    m.add_argument("--mark", choices=("taint", "label", "none"), default="taint", help="how to mark a bad node")
    m.add_argument(
        "--marker",
        choices=("agent", "pod"),
        default="agent",
        help="who marks the node: the node agent on the pod's report (the pods hold no node rights), or the pod",
    )
    m.add_argument("--no-taint", action="store_true", help="do not mark nodes or devices (= --mark none --no-dra)")
    m.add_argument("--no-dra", action="store_true", help="no DeviceTaintRules for DRA-allocated GPUs")
    m.add_argument("--leave", choices=("exit", "evict", "delete"), default="exit", help="how a pod leaves")
    m.add_argument("--no-pod-health", action="store_true", help="do not read the pod's KEP-4680 device health")
    m.add_argument(
        "--restart-in-place",
        nargs="?",
        const="container",
        default="off",
        choices=RESTART_MODES,
        help="on exit 76 restart in place: the container (restartPolicyRules, KEP-5307: 1.35+, a gate on 1.34) or "
        "the pod's containers (RestartAllContainers, KEP-5532: 1.36+, a gate on 1.35)",
    )
    m.add_argument("--max-restarts", type=int, default=3, help="counted restarts (backoffLimit, maxRestarts)")
    m.add_argument(
        "--evacuation-budget",
        type=int,
        default=10,
        help="health evacuations allowed across restarts and recreations (a ConfigMap); -1: none",
    )
    m.add_argument(
        "--runtime-kind",
        choices=("TrainingRuntime", "ClusterTrainingRuntime"),
        default="TrainingRuntime",
        help="--kind trainjob: the runtime's kind (a cluster-scoped one is shared by every namespace)",
    )
    m.add_argument("--no-node-check", action="store_true", help="no node agent DaemonSet (needs --marker pod)")
    m.add_argument("--node-agent-image", help="the node agent's image (default: --image); no torch needed")
    m.add_argument(
        "--node-check-quiet-period",
        type=int,
        default=600,
        metavar="SECONDS",
        help="how long a node's GPUs must stay healthy before the node agent lifts gpuguard's taint",
    )
    m.add_argument(
        "--local-dir",
        help="mount an emptyDir for the guard's node-local tier there and set GPUGUARD_LOCAL_DIR; in memory under "
        "/dev/shm (e.g. /dev/shm/gpuguard), on the node's disk elsewhere; a container restarted in place finds it",
    )
    m.add_argument("--local-size", help="the local tier's sizeLimit, a quantity such as 64Gi (needs --local-dir)")
    m.add_argument("--script", default="train.py", help="the training script and its arguments")
    m.set_defaults(handler=run_manifests)

    u = sub.add_parser(
        "untaint",
        help="remove gpuguard's own taint, label and record from a node (others' taints stay)",
        description="Give a repaired node back: removes only what gpuguard placed (taint value 'gpuguard'), "
        "with your credentials.",
    )
    u.add_argument("node", help="the node's name")
    u.add_argument("--kubeconfig", help="a kubeconfig (default: KUBECONFIG or ~/.kube/config, or in-cluster)")
    u.add_argument("--taint-key", default="gpuguard.io/unhealthy-gpu", help="gpuguard's taint and label key")
    u.add_argument("--dra", action="store_true", help="also delete gpuguard's DeviceTaintRules for the node's devices")
    u.set_defaults(handler=run_untaint)

    n = sub.add_parser(
        "node-check",
        help="the node agent: mark this node on its pods' reports; give it back once the GPUs stay healthy",
        description="Runs in the node-check DaemonSet (NODE_NAME from the Downward API); also python -m "
        "gpuguard.k8s.node_agent, which needs no torch.",
    )
    add_arguments(n)
    n.set_defaults(handler=run_node_check)


def run_manifests(args: argparse.Namespace) -> int:
    from gpuguard.k8s.config import KubernetesConfig
    from gpuguard.k8s.manifests import JobSpec, to_yaml

    actions = KubernetesConfig(
        mark="none" if args.no_taint else args.mark,
        marker=args.marker,
        dra=not (args.no_taint or args.no_dra),
        leave=args.leave,
        pod_health=not args.no_pod_health,
    )
    spec = JobSpec(
        name=args.name,
        image=args.image,
        gpus=args.gpus,
        nodes=args.nodes,
        kind=args.kind,
        checkpoint_dir=args.checkpoint_dir,
        namespace=args.namespace,
        kubernetes=actions,
        restart_in_place=args.restart_in_place,
        script=shlex.split(args.script),
        kubernetes_version=args.kubernetes_version,
        feature_gates=frozenset(args.feature_gate),
        jobset_version=args.jobset_version,
        max_restarts=args.max_restarts,
        # -1 alone means "no budget": another negative (a typo for a count) reaches the spec's check.
        evacuation_budget=None if args.evacuation_budget == -1 else args.evacuation_budget,
        runtime_kind=args.runtime_kind,
        node_check=not args.no_node_check,
        node_agent_image=args.node_agent_image,
        node_check_quiet_period_s=args.node_check_quiet_period,
        local_dir=args.local_dir,
        local_size=args.local_size,
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
    from gpuguard.k8s.node_agent import run

    return run(args)
