"""Every ``--help`` shows the defaults, and ``gpuguard-run --help`` says what gpuguard adds before torchrun's text."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from gpuguard.cli import build_parser
from gpuguard.integrations.torchrun import build_parser as build_run_parser


def parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from parsers(child, f"{name} {sub}")


ALL = [*parsers(build_parser(), "gpuguard"), ("gpuguard-run", build_run_parser())]


@pytest.mark.parametrize(("name", "parser"), ALL, ids=[name for name, _ in ALL])
def test_every_option_with_a_default_shows_it_in_help(name: str, parser: argparse.ArgumentParser) -> None:
    checked = 0
    for action in parser._actions:
        default = action.default
        if not action.option_strings or action.nargs == 0 or default in (None, argparse.SUPPRESS, "", [], ()):
            continue
        if isinstance(default, bool):
            continue
        text = parser._get_formatter()._format_action(action)
        shown = {str(default).split(",")[0], f"{default:g}" if isinstance(default, float) else str(default)}
        assert "default" in text.lower() and any(v in text for v in shown), (name, action.option_strings, text)
        checked += 1
    if name in ("gpuguard goodput", "gpuguard k8s manifests", "gpuguard-run"):
        assert checked >= 5, name  # the test saw the options it is about


def test_gpuguard_run_help_describes_gpuguard_before_torchrun() -> None:
    text = build_run_parser().format_help()
    ours = text.index("with what gpuguard adds")
    assert ours < text.index("Torch Distributed Elastic Training Launcher") < text.index("\n  --nnodes")
    head = text[ours : text.index("Torch Distributed Elastic Training Launcher")]
    for promise in ("preflight", "exit 75", "76", "--max-restarts", "--leave-grace-s", "SIGTERM", "forwarded"):
        assert promise in head, promise
    assert "--leave-grace-s SECONDS" in text and "Default: GPUGUARD_LEAVE_GRACE_S or 10" in " ".join(text.split())
