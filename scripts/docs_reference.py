"""Generate the reference parts of docs/ from the code, so that they cannot drift from it.

- docs/configuration.md: a table per settings class (GuardConfig and its ``health`` and ``kubernetes``
  sections, CheckpointStore, RetryPolicy): every field, its default, its ``GPUGUARD_*`` variable and its
  meaning, read from the class's docstring (a field the docstring does not describe is an error here).
- docs/cli.md: the ``--help`` of every command and sub-command, from the argparse parsers themselves.

Each generated part sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``; the prose
around it is written by hand. ``python scripts/docs_reference.py`` rewrites the parts, ``--check`` exits 1
when a page is out of date (tests/test_docs_reference.py runs the check).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REGION = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
HELP_COLUMNS = "100"


def docstring_entries(obj: Any, section: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style docstring section (``Attributes:`` or ``Args:``)."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    lines = doc.splitlines()
    try:
        start = lines.index(f"{section}:") + 1
    except ValueError:
        raise ValueError(f"{obj.__qualname__}: its docstring has no {section}: section") from None
    entries: dict[str, str] = {}
    current: str | None = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        match = re.match(r"^ {4}(\w+):\s*(.*)$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current and line.strip():
            entries[current] += " " + line.strip()
    return entries


def _default_text(value: Any) -> str:
    if isinstance(value, frozenset):
        return "`" + ", ".join(str(v) for v in sorted(value)) + "`"
    if value is None:
        return "None"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 2**20 and value % 2**20 == 0:
        return f"`{value!r}` ({int(value) // 2**20} MiB)"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    """A docstring's text in a Markdown table cell: reST's ``code`` as Markdown's `code`, pipes escaped."""
    return re.sub(r"``([^`]+)``", r"`\1`", text).replace("|", "\\|")


def _table(rows: list[tuple[str, str, str, str]], *, env: bool) -> str:
    head = "| option | default | environment | meaning |\n| --- | --- | --- | --- |\n" if env else ""
    if not env:
        head = "| option | default | meaning |\n| --- | --- | --- |\n"
    body = []
    for name, default, variable, meaning in rows:
        cells = [f"`{name}`", default, f"`{variable}`" if variable else "", _cell(meaning)]
        if not env:
            del cells[2]
        body.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(body) + "\n"


def dataclass_rows(cls: type, env_prefix: str | None) -> list[tuple[str, str, str, str]]:
    """One row per dataclass field, in declaration order; every field must be described."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    meanings = docstring_entries(cls, "Attributes" if "\nAttributes:" in doc else "Args")
    rows = []
    for f in dataclasses.fields(cls):
        if f.name not in meanings:
            raise ValueError(f"{cls.__qualname__}.{f.name}: not described in the docstring's Attributes")
        if f.default is not dataclasses.MISSING:
            default = _default_text(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            default = "see below" if dataclasses.is_dataclass(value) else _default_text(value)
        else:
            default = "required"
        variable = f"{env_prefix}{f.name.upper()}" if env_prefix is not None else ""
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            variable += "_*"  # a section: one variable per field of its own table
        rows.append((f.name, default, variable, meanings[f.name]))
    extra = set(meanings) - {f.name for f in dataclasses.fields(cls)}
    if extra:
        raise ValueError(f"{cls.__qualname__}: the docstring describes no such field: {', '.join(sorted(extra))}")
    return rows


def signature_rows(func: Callable[..., Any], owner: Any) -> list[tuple[str, str, str, str]]:
    """One row per parameter of ``func`` (``self`` aside), described in ``owner``'s ``Args:``."""
    meanings = docstring_entries(owner, "Args")
    rows = []
    for p in inspect.signature(func).parameters.values():
        if p.name == "self":
            continue
        if p.name not in meanings:
            raise ValueError(f"{owner.__qualname__}({p.name}): not described in the docstring's Args")
        default = "required" if p.default is inspect.Parameter.empty else _default_text(p.default)
        rows.append((p.name, default, "", meanings[p.name]))
    return rows


def configuration_regions() -> dict[str, str]:
    from gpuguard import CheckpointStore, GuardConfig, HealthConfig, KubernetesConfig, RetryPolicy

    return {
        "guard-config": _table(dataclass_rows(GuardConfig, "GPUGUARD_"), env=True),
        "health-config": _table(dataclass_rows(HealthConfig, "GPUGUARD_HEALTH_"), env=True),
        "kubernetes-config": _table(dataclass_rows(KubernetesConfig, "GPUGUARD_KUBERNETES_"), env=True),
        "checkpoint-store": _table(signature_rows(CheckpointStore.__init__, CheckpointStore), env=False),
        "retry-policy": _table(dataclass_rows(RetryPolicy, None), env=False),
    }


@contextlib.contextmanager
def _help_environment() -> Iterator[None]:
    """A fixed width, and none of the variables that change a default shown in --help."""
    saved = dict(os.environ)
    os.environ["COLUMNS"] = HELP_COLUMNS
    for key in list(os.environ):
        if key.startswith("GPUGUARD_") or key in ("NODE_NAME", "KUBECONFIG"):
            del os.environ[key]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to one parser
                yield from _walk(sub)


def _help_block(parser: argparse.ArgumentParser) -> str:
    text = parser.format_help().rstrip()
    return f"### `{parser.prog}`\n\n```text\n{text}\n```\n"


def cli_regions() -> dict[str, str]:
    from gpuguard.cli import build_parser
    from gpuguard.integrations.torchrun import build_parser as run_parser
    from gpuguard.k8s.node_agent import add_arguments

    with _help_environment():
        gpuguard = "\n".join(_help_block(p) for p in _walk(build_parser()))
        run = _help_block(run_parser())
        agent = argparse.ArgumentParser(prog="python -m gpuguard.k8s.node_agent", description=None)
        add_arguments(agent)
        node_agent = _help_block(agent)
    return {"cli-gpuguard": gpuguard, "cli-gpuguard-run": run, "cli-node-agent": node_agent}


def render(path: Path, regions: dict[str, str]) -> str:
    """The page with each generated region replaced; every region the generator makes must be on the page."""
    text = path.read_text("utf-8")
    seen = set()

    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in regions:
            raise ValueError(f"{path.name}: no generator for region {name!r}")
        seen.add(name)
        return match.group(1) + regions[name] + match.group(4)

    result = REGION.sub(fill, text)
    missing = set(regions) - seen
    if missing:
        raise ValueError(f"{path.name}: missing the generated regions {', '.join(sorted(missing))}")
    return result


def pages() -> dict[Path, str]:
    """Each generated page as it should read."""
    return {
        DOCS / "configuration.md": render(DOCS / "configuration.md", configuration_regions()),
        DOCS / "cli.md": render(DOCS / "cli.md", cli_regions()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a page is out of date; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in pages().items():
        if path.read_text("utf-8") != text:
            stale.append(path)
            if not args.check:
                path.write_text(text, "utf-8")
    for path in stale:
        verb = "out of date" if args.check else "rewritten"
        print(f"{path.relative_to(ROOT)}: {verb}", file=sys.stderr)
    if args.check and stale:
        print("run: python scripts/docs_reference.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
