"""mkdocs hooks: the pages in docs/ link to repository files (examples, tests, benchmark plots) by relative
paths that work on GitHub; in the built site those files are outside ``docs_dir``. Each such link whose target
exists is published with the site under ``repo/`` and the link pointed there; a folder becomes a code span.
A link to something that does not exist is left alone, so ``mkdocs build --strict`` still fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
SITE_PREFIX = "repo"
# [text](target) and ![alt](target), the target relative (no scheme, no anchor-only)
LINK = re.compile(r"(!?\[[^\]]*\])\((?!https?:|mailto:|#)([^)\s]+)\)")

_published: set[str] = set()


def _outside_target(page_src: str, target: str) -> str | None:
    """The repository path a page's relative link points to, when it lies outside docs/ and exists."""
    path, _, _anchor = target.partition("#")
    joined = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_src), path))
    if joined.startswith("docs/") or joined.startswith("../") or joined == "docs":
        return None
    return joined if (ROOT / joined).exists() else None


def on_files(files: Files, config: Any) -> Files:
    _published.clear()
    for page in list(files.documentation_pages()):
        text = Path(page.abs_src_path or "").read_text("utf-8")
        for _label, target in LINK.findall(text):
            repo_path = _outside_target(page.src_uri, target)
            if repo_path and (ROOT / repo_path).is_file() and repo_path not in _published:
                _published.add(repo_path)
                published = File(
                    f"{SITE_PREFIX}/{repo_path}",
                    src_dir=None,
                    dest_dir=config["site_dir"],
                    use_directory_urls=False,
                    dest_uri=f"{SITE_PREFIX}/{repo_path}",
                )
                published.abs_src_path = str(ROOT / repo_path)  # copied from the checkout, not from docs/
                files.append(published)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    depth = page.file.src_uri.count("/")

    def rewrite(match: re.Match[str]) -> str:
        label, target = match.group(1), match.group(2)
        repo_path = _outside_target(page.file.src_uri, target)
        if repo_path is None:
            return match.group(0)
        if repo_path in _published:
            anchor = target.partition("#")[2]
            url = "../" * depth + f"{SITE_PREFIX}/{repo_path}" + (f"#{anchor}" if anchor else "")
            return f"{label}({url})"
        return f"{label[1:-1] if not label.startswith('!') else label[2:-1]} (`{repo_path}/`)"

    return LINK.sub(rewrite, markdown)
