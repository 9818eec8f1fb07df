#!/usr/bin/env bash
# Regenerate scripts/constraints.txt: resolve the dev extra afresh in a scratch venv beside torch 2.13.0 (CPU),
# then pin everything it installed. Run after changing a dependency in pyproject.toml; commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q --upgrade pip
"$scratch/venv/bin/python" -m pip install -q torch==2.13.0
# Pin torch while resolving the rest, so the resolver cannot pick a newer (CUDA) build.
"$scratch/venv/bin/python" -m pip install -q -e '.[dev]' torch==2.13.0
{
  echo "# Pinned development and test dependencies: scripts/setup.sh and CI install with '-c' this file, so a fresh"
  echo "# set-up resolves without backtracking and never replaces the CPU torch. Regenerate: bash scripts/update-constraints.sh"
  echo "torch==2.13.0"
  "$scratch/venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|gpuguard)==' | sed 's/+cpu$//'
} > scripts/constraints.txt
echo "scripts/constraints.txt: $(grep -c '==' scripts/constraints.txt) pins" >&2
