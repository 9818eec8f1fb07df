"""The reference pages in docs/ are generated from the code and cannot drift from it."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from types import ModuleType

import pytest

import gpuguard

from conftest import ROOT


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_reference"] = module
    spec.loader.exec_module(module)
    return module


def test_the_configuration_and_cli_pages_are_what_the_code_generates() -> None:
    stale = [path.name for path, text in _generator().pages().items() if path.read_text("utf-8") != text]
    assert not stale, f"{stale} out of date: run python scripts/docs_reference.py"


def test_the_configuration_page_lists_every_setting_with_its_default() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text("utf-8")
    for cls in (gpuguard.GuardConfig, gpuguard.HealthConfig, gpuguard.KubernetesConfig, gpuguard.RetryPolicy):
        for field in dataclasses.fields(cls):
            assert re.search(rf"^\| `{field.name}` \| [^|]+ \|", text, re.M), f"{cls.__name__}.{field.name}"
    assert "| `checkpoint_every_s` | `1800.0` | `GPUGUARD_CHECKPOINT_EVERY_S` |" in text
    assert "| `io_threads` | `8` |" in text


def test_a_setting_the_docstring_does_not_describe_fails_the_generation() -> None:
    @dataclasses.dataclass
    class Settings:
        """Settings.

        Attributes:
            described: a meaning.
        """

        described: int = 1
        forgotten: int = 2

    with pytest.raises(ValueError, match=r"Settings\.forgotten: not described"):
        _generator().dataclass_rows(Settings, None)


def test_the_cli_page_shows_every_command_and_option() -> None:
    from gpuguard.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text("utf-8")
    module = _generator()
    for parser in module._walk(build_parser()):
        assert f"### `{parser.prog}`" in text
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text, f"{parser.prog} {option}"
    assert "--leave-grace-s" in text and "### `gpuguard-run`" in text


def test_the_api_reference_documents_every_public_name() -> None:
    text = (ROOT / "docs" / "api.md").read_text("utf-8")
    documented = set(re.findall(r"^::: gpuguard\.(\w+)$", text, re.M))
    errors = set(vars(gpuguard.errors)) if "::: gpuguard.errors" in text else set()  # the module, every class
    missing = {name for name in gpuguard.__all__ if name not in documented | errors} - {"__version__", "hookimpl"}
    assert not missing, f"docs/api.md does not document {sorted(missing)}"
    assert "::: gpuguard.plugins" in text  # hookimpl and the hook specifications
