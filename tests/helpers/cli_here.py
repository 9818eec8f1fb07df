"""The ``gpuguard`` command line run in this process: the same entry point as the installed command
(``gpuguard.cli.main``), without a fresh interpreter's start-up per call.

tests/test_cli_status.py runs the command in a fresh process as a user does; the many scenario cases of
the health tests go through here to keep the CI suite fast.
"""

from __future__ import annotations

import contextlib
import io
import subprocess

from gpuguard.cli import main


def run_here(*args: str) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["gpuguard", *args], code, out.getvalue(), err.getvalue())
