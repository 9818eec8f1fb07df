"""The ``gpuguard`` command line. Each subcommand lives in its own module and registers its parser."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gpuguard._version import __version__
from gpuguard.cli import checkpoints, demo, goodput, k8s, status
from gpuguard.cli._help import Parser
from gpuguard.errors import GpuGuardError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpuguard", description="Keep training jobs off failing GPUs.")
    parser.add_argument("--version", action="version", version=f"gpuguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gpuguard does")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    status.add_parser(subparsers)
    checkpoints.add_parser(subparsers)
    demo.add_parser(subparsers)
    k8s.add_parser(subparsers)
    goodput.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.handler(args))
    except GpuGuardError as exc:
        print(f"gpuguard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
