#!/usr/bin/env bash
# Idempotent set-up: a .venv with gpuguard installed for development. Re-runs only when pyproject.toml or the
# pinned constraints change.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.gpuguard-setup
want=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "gpuguard: setting up .venv (a fresh set-up takes about 2 minutes)" >&2
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Every development dependency is pinned (scripts/constraints.txt, torch==2.13.0 among them): pip resolves without
# backtracking, and never swaps the CPU torch 2.13.0 (on this project's machines a wheel on disk) for a
# multi-GB CUDA build. Regenerate the pins with scripts/update-constraints.sh.
.venv/bin/python -m pip install -q -c scripts/constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e '.[dev]'
installed=$(.venv/bin/python -c 'import torch; print(torch.__version__)')
case "$installed" in
  2.13.0*) ;;
  *) echo "gpuguard: set-up installed torch $installed, expected 2.13.0 (CPU): check scripts/constraints.txt" >&2; exit 1 ;;
esac
echo "$want" > "$stamp"
