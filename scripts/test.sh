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
# The documentation site (mkdocs.yml; the API reference from the docstrings): any warning fails, a broken link
# or a docstring mkdocstrings cannot read among them. Built into a scratch folder, removed afterwards.
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --quiet --site-dir "$site" || { rm -rf "$site"; exit 1; }
rm -rf "$site"
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

# The oldest lightning and pytorch_lightning that pyproject admits (lightning>=2.5; the newest are the pinned
# ones the suite above ran): the Lightning tests that go through the private Lightning entry points
# (gpuguard/integrations/lightning/_internals.py) run against them too, from a target folder first on PYTHONPATH.
LIGHTNING_FLOOR=2.5.0
LIGHTNING_FLOOR_DIR=.venv-lightning-floor
if ! grep -qs "Version: $LIGHTNING_FLOOR\$" "$LIGHTNING_FLOOR_DIR"/lightning-*.dist-info/METADATA \
  || ! grep -qs "Version: $LIGHTNING_FLOOR\$" "$LIGHTNING_FLOOR_DIR"/pytorch_lightning-*.dist-info/METADATA; then
  rm -rf "$LIGHTNING_FLOOR_DIR"
  "$PY" -m pip install -q --no-deps --target "$LIGHTNING_FLOOR_DIR" \
    "lightning==$LIGHTNING_FLOOR" "pytorch-lightning==$LIGHTNING_FLOOR"
fi
PYTHONPATH="$LIGHTNING_FLOOR_DIR:$PWD" "$PY" -m pytest -m "not slow and not gpu" -q -p no:cacheprovider tests/test_lightning.py \
  -k "epoch_end_with or mid_epoch_bitwise or sigterm or evacuation_stops or leaves_at_once or names_the_fix or by_url"
