#!/usr/bin/env bash
# The device checks, as one script for a machine with an NVIDIA GPU (H100/H200):
# real NVML through `gpuguard status`, the GPU tests, and the benchmarks at the issue's sizes.
# Writes everything under ${OUT:-./gpu-validate}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./gpu-validate}
mkdir -p "$out"
python3 -m pip install -q -e '.[dev]' 2>&1 | tail -2
nvidia-smi --query-gpu=name,uuid,driver_version --format=csv | tee "$out/nvidia-smi.csv"
gpuguard status | tee "$out/status.txt"
gpuguard status --json > "$out/status.json"
python3 -m pytest -m gpu -q tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.txt"
python3 benchmarks/nvml_poll.py --json > "$out/nvml_poll.json"
python3 benchmarks/checkpoint.py --size-mib 6144 --device cuda --repeats 2 --json > "$out/checkpoint-6g-cuda.json"
python3 benchmarks/overlap.py --device cuda --width 8192 --layers 8 --repeats 2 --json > "$out/overlap-cuda.json"
echo "results in $out"
