#!/usr/bin/env bash
# What CPUs cannot check, on one H100/H200, in about six minutes, into one JSON file:
# real NVML (health and poll cost), the guard on a real CUDA step, the 6 GiB emergency checkpoint beside
# torch.save and DCP async_save, and the snapshot overlapping the next step on CUDA.
#
#   bash benchmarks/gpu_validate.sh            # writes ${OUT:-./gpu-validate}/gpu-validate.json (+ logs)
#
# It installs nothing: device machines often have no network, and their CUDA torch must stay as it is
# (installing the dev extra would pull a different torch). It runs the working tree through PYTHONPATH
# with the python that has torch+CUDA (PYTHON=... to choose), and says what is missing if anything is.
# Budget on an H200 (16 cores): tests ~20 s, NVML ~15 s, guard ~30 s, checkpoint 6 GiB x 2 repeats ~150 s
# (the states are built once; settle 1 s) plus ~60 s for the resume in a new process (gpuguard's through
# pinned memory while the next bytes are read, against torch.load's), overlap ~20 s.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./gpu-validate}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...: stdout to NAME.json (or .txt), stderr to NAME.log, never stops the run
    local name=$1 limit=$2
    shift 2
    echo "[gpu_validate] $name" >&2
    timeout "$limit" "$@" >"$out/$name.out" 2>"$out/$name.log"
    echo $? >"$out/$name.rc"
}

"$py" - <<'EOF' >"$out/environment.json" 2>"$out/environment.log"
import importlib, json, platform
mods = {}
for name in ("torch", "pynvml", "fsspec", "safetensors", "crc32c", "yaml", "pluggy", "kubernetes", "pytest"):
    try:
        mods[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as exc:  # noqa: BLE001 - report, do not stop
        mods[name] = f"MISSING: {exc}"
import torch
print(json.dumps({"python": platform.python_version(), "modules": mods, "cuda": torch.cuda.is_available(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
EOF
nvidia-smi --query-gpu=name,uuid,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv >"$out/nvidia-smi.csv" 2>&1

step status 30 "$py" -m gpuguard status --json
step pytest_gpu 120 "$py" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
step nvml_poll 60 "$py" benchmarks/nvml_poll.py --cycles 1000 --repeats 3 --json
step guard_overhead 90 "$py" benchmarks/guard_overhead.py --device cuda --width 4096 --steps 100 --repeats 3 --json
step checkpoint_6g 420 "$py" benchmarks/checkpoint.py --size-mib 6144 --device cuda --repeats 2 --settle-s 1 --json
step overlap 90 "$py" benchmarks/overlap.py --device cuda --width 8192 --layers 8 --repeats 2 --json

# One file: every step's JSON (or its error), the environment and the wall time.
"$py" - "$out" "$started" <<'EOF'
import json, os, sys, time
out, started = sys.argv[1], float(sys.argv[2])
report = {"environment": json.load(open(f"{out}/environment.json")) if os.path.getsize(f"{out}/environment.json") else None,
          "nvidia_smi": open(f"{out}/nvidia-smi.csv").read(), "steps": {}}
for name in ("status", "pytest_gpu", "nvml_poll", "guard_overhead", "checkpoint_6g", "overlap"):
    rc = int(open(f"{out}/{name}.rc").read().strip() or 1)
    text = open(f"{out}/{name}.out").read()
    try:
        value = json.loads(text)
    except ValueError:
        value = text[-4000:]
    report["steps"][name] = {"rc": rc, "timed_out": rc == 124, "result": value,
                             "stderr_tail": open(f"{out}/{name}.log").read()[-2000:] if rc else ""}
report["wall_s"] = round(time.time() - started, 1)
json.dump(report, open(f"{out}/gpu-validate.json", "w"), indent=2)
failed = [n for n, s in report["steps"].items() if s["rc"] != 0]
print(f"gpu_validate: {report['wall_s']} s; {'failed: ' + ', '.join(failed) if failed else 'every step passed'}; "
      f"{out}/gpu-validate.json")
sys.exit(1 if failed else 0)
EOF
