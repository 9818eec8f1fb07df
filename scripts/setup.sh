#!/usr/bin/env bash
# Idempotent set-up: a .venv with gpuguard installed for development. Re-runs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.gpuguard-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "gpuguard: setting up .venv (first run takes a few minutes)" >&2
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.13.0 is a CPU wheel (on this project's machines it lies on disk): installing it first keeps
# pip from fetching a multi-GB CUDA build to satisfy the package's torch range.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
echo "$want" > "$stamp"
