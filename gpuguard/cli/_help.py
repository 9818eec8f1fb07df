"""``--help`` shows each option's default: one formatter for every gpuguard parser (and ``gpuguard-run``)."""

from __future__ import annotations

import argparse
import copy
from typing import Any


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and ``(default: X)`` after every option that has a value by default.

    Flags (``store_true``, ``store_const``) get none, nor do options whose default is None or empty
    (their help says what happens when they are left out), nor help that already speaks of its default.
    """

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):  # argparse prints nothing for an option without help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not _shows_default(action) or "default" in text.lower():
            return action.help
        return f"{text} (default: %(default)s)"


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    return (
        bool(action.option_strings)
        and action.nargs != 0  # flags: store_true/false/const, count, help, version
        and default is not None
        and default is not argparse.SUPPRESS
        and not isinstance(default, bool)
        and default not in ("", [], ())
    )


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; sub-commands made from it inherit the formatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
