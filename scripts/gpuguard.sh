#!/usr/bin/env bash
# Run the gpuguard command line from a fresh checkout: sets up .venv on first use.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
exec "$here/.venv/bin/gpuguard" "$@"
