"""Watch GPUs in the background and print every change of health, as a training job would.

python examples/watch_gpus.py                      # the real GPUs (needs an NVIDIA driver)
python examples/watch_gpus.py --scenario examples/scenarios/degrade-then-fail.json --speed 2
"""

from __future__ import annotations

import argparse
import time

import gpuguard
from gpuguard.fakenvml import FakeNvml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", help="a fault scenario for the fake NVML")
    parser.add_argument("--speed", type=float, default=1.0, help="scenario seconds per wall second")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long to watch (scenario time)")
    args = parser.parse_args()

    nvml = FakeNvml.from_scenario(args.scenario, realtime=True, speed=args.speed) if args.scenario else None
    clock = nvml.clock if nvml else time.monotonic
    start = clock()

    def on_change(change: gpuguard.HealthChange) -> None:
        gpu = change.current
        why = "; ".join(r.message for r in gpu.reasons) or "all clear"
        print(f"t={clock() - start:5.1f}s  GPU {gpu.index} {gpu.state.value:<8} {why}")

    # Poll once per scenario second, however fast the scenario runs.
    config = gpuguard.HealthConfig(poll_interval_s=1.0 / args.speed, event_wait_s=0.2)
    with gpuguard.HealthMonitor(nvml, config, devices="all") as monitor:
        snapshot = monitor.snapshot()
        if not snapshot.available:
            raise SystemExit(f"{snapshot.error}\nTry --scenario examples/scenarios/degrade-then-fail.json")
        monitor.subscribe(on_change)
        # The training loop would run here; the monitor's threads do the watching.
        while clock() - start < args.seconds:
            time.sleep(0.1)


if __name__ == "__main__":
    main()
