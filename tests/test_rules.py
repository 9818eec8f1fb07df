"""Every health rule, driven through the fake NVML and the real monitor code path.

Default thresholds: poll 1 s, onset 3 s, quiet 30 s, rate window 30 s, clock-event onset 10 s; the
recorded H200 has a slowdown threshold of 89 °C, HBM max 95 °C, PCIe x16.
"""

from __future__ import annotations

from typing import Any

import pytest

from gpuguard import HealthState, Remedy
from gpuguard.fakenvml import play

H, D, F, L, U = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.FAILING, HealthState.LOST, HealthState.UNKNOWN


def field(name: str, at: float = 1.0, **change: Any) -> dict[str, Any]:
    return {"at": at, "gpu": 0, "field": name, **change}


# (id, events, extra scenario keys, evaluate at, expected state, expected reason codes)
CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any], float, HealthState, set[str]]] = [
    ("quiet-gpu", [], {}, 60, H, set()),
    ("dbe-volatile", [field("ecc_dbe_volatile", set=1)], {}, 1, F, {"ECC_DBE_VOLATILE"}),
    # NVIDIA: a pending remap takes effect at the next reset; work may continue until then.
    ("remap-pending", [field("remap_pending", set=1)], {}, 1, D, {"ROW_REMAP_PENDING"}),
    ("remap-failure", [field("remap_failure", set=1)], {}, 1, F, {"ROW_REMAP_FAILURE"}),
    ("recovery-gpu-reset", [field("recovery_action", set="GPU_RESET")], {}, 1, F, {"RECOVERY_ACTION"}),
    ("recovery-node-reboot", [field("recovery_action", set="NODE_REBOOT")], {}, 1, F, {"RECOVERY_ACTION"}),
    ("recovery-drain-reset", [field("recovery_action", set="DRAIN_AND_RESET")], {}, 1, F, {"RECOVERY_ACTION"}),
    ("recovery-drain-p2p", [field("recovery_action", set="DRAIN_P2P")], {}, 1, D, {"RECOVERY_ACTION"}),
    ("sbe-rate-onset-not-yet", [field("ecc_sbe_volatile", add_per_s=50)], {}, 3, H, set()),
    ("sbe-rate-degraded", [field("ecc_sbe_volatile", add_per_s=50)], {}, 6, D, {"ECC_SBE_RATE"}),
    ("sbe-rate-below-threshold", [field("ecc_sbe_volatile", add_per_s=1)], {}, 40, H, set()),
    ("sbe-single-burst", [field("ecc_sbe_volatile", add=40)], {}, 40, H, set()),
    ("pcie-replay-rate", [field("pcie_replay", add_per_s=5)], {}, 10, D, {"PCIE_REPLAY_RATE"}),
    ("pcie-replay-slow", [field("pcie_replay", add_per_s=0.25)], {}, 40, H, set()),
    (
        "pcie-narrow-under-load",
        [field("pcie_link_width", set=8), field("utilization", set=90)],
        {},
        6,
        D,
        {"PCIE_LINK_DEGRADED"},
    ),
    ("pcie-narrow-idle", [field("pcie_link_width", set=8)], {}, 20, H, set()),
    ("clock-hw-slowdown-brief", [field("clock_events", set=["hw_slowdown"])], {}, 6, H, set()),
    ("clock-hw-slowdown-sustained", [field("clock_events", set=["hw_slowdown"])], {}, 12, D, {"CLOCK_EVENT"}),
    ("clock-power-brake", [field("clock_events", set=["hw_power_brake"])], {}, 12, D, {"CLOCK_EVENT"}),
    ("clock-hw-thermal", [field("clock_events", set=["hw_thermal", "gpu_idle"])], {}, 12, D, {"CLOCK_EVENT"}),
    ("clock-sw-power-cap", [field("clock_events", set=["sw_power_cap"])], {}, 30, H, set()),
    ("temperature-near-slowdown", [field("temperature", set=86)], {}, 6, D, {"TEMPERATURE_NEAR_SLOWDOWN"}),
    ("temperature-ok", [field("temperature", set=80)], {}, 20, H, set()),
    ("hbm-temperature", [field("memory_temperature", set=92)], {}, 6, D, {"MEMORY_TEMPERATURE_NEAR_MAX"}),
    ("nvlink-down", [field("nvlink_down", set=2)], {"nvlink_links": 4}, 2, F, {"NVLINK_DOWN"}),
    ("nvlink-up", [], {"nvlink_links": 4}, 20, H, set()),
    (
        "nvlink-errors",
        [field("nvlink_crc_flit_errors", add_per_s=5)],
        {"nvlink_links": 4},
        14,
        D,
        {"NVLINK_ERROR_RATE"},
    ),
    ("gpu-lost", [{"at": 1.0, "gpu": 0, "lost": True}], {}, 1, L, {"GPU_LOST"}),
    # a real XID 48 comes with a double-bit ECC count (the fake moves it: gpuguard/fakenvml/_effects.py)
    ("xid-48", [{"at": 1.0, "gpu": 0, "xid": 48}], {}, 1, F, {"XID", "ECC_DBE_VOLATILE"}),
    ("xid-13-application", [{"at": 1.0, "gpu": 0, "xid": 13}], {}, 2, H, {"XID"}),
    ("xid-79-off-the-bus", [{"at": 1.0, "gpu": 0, "xid": 79}], {}, 1, L, {"XID", "GPU_LOST"}),
    ("xid-94-contained", [{"at": 1.0, "gpu": 0, "xid": 94}], {}, 1, D, {"XID"}),
    ("event-dbe", [{"at": 1.0, "gpu": 0, "event": "double_bit_ecc"}], {}, 1, F, {"ECC_DBE_VOLATILE"}),
    (
        "event-dram-retirement-failure",
        [{"at": 1.0, "gpu": 0, "event": "dram_retirement_failure"}],
        {},
        1,
        F,
        {"ROW_REMAP_FAILURE"},
    ),
    ("event-gpu-unavailable", [{"at": 1.0, "gpu": 0, "event": "gpu_unavailable"}], {}, 1, L, {"GPU_LOST"}),
    (
        "nvml-unresponsive",
        [{"at": 1.0, "gpu": 0, "error": "Unknown"}],
        {},
        4,
        U,
        {"NVML_UNRESPONSIVE", "SIGNAL_UNREADABLE"},
    ),
    ("nvml-timeouts-retried", [{"at": 1.0, "gpu": 0, "timeouts": 2}], {}, 5, H, set()),
]


@pytest.mark.parametrize(
    ("events", "extra", "at", "state", "codes"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_rule(
    make_monitor: Any,
    events: list[dict[str, Any]],
    extra: dict[str, Any],
    at: float,
    state: HealthState,
    codes: set[str],
) -> None:
    monitor = make_monitor({"gpus": 1, "events": events, **extra})
    device = play(monitor, at).devices[0]
    assert {r.code for r in device.reasons} == codes
    assert device.state is state
    for reason in device.reasons:
        assert reason.message
        assert reason.evidence or reason.code == "XID"


def test_rate_reason_carries_its_evidence(make_monitor: Any) -> None:
    monitor = make_monitor({"gpus": 1, "events": [field("ecc_sbe_volatile", at=0.0, add_per_s=50)]})
    (reason,) = play(monitor, 40).devices[0].reasons
    assert reason.remedy is Remedy.OBSERVE  # DCGM: "Monitor - this GPU can still perform workload."
    assert reason.evidence["rate_per_min"] == pytest.approx(3000, rel=0.01)
    assert reason.evidence["threshold_per_min"] == 100
    assert reason.evidence["window_s"] == 30


def test_thresholds_are_configuration(make_monitor: Any) -> None:
    events = [field("ecc_sbe_volatile", at=0.0, add_per_s=50)]
    lenient = make_monitor({"gpus": 1, "events": events}, ecc_sbe_per_min=5000)
    assert play(lenient, 20).devices[0].state is HealthState.HEALTHY
    quick = make_monitor({"gpus": 1, "events": [field("temperature", at=0.0, set=86)]}, onset_s=0.0)
    assert play(quick, 1).devices[0].state is HealthState.DEGRADED


def test_degraded_recovers_after_a_quiet_period(make_monitor: Any) -> None:
    monitor = make_monitor({"gpus": 1, "events": [field("ecc_sbe_volatile", at=0.0, add_per_s=50, until=10.0)]})
    assert play(monitor, 8).devices[0].state is HealthState.DEGRADED
    # The storm stops at 10 s; the rate falls under the threshold once the 30 s window has passed,
    # and the reason clears after 30 s more of quiet.
    assert play(monitor, 60).devices[0].state is HealthState.DEGRADED
    assert play(monitor, 75).devices[0].state is HealthState.HEALTHY


def test_application_xid_is_shown_then_expires(make_monitor: Any) -> None:
    monitor = make_monitor({"gpus": 1, "events": [{"at": 1.0, "gpu": 0, "xid": 13}]})
    (reason,) = play(monitor, 2).devices[0].reasons
    assert reason.evidence["application"] is True
    assert reason.remedy is Remedy.OBSERVE
    assert play(monitor, 40).devices[0].reasons == ()


def test_a_fault_the_hardware_still_shows_stays_after_the_xid_s_hold(make_monitor: Any) -> None:
    # no reset: after xid_hold_s (300 s) the XID itself is over, the double-bit ECC count it brought is not
    monitor = make_monitor({"gpus": 1, "events": [{"at": 1.0, "gpu": 0, "xid": 48}]})
    device = play(monitor, 400).devices[0]
    assert device.state is HealthState.FAILING
    assert [r.code for r in device.reasons] == ["ECC_DBE_VOLATILE"]


def test_a_repeated_xid_is_counted(make_monitor: Any) -> None:
    events = [{"at": float(t), "gpu": 0, "xid": 94} for t in (1, 2, 3)]
    monitor = make_monitor({"gpus": 1, "events": events})
    (reason,) = play(monitor, 4).devices[0].reasons
    assert reason.evidence["count"] == 3
    assert reason.since == 1.0


def test_counter_reset_is_not_a_negative_rate(make_monitor: Any) -> None:
    events = [field("ecc_sbe_volatile", at=0.0, set=1000), field("ecc_sbe_volatile", at=5.0, set=0)]
    monitor = make_monitor({"gpus": 1, "events": events})
    device = play(monitor, 10).devices[0]
    assert device.state is HealthState.HEALTHY
