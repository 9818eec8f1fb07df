"""``gpuguard k8s manifests``: the YAML a guarded training job needs on Kubernetes."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

import yaml


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("k8s", help="Kubernetes helpers", description=__doc__)
    sub = p.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)
    m = sub.add_parser(
        "manifests",
        help="print an indexed Job, ServiceAccount and RBAC for a guarded training job",
        description="Prints YAML for kubectl apply -f -.",
    )
    m.add_argument("--name", required=True, help="the Job's name")
    m.add_argument("--image", required=True, help="the trainer image")
    m.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    m.add_argument("--nodes", type=int, default=1, help="nodes (pods of the indexed Job)")
    m.add_argument("--namespace", default="default")
    m.add_argument("--checkpoint-dir", help="GPUGUARD_CHECKPOINT_DIR, e.g. s3://bucket/run1")
    m.add_argument("--no-taint", action="store_true", help="do not grant node and DeviceTaintRule permissions")
    m.add_argument(
        "--restart-in-place",
        action="store_true",
        help="restart the trainer container in place on exit 76 (Kubernetes 1.34+)",
    )
    m.add_argument("--script", default="train.py", help="the training script and its arguments")
    m.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gpuguard.k8s.manifests import JobSpec, render

    spec = JobSpec(
        name=args.name,
        image=args.image,
        gpus=args.gpus,
        nodes=args.nodes,
        checkpoint_dir=args.checkpoint_dir,
        namespace=args.namespace,
        taint=not args.no_taint,
        restart_in_place=args.restart_in_place,
        script=shlex.split(args.script),
    )
    print(yaml.dump_all(render(spec), Dumper=_PlainDumper, sort_keys=False), end="")
    return 0


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases: manifests are read by people."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
