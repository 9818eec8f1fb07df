#!/usr/bin/env bash
# The test command: set up if needed, then ruff, mypy and pytest. `--slow` runs only the slow marker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
if [ "${1:-}" = "--slow" ]; then
  shift
  status=0
  "$PY" -m pytest -m slow -q "$@" || status=$?
  # pytest exits 5 when no slow test was collected: nothing failed
  [ "$status" -eq 0 ] || [ "$status" -eq 5 ]
  exit 0
fi
"$PY" -m ruff check gpuguard tests benchmarks examples
"$PY" -m ruff format --check gpuguard tests benchmarks examples
"$PY" -m mypy
"$PY" -m pytest -m "not slow and not gpu" -q "$@"
