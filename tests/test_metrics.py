"""GuardMetrics: the endpoint scraped over real HTTP while a scenario plays."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers.training import make_state, train_step
from prometheus_client.parser import text_string_to_metric_families

import gpuguard
from gpuguard import ConfigError, Evacuation, Guard
from gpuguard.fakenvml import FakeNvml
from gpuguard.metrics import GuardMetrics


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the endpoint serves, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 60  # a hang guard, not a timing assertion
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_endpoint_follows_a_scenario(tmp_path: Path) -> None:
    nvml = FakeNvml.from_scenario(
        {
            "gpus": 1,
            "events": [
                {"at": 0.0, "gpu": 0, "field": "temperature", "set": 41},
                # 1, plus the one XID 48 brings (gpuguard/fakenvml/_effects.py): the gauge reads 2
                {"at": 10.0, "gpu": 0, "field": "ecc_dbe_volatile", "set": 1},
                {"at": 10.0, "gpu": 0, "xid": 48},
            ],
        }
    )
    state = make_state()
    guard = Guard(f"file://{tmp_path}", state, nvml=nvml, devices="all", checkpoint_every_steps=5)
    metrics = GuardMetrics(address="127.0.0.1:0").attach(guard)
    try:
        assert metrics.port
        with pytest.raises(Evacuation), guard:
            for step in range(12):
                train_step(state["model"], state["optimizer"], state["scheduler"])
                guard.step(step)
            wait_for(lambda: not guard.periodic or all(p.done() for p in guard.periodic), "periodic saves done")
            # A future is done() before its done-callbacks (which run the hooks) have returned, and the two saves
            # report on two writer threads, in either order: wait until both hooks have run to their end (step 5's
            # too: waiting for step 10's alone raced a step-5 report still on its way on a loaded machine).
            port = metrics.port

            def both_reported() -> bool:
                now = scrape(port)
                ok = value(now, "gpuguard_checkpoints_total", reason="periodic", outcome="ok") or 0.0
                return ok >= 2.0 and value(now, "gpuguard_last_checkpoint_step") == 10.0

            wait_for(both_reported, "steps 5 and 10 reported")
            before = scrape(metrics.port)
            nvml.clock.set(11.0)
            wait_for(lambda: guard.decision.action, "the guard decides")
            guard.step(12)
        after = scrape(metrics.port)
    finally:
        metrics.close()

    uuid = guard.monitor.snapshot().devices[0].uuid if guard.monitor else ""
    assert value(before, "gpuguard_device_state", UUID=uuid, state="HEALTHY") == 1.0
    assert value(before, "gpuguard_device_state", UUID=uuid, state="FAILING") == 0.0
    assert value(before, "DCGM_FI_DEV_GPU_TEMP", UUID=uuid, gpu="0") == 41.0
    assert value(before, "gpuguard_checkpoints_total", reason="periodic", outcome="ok") == 2.0  # steps 5 and 10
    assert value(before, "gpuguard_checkpoints_total", reason="emergency", outcome="ok") is None
    assert value(before, "gpuguard_last_checkpoint_step") == 10.0

    assert value(after, "gpuguard_device_state", UUID=uuid, state="HEALTHY") == 0.0
    assert value(after, "gpuguard_device_state", UUID=uuid, state="FAILING") == 1.0
    assert value(after, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", UUID=uuid) == 2.0
    codes = {dict(ls)["code"] for (n, ls), v in after.items() if n == "gpuguard_device_reason" and v == 1.0}
    assert codes == {"ECC_DBE_VOLATILE", "XID"}
    assert value(after, "gpuguard_checkpoints_total", reason="emergency", outcome="ok") == 1.0
    assert value(after, "gpuguard_checkpoint_durable_seconds_count", reason="emergency") == 1.0
    assert value(after, "gpuguard_evacuations_total", action="RESCHEDULE", exit_code="75") == 1.0
    assert value(after, "gpuguard_last_checkpoint_step") == 12.0
    latency = value(after, "gpuguard_decision_latency_seconds")
    assert latency is not None and latency >= 0.0


def test_last_checkpoint_step_keeps_the_newest_when_saves_finish_out_of_order(tmp_path: Path) -> None:
    # Each save reports on its own writer thread, so step 5 may report after step 10.
    guard = Guard(f"file://{tmp_path}", {}, nvml=FakeNvml.replay(), devices="all")
    metrics = GuardMetrics().attach(guard)
    timings = gpuguard.SaveTimings(stall_s=0.01, durable_s=0.1)
    for step in (10, 5):
        metrics.gpuguard_checkpoint_finished(
            step=step, reason="periodic", info=None, timings=timings, error=None, tier="object storage"
        )
    assert metrics.registry.get_sample_value("gpuguard_last_checkpoint_step") == 10.0
    failed = gpuguard.StorageError("bucket gone")
    metrics.gpuguard_checkpoint_finished(
        step=15, reason="periodic", info=None, timings=timings, error=failed, tier="object storage"
    )
    assert (
        metrics.registry.get_sample_value("gpuguard_last_checkpoint_step") == 10.0
    )  # a failed save is not a checkpoint


def test_endpoint_is_off_without_an_address(tmp_path: Path) -> None:
    guard = Guard(f"file://{tmp_path}", {}, nvml=FakeNvml.replay(), devices="all")
    metrics = GuardMetrics().attach(guard)
    assert metrics.port is None
    with pytest.raises(ConfigError, match="address"):
        metrics.serve()


@pytest.mark.parametrize("address", ["9401", "localhost", "host:port", ":9401", "127.0.0.1:70000"])
def test_bad_address_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match=r"address: .* must be host:port"):
        GuardMetrics(address=address)


def test_one_guard_per_metrics(tmp_path: Path) -> None:
    metrics = GuardMetrics().attach(Guard(f"file://{tmp_path}", {}, nvml=FakeNvml.replay()))
    with pytest.raises(ConfigError, match="already attached"):
        metrics.attach(Guard(f"file://{tmp_path}", {}, nvml=FakeNvml.replay()))
    assert gpuguard.Guard is Guard
