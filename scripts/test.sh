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

# The lowest nvidia-ml-py that pyproject admits (nvidia-ml-py>=12.535): the health tests run against it
# too, from a small target folder placed first on PYTHONPATH (the venv's own copy is left alone).
NVML_FLOOR=12.535.77
FLOOR_DIR=.venv-nvml-floor
if ! grep -qs "Version: $NVML_FLOOR" "$FLOOR_DIR"/nvidia_ml_py-*.dist-info/METADATA; then
  rm -rf "$FLOOR_DIR"
  "$PY" -m pip install -q --no-deps --target "$FLOOR_DIR" "nvidia-ml-py==$NVML_FLOOR"
fi
PYTHONPATH="$FLOOR_DIR:$PWD" "$PY" -m pytest -m "not slow and not gpu" -q -p no:cacheprovider \
  tests/test_fakenvml.py tests/test_monitor.py tests/test_rules.py tests/test_cli_status.py tests/test_xid.py \
  tests/test_devices.py tests/test_nvml_errors.py tests/test_nvml_faults.py tests/test_health_blind_spots.py \
  tests/test_health_recovery.py tests/test_mig.py tests/test_fake_scenarios.py tests/test_job_scope.py
