"""The policy ladder, table-driven over the states and remedies a GPU can have."""

from __future__ import annotations

import pytest

from gpuguard import Action, DeviceHealth, GuardConfig, HealthSnapshot, HealthState, Reason, Remedy
from gpuguard.guard import PolicyLadder

S, R = HealthState, Remedy


def snapshot(*reasons: Reason, available: bool = True) -> HealthSnapshot:
    state = max((r.state for r in reasons), key=lambda s: s.severity, default=S.HEALTHY)
    device = DeviceHealth(0, "GPU-aaaa", "00000000:00:06.0", "NVIDIA H200", state, tuple(reasons))
    return HealthSnapshot((device,) if available else (), available=available, error=None if available else "no NVML")


def reason(state: HealthState, remedy: Remedy, code: str = "X") -> Reason:
    return Reason(code, state, f"{code} happened", remedy, {"value": 1})


def ladder(**settings: object) -> PolicyLadder:
    return PolicyLadder(GuardConfig(checkpoint_dir="memory://p", **settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reasons", "action", "rung"),
    [
        ((), Action.CONTINUE, "observe"),
        ((reason(S.HEALTHY, R.OBSERVE, "XID"),), Action.CONTINUE, "observe"),
        ((reason(S.FAILING, R.RESET_GPU),), Action.RESCHEDULE, "reschedule"),
        ((reason(S.FAILING, R.REBOOT),), Action.RESCHEDULE, "reschedule"),
        ((reason(S.LOST, R.REBOOT),), Action.RESCHEDULE, "reschedule"),
        ((reason(S.DEGRADED, R.RESTART_APP),), Action.RESTART, "restart"),
        ((reason(S.DEGRADED, R.RESTART_APP), reason(S.FAILING, R.RESET_GPU)), Action.RESCHEDULE, "reschedule"),
        ((reason(S.DEGRADED, R.RESET_GPU),), Action.CONTINUE, "retry"),
        ((reason(S.DEGRADED, R.DRAIN_P2P),), Action.CONTINUE, "retry"),
        ((reason(S.UNKNOWN, R.OBSERVE),), Action.CONTINUE, "observe"),
    ],
    ids=[
        "healthy",
        "observed-xid",
        "failing",
        "reboot",
        "lost",
        "restart-app",
        "worst-wins",
        "degraded",
        "drain-p2p",
        "unknown-fail-open",
    ],
)
def test_ladder(reasons: tuple[Reason, ...], action: Action, rung: str) -> None:
    decision = ladder().decide(snapshot(*reasons), now=0.0)
    assert (decision.action, decision.rung) == (action, rung)
    if reasons:
        assert decision.device == "GPU-aaaa"
        assert decision.evidence["reasons"][0]["code"] == reasons[0].code or len(reasons) > 1


def test_fail_closed_leaves_on_unknown() -> None:
    closed = ladder(health={"fail_mode": "closed"})  # type: ignore[arg-type]
    assert closed.decide(snapshot(reason(S.UNKNOWN, R.OBSERVE)), 0.0).action is Action.RESCHEDULE
    assert closed.decide(snapshot(available=False), 0.0).action is Action.RESCHEDULE
    assert ladder().decide(snapshot(available=False), 0.0).action is Action.CONTINUE


def test_degraded_escalates_after_the_grace_period() -> None:
    policy = ladder(degraded_grace_s=60)
    degraded = snapshot(reason(S.DEGRADED, R.RESET_GPU, "ECC_SBE_RATE"))
    assert policy.decide(degraded, 0.0).rung == "retry"
    assert policy.decide(degraded, 59.0).rung == "retry"
    decision = policy.decide(degraded, 60.0)
    assert decision.action is Action.RESCHEDULE
    assert decision.evidence["degraded_for_s"] == 60.0 and decision.evidence["degraded_grace_s"] == 60


def test_degraded_escalates_when_it_keeps_coming_back() -> None:
    policy = ladder(retry_limit=3, retry_window_s=100)
    degraded, healthy = snapshot(reason(S.DEGRADED, R.RESET_GPU)), snapshot()
    actions = []
    for t in (0, 10, 20, 30, 40):
        actions.append(policy.decide(degraded, float(t)).action)
        policy.decide(healthy, t + 5.0)
    assert actions[:2] == [Action.CONTINUE, Action.CONTINUE]
    assert actions[2] is Action.RESCHEDULE


def test_old_episodes_leave_the_window() -> None:
    policy = ladder(retry_limit=2, retry_window_s=50)
    degraded, healthy = snapshot(reason(S.DEGRADED, R.RESET_GPU)), snapshot()
    assert policy.decide(degraded, 0.0).action is Action.CONTINUE
    policy.decide(healthy, 1.0)
    assert policy.decide(degraded, 100.0).action is Action.CONTINUE  # the first episode is forgotten


def test_extra_reasons_count_like_the_device_s_own() -> None:
    slow = Reason("STEP_TIME_SLOWDOWN", S.DEGRADED, "slow", R.CONTACT_SUPPORT, {"slowdown": 0.5})
    policy = ladder(degraded_grace_s=1)
    assert policy.decide(snapshot(), 0.0, {"GPU-aaaa": [slow]}).rung == "retry"
    assert policy.decide(snapshot(), 2.0, {"GPU-aaaa": [slow]}).action is Action.RESCHEDULE
