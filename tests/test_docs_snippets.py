"""Every fenced code block in README.md and docs/ is run or explicitly classified, so no snippet can rot.

By the block's language:

- ``python``: executed, in a fresh namespace, in a temporary folder, with ``GPUGUARD_FAKE_NVML=h200`` (a
  replayed H200) and no cluster; a snippet must therefore be complete (it builds its own tiny model);
- ``bash``/``sh``/``console``: every command line must be a ``gpuguard`` invocation (after optional
  ``VAR=value`` assignments), run as a user would and expected to exit 0;
- ``yaml``: parsed; a guard configuration (it has ``checkpoint_dir``) is loaded by ``GuardConfig.load``;
- ``json``: parsed; a fake NVML scenario (it has ``events``) is loaded by the fake NVML;
- ``text``: output or a usage synopsis, not code: nothing to run.

A block that cannot run here says why in an HTML comment on the line before its fence, which GitHub and the
site do not show: ``<!-- snippet: skip: needs a Kubernetes cluster -->``. ``<!-- snippet: slow -->`` runs it in
the slow step instead (CI's ``scripts/test.sh --slow``). Any other block fails the test: unclassified.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<kind>skip|slow)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")
SHELL = {"bash", "sh", "shell", "console"}
LANGUAGES = {"python", "yaml", "json", "text"} | SHELL
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str | None  # "skip" or "slow"
    reason: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_in(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file (indented ones in lists included), with their markers."""
    lines = path.read_text("utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(previous)
        found.append(
            Block(
                path=path,
                line=i + 1,
                language=opening.group("info").strip().split(" ")[0].lower(),
                code="\n".join(body) + "\n",
                marker=marker.group("kind") if marker else None,
                reason=(marker.group("reason") or "") if marker else "",
            )
        )
        i = j + 1
    return found


def all_blocks() -> list[Block]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [block for page in pages for block in blocks_in(page)]


BLOCKS = all_blocks()


def _param(block: Block) -> Any:
    marks = [pytest.mark.slow] if block.marker == "slow" else []
    return pytest.param(block, id=block.name, marks=marks)


def test_every_block_is_classified() -> None:
    unclassified = []
    for block in BLOCKS:
        if block.marker == "skip":
            if not block.reason:
                unclassified.append(f"{block.name}: a skip without a reason")
        elif block.language not in LANGUAGES:
            unclassified.append(f"{block.name}: language {block.language or '(none)'!r}; allowed {sorted(LANGUAGES)}")
        elif block.language in SHELL:
            for command in _shell_commands(block):
                if _gpuguard_argv(command) is None:
                    unclassified.append(f"{block.name}: {command!r} is not a gpuguard command; mark it skip: why")
    assert not unclassified, "\n".join(unclassified)
    assert len(BLOCKS) >= 10, "the pages hold fewer blocks than expected: is the extraction broken?"


def test_the_extraction_finds_indented_blocks_and_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "- a list item:\n\n  ```python\n  x = 1\n  ```\n\n<!-- snippet: skip: needs a cluster -->\n```bash\n"
        "kubectl apply -f job.yaml\n```\n\n````text\n```nested```\n````\n",
        "utf-8",
    )
    found = blocks_in(page)
    assert [(b.language, b.code, b.marker, b.reason) for b in found] == [
        ("python", "x = 1\n", None, ""),
        ("bash", "kubectl apply -f job.yaml\n", "skip", "needs a cluster"),
        ("text", "```nested```\n", None, ""),
    ]


def _shell_commands(block: Block) -> list[str]:
    commands, pending = [], ""
    for raw in block.code.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.startswith("$ "):
            line = line[2:]
        if not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append((pending + line).strip())
        pending = ""
    return commands


def _gpuguard_argv(command: str) -> tuple[dict[str, str], list[str]] | None:
    """(environment, argv) of a ``[VAR=value ...] gpuguard ...`` line, or None for anything else."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    env = {}
    while words and ENV_ASSIGNMENT.match(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if not words or words[0] != "gpuguard" or any(w in ("|", "&&", ";", ">", "<") for w in words):
        return None
    return env, words[1:]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary folder with the examples' scenarios at hand and a replayed H200 as the GPU."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPUGUARD_FAKE_NVML", "h200")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if b.language == "python" and b.marker != "skip"])
def test_python_block_runs(block: Block, sandbox: Path) -> None:
    code = compile(block.code, block.name, "exec")
    namespace: dict[str, Any] = {"__name__": "__snippet__"}
    try:
        exec(code, namespace)
    except SystemExit as exc:  # an uncaught gpuguard.Evacuation: the snippet left as a guarded job would
        pytest.fail(f"{block.name} exited with {exc.code}")


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if b.language in SHELL and b.marker != "skip"])
def test_shell_block_runs(block: Block, sandbox: Path) -> None:
    for command in _shell_commands(block):
        parsed = _gpuguard_argv(command)
        assert parsed is not None, f"{block.name}: unclassified command {command!r}"
        env, argv = parsed
        result = subprocess.run(
            [sys.executable, "-m", "gpuguard.cli", *argv],
            cwd=sandbox,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"{block.name}: {command!r} exited {result.returncode}:\n{result.stderr[-2000:]}"
        assert result.stdout.strip(), f"{block.name}: {command!r} printed nothing"


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if b.language == "yaml" and b.marker != "skip"])
def test_yaml_block_parses(block: Block, sandbox: Path) -> None:
    from gpuguard import GuardConfig

    documents = [doc for doc in yaml.safe_load_all(block.code) if doc is not None]
    assert documents, f"{block.name}: empty"
    for doc in documents:
        if isinstance(doc, dict) and "checkpoint_dir" in doc:
            config_file = sandbox / "gpuguard.yaml"
            config_file.write_text(block.code, "utf-8")
            config = GuardConfig.load(config_file, env={})
            assert config.checkpoint_dir == doc["checkpoint_dir"]


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if b.language == "json" and b.marker != "skip"])
def test_json_block_parses(block: Block) -> None:
    from gpuguard.fakenvml import FakeNvml

    doc = json.loads(block.code)
    if isinstance(doc, dict) and "events" in doc:
        fake = FakeNvml.from_scenario(doc)
        fake.nvmlInit()
        assert fake.nvmlDeviceGetCount() == doc.get("gpus", 1)
