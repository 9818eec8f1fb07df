"""Kubernetes actions with the real ``kubernetes`` client over real HTTP, against an emulated API server.

Every test runs on each release profile (1.34-1.37), and every request the guard makes is authorized
against the Role and ClusterRole that ``gpuguard k8s manifests`` generates for the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.kube_emulator import KubeEmulator, write_kubeconfig
from helpers.kube_rules import RELEASES

from gpuguard import KubernetesError
from gpuguard.errors import ConfigError
from gpuguard.k8s import JobSpec, KubernetesActions, KubernetesConfig, connect, render
from gpuguard.k8s.actions import micro_time, truncate_bytes
from gpuguard.k8s.node_marks import RECORD_ANNOTATION
from gpuguard.k8s.pod_health import PodDeviceHealth, unhealthy_devices

UUID = "GPU-19a36126-98b4-8ad1-96d3-832414cda6ec"
UUID2 = "GPU-2b7c0c51-0d4e-4a3e-9f11-5e0c6f7e8d90"
ENV = {"POD_NAME": "trainer-0", "POD_NAMESPACE": "ml", "NODE_NAME": "node-a", "POD_UID": "uid-trainer-0"}
SA = "system:serviceaccount:ml:trainer"
# What an operator turns on to get DeviceTaintRules before they are on by default (1.37).
TAINT_RULE_GATES = {"1.34": {"DRADeviceTaints"}, "1.35": {"DRADeviceTaintRules"}, "1.36": {"DRADeviceTaintRules"}}


@pytest.fixture(scope="module", params=RELEASES, ids=[f"k8s-{r}" for r in RELEASES])
def server(request: pytest.FixtureRequest) -> Iterator[KubeEmulator]:
    """One emulated API server per release for the whole module; each test resets it."""
    emulator = KubeEmulator(release=request.param)
    emulator.url = emulator.start()  # type: ignore[attr-defined]
    yield emulator
    emulator.stop()


@pytest.fixture
def kube(server: KubeEmulator, tmp_path: Path) -> KubeEmulator:
    server.reset(device_taint_rules=True)
    server.add_pod("ml", "trainer-0", "node-a")
    server.add_node("node-a", taints=[{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}])
    server.tmp = tmp_path  # type: ignore[attr-defined]
    return server


def actions(kube: KubeEmulator, **settings: Any) -> KubernetesActions:
    """The guard's actions as a pod generated for ``settings`` runs them: its RBAC, its settings."""
    gates = TAINT_RULE_GATES.get(kube.release, set())
    spec = JobSpec(
        name="trainer",
        image="trainer:1",
        gpus=1,
        namespace="ml",
        # a generous request timeout: the emulator shares this machine's cores (tests that time it set their own)
        kubernetes=KubernetesConfig(**{"request_timeout_s": 20.0, **settings}),
        kubernetes_version=kube.release,
        feature_gates=frozenset(gates),
        evacuation_budget=None,  # counted by gpuguard-run, not by these actions (tests/test_k8s_gang.py)
    )
    objects = render(spec)
    kube.authorize(objects)
    for doc in objects:  # the ValidatingAdmissionPolicy on node patches, as kubectl apply would create it
        if doc["kind"].startswith("ValidatingAdmissionPolicy"):
            kube.create(doc)
    # a pod's bound token: it names the pod's node (KEP-4193), which the admission policy compares
    path = write_kubeconfig(kube.tmp / "kubeconfig", kube.url, kube.token_for(SA, node="node-a"))  # type: ignore[attr-defined]
    cluster = connect(dataclasses.replace(spec.actions, kubeconfig=str(path)), env=ENV)
    assert cluster is not None
    return KubernetesActions(cluster)


def evacuate(
    a: KubernetesActions, action: str = "reschedule", device: str = UUID, state: str = "FAILING", note: str = ""
) -> dict[str, tuple[str, str]]:
    evidence = {"reasons": [{"code": "XID", "evidence": {"xid": 48}}], "rung": "reschedule"}
    message = f"GPU 0 is {state}: XID 48{note}"
    outcomes = a.evacuate(device=device, state=state, message=message, evidence=evidence, action=action, exit_code=75)
    return {o.action: (o.outcome, o.detail) for o in outcomes}


def states(outcomes: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {k: v[0] for k, v in outcomes.items()}


def record(kube: KubeEmulator, node: str = "node-a") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(kube.nodes[node]["metadata"]["annotations"][RECORD_ANNOTATION])
    return data


def add_dra(kube: KubeEmulator, *, pre_created: bool, generated: bool) -> None:
    """gpu-1 (UUID) in a pre-created claim, gpu-0 in a template-generated one, as the scheduler allocates."""
    pod = kube.pods[("ml", "trainer-0")]
    if pre_created:
        pod["spec"]["resourceClaims"] = [{"name": "shared", "resourceClaimName": "team-gpus"}]
        kube.claims[("ml", "team-gpus")] = _claim("gpu-1")
    if generated:
        pod["status"]["resourceClaimStatuses"] = [{"name": "gpus", "resourceClaimName": "trainer-0-gpus-x7k2p"}]
        kube.claims[("ml", "trainer-0-gpus-x7k2p")] = _claim("gpu-0")
    kube.slices.append(
        {
            "spec": {
                "nodeName": "node-a",
                "driver": "gpu.nvidia.com",
                "pool": {"name": "node-a"},
                "devices": [
                    {"name": "gpu-0", "attributes": {"uuid": {"string": UUID2}}},
                    {"name": "gpu-1", "attributes": {"uuid": {"string": UUID}}},
                ],
            }
        }
    )


def _claim(device: str) -> dict[str, Any]:
    result = {"request": "gpus", "driver": "gpu.nvidia.com", "pool": "node-a", "device": device}
    return {"status": {"allocation": {"devices": {"results": [result]}}}}


# -- the actions, each under the generated RBAC --------------------------------------------------


def test_condition_event_and_taint_reach_the_server(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube, dra=False))
    assert states(outcomes) == {"condition": "done", "event": "done", "node-taint": "done"}, outcomes

    (patch,) = kube.received("PATCH", r"/pods/trainer-0/status$")
    assert patch.content_type == "application/strategic-merge-patch+json" and patch.user == SA
    conditions = {c["type"]: c for c in kube.pods[("ml", "trainer-0")]["status"]["conditions"]}
    assert set(conditions) == {"Ready", "PodScheduled", "gpuguard.io/GPUHealthy"}  # the kubelet's are kept
    ours = conditions["gpuguard.io/GPUHealthy"]
    assert (ours["status"], ours["reason"]) == ("False", "GPUFailing")
    assert UUID in ours["message"] and "XID 48" in ours["message"]

    (event,) = kube.events
    assert event["regarding"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "trainer-0",
        "namespace": "ml",
        "uid": "uid-trainer-0",
    }
    assert (event["type"], event["reason"], event["action"]) == ("Warning", "GPUUnhealthy", "Reschedule")
    assert UUID in event["note"] and '"xid":48' in event["note"] and "node-a" in event["note"]

    taints = kube.nodes["node-a"]["spec"]["taints"]
    assert taints[0] == {"key": "dedicated", "value": "ml", "effect": "NoSchedule"}  # others' taints kept
    assert [(t["key"], t["effect"]) for t in taints[1:]] == [("gpuguard.io/unhealthy-gpu", "NoSchedule")]
    entry = record(kube)[UUID]
    assert (entry["state"], entry["effect"], entry["pod"], entry["reasons"]) == (
        "FAILING",
        "NoSchedule",
        "ml/trainer-0",
        ["XID 48"],
    )


def test_two_gpus_failing_on_one_node_share_one_taint_and_both_are_recorded(kube: KubeEmulator) -> None:
    a = actions(kube, dra=False, event=False, condition=False)
    assert evacuate(a, device=UUID)["node-taint"][0] == "done"
    second = evacuate(a, device=UUID2)["node-taint"]
    assert second[0] == "done" and "already there" in second[1], second
    ours = [t for t in kube.nodes["node-a"]["spec"]["taints"] if t["key"] == "gpuguard.io/unhealthy-gpu"]
    assert len(ours) == 1
    assert sorted(record(kube)) == sorted([UUID, UUID2])
    assert not [r for r in kube.requests if r.status == 422]


def test_an_escalated_degraded_gpu_taints_no_schedule_never_no_execute(kube: KubeEmulator) -> None:
    """The job leaves a DEGRADED GPU only once its degradation escalated: the replacement must not come back
    (PreferNoSchedule would let it), and the node's other pods stay (NoExecute would evict them)."""
    a = actions(kube, event=False, condition=False, taint_effect="NoExecute")
    add_dra(kube, pre_created=True, generated=False)
    outcomes = evacuate(a, state="DEGRADED")
    assert outcomes["node-taint"][0] == "done" and outcomes["device-taint-rule"][0] == "done", outcomes
    ours = [
        (t["effect"], t["value"])
        for t in kube.nodes["node-a"]["spec"]["taints"]
        if t["key"] == "gpuguard.io/unhealthy-gpu"
    ]
    assert ours == [("NoSchedule", "gpuguard")]
    assert [r["spec"]["taint"]["effect"] for r in kube.taint_rules] == ["NoSchedule"]
    evacuate(a, device=UUID2)  # a FAILING GPU later: the configured NoExecute beside it
    ours = [
        (t["effect"], t["value"])
        for t in kube.nodes["node-a"]["spec"]["taints"]
        if t["key"] == "gpuguard.io/unhealthy-gpu"
    ]
    assert ours == [("NoSchedule", "gpuguard"), ("NoExecute", "gpuguard")]


def test_event_time_has_six_fractional_digits_on_the_wire_at_microsecond_zero(
    kube: KubeEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubernetes client re-serialises a datetime at microsecond 0 as ':00+00:00', which a real
    server rejects (MicroTime needs six digits): gpuguard sends the string itself."""
    import datetime as dt

    from gpuguard.k8s import actions as actions_module

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Frozen:
            return cls(2026, 11, 27, 12, 0, 0, 0, tzinfo=dt.timezone.utc)

    monkeypatch.setattr(actions_module._dt, "datetime", Frozen)
    assert evacuate(actions(kube, dra=False, condition=False, mark="none"))["event"][0] == "done"
    (sent,) = kube.received("POST", r"/events$")
    assert sent.raw is not None and b'"eventTime": "2026-11-27T12:00:00.000000Z"' in sent.raw.replace(b'":"', b'": "')


def test_conditions_merge_by_type(kube: KubeEmulator) -> None:
    a = actions(kube, dra=False, event=False, mark="none")
    evacuate(a)
    evacuate(a)
    types = [c["type"] for c in kube.pods[("ml", "trainer-0")]["status"]["conditions"]]
    assert types.count("gpuguard.io/GPUHealthy") == 1


def test_label_mode_labels_failing_and_records(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube, dra=False, mark="label", event=False, condition=False))
    assert outcomes["node-label"][0] == "done"
    assert kube.nodes["node-a"]["metadata"]["labels"] == {"gpuguard.io/unhealthy-gpu": "failing"}
    assert list(record(kube)) == [UUID]
    assert len(kube.nodes["node-a"]["spec"]["taints"]) == 1


@pytest.mark.parametrize("claims", ["generated", "pre-created", "both"])
def test_a_device_taint_rule_for_dra_allocated_gpus(kube: KubeEmulator, claims: str) -> None:
    add_dra(kube, pre_created=claims != "generated", generated=claims != "pre-created")
    wanted = UUID if claims != "generated" else UUID2  # gpu-1 is in the pre-created claim, gpu-0 generated
    outcomes = evacuate(actions(kube, event=False, condition=False, mark="none"), device=wanted)
    assert outcomes["device-taint-rule"][0] == "done", outcomes
    (rule,) = kube.taint_rules
    version = {"1.34": "v1alpha3", "1.35": "v1alpha3", "1.36": "v1beta2", "1.37": "v1"}[kube.release]
    assert rule["apiVersion"] == f"resource.k8s.io/{version}" and rule["kind"] == "DeviceTaintRule"
    device = "gpu-1" if wanted == UUID else "gpu-0"
    assert rule["spec"]["deviceSelector"] == {"driver": "gpu.nvidia.com", "pool": "node-a", "device": device}
    assert rule["spec"]["taint"] == {"key": "gpuguard.io/unhealthy-gpu", "value": wanted, "effect": "NoSchedule"}
    # claims are read at v1 on every release, never at the DeviceTaintRule's version
    assert {r.path.split("/")[3] for r in kube.received("GET", r"/resourceclaims/")} == {"v1"}


def test_a_gpu_not_allocated_to_this_pod_is_not_device_tainted(kube: KubeEmulator) -> None:
    add_dra(kube, pre_created=True, generated=False)  # only gpu-1 (UUID) is this pod's
    outcomes = evacuate(actions(kube, event=False, condition=False, mark="none"), device=UUID2)
    assert outcomes["device-taint-rule"][0] == "skipped" and kube.taint_rules == []


def test_without_device_taint_rules_served_the_step_is_skipped(kube: KubeEmulator) -> None:
    if kube.release == "1.37":
        pytest.skip("1.37 serves DeviceTaintRules by default")
    kube.reset(device_taint_rules=False)  # the release's default: the gate and API are off
    kube.add_pod("ml", "trainer-0", "node-a")
    kube.add_node("node-a")
    add_dra(kube, pre_created=True, generated=False)
    a = actions(kube, event=False, condition=False, mark="none")
    outcome, detail = evacuate(a)["device-taint-rule"]
    assert outcome == "skipped" and "not served" in detail, detail


def test_no_dra_allocation_skips_the_device_taint_rule(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube, event=False, condition=False, mark="none"))
    assert outcomes["device-taint-rule"][0] == "skipped"
    assert kube.taint_rules == []


def test_an_event_note_over_1024_bytes_is_cut_in_bytes_and_accepted(kube: KubeEmulator) -> None:
    # "°C" is 3 bytes in UTF-8 ("°" is 2): a cut by characters would leave more than 1024 bytes
    note = " temperature 93°C" * 64
    assert len((f"GPU 0 is FAILING: XID 48{note}").encode()) > 1100
    outcomes = evacuate(actions(kube, dra=False, condition=False, mark="none"), note=note)
    assert outcomes["event"][0] == "done", outcomes
    (event,) = kube.events
    assert 1000 < len(event["note"].encode()) <= 1024 and event["note"].endswith("...")


def test_micro_time_always_has_six_digits() -> None:
    import datetime as dt

    moment = dt.datetime(2026, 11, 27, 12, 0, 0, 0, tzinfo=dt.timezone.utc)
    assert micro_time(moment) == "2026-11-27T12:00:00.000000Z"
    assert truncate_bytes("°" * 10, 7) == "°°..."  # 2 + 2 bytes, then the marker: never half a character


def test_leave_by_eviction_sets_disruption_target(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube, dra=False, leave="evict"))
    assert outcomes["leave-evict"][0] == "done"
    (eviction,) = kube.received("POST", r"/pods/trainer-0/eviction$")
    assert eviction.body["kind"] == "Eviction"
    types = [c["type"] for c in kube.pods[("ml", "trainer-0")]["status"]["conditions"]]
    assert "DisruptionTarget" in types


def test_eviction_under_a_disruption_budget_is_refused_and_reported(kube: KubeEmulator) -> None:
    kube.pods[("ml", "trainer-0")]["metadata"]["labels"] = {"app": "llm"}
    pdb = {
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "llm", "namespace": "ml"},
        "spec": {"selector": {"matchLabels": {"app": "llm"}}},
        "status": {"disruptionsAllowed": 0},
    }
    assert kube.create(pdb)[0] == 201
    a = actions(kube, dra=False, leave="evict", deadline_s=1.0)
    outcome, detail = evacuate(a)["leave-evict"]
    assert outcome == "failed" and "429" in detail and "disruption budget" in detail
    assert "deletionTimestamp" not in kube.pods[("ml", "trainer-0")]["metadata"]


@pytest.mark.parametrize("grace", [None, 45])
def test_leave_by_deleting_the_pod_keeps_a_grace_period(kube: KubeEmulator, grace: int | None) -> None:
    kube.pods[("ml", "trainer-0")]["spec"]["terminationGracePeriodSeconds"] = 120
    a = actions(kube, dra=False, leave="delete", delete_grace_period_s=grace)
    assert evacuate(a)["leave-delete"][0] == "done"
    (delete,) = kube.received("DELETE", r"/pods/trainer-0$")
    assert delete.body.get("gracePeriodSeconds") == grace  # None: the pod's own applies
    pod = kube.pods[("ml", "trainer-0")]  # terminating, not gone: the process exits with its own code
    assert pod["metadata"]["deletionGracePeriodSeconds"] == (grace or 120)
    assert "DisruptionTarget" not in [c["type"] for c in pod["status"]["conditions"]]


def test_a_restart_in_place_does_not_mark_the_hardware(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube), action="restart")
    assert set(outcomes) == {"condition", "event"}
    assert kube.events[0]["action"] == "RestartInPlace"
    assert len(kube.nodes["node-a"]["spec"]["taints"]) == 1


SETTINGS = {
    "default": {},
    "label": {"mark": "label"},
    "evict": {"leave": "evict", "dra": False},
    "delete": {"leave": "delete", "mark": "none"},
    "quiet": {"condition": False, "event": False, "pod_health": False, "dra": False},
}


@pytest.mark.parametrize("settings", list(SETTINGS), ids=list(SETTINGS))
def test_the_generated_rbac_is_exactly_what_the_actions_use(kube: KubeEmulator, settings: str) -> None:
    add_dra(kube, pre_created=True, generated=False)
    a = actions(kube, **SETTINGS[settings])
    outcomes = evacuate(a)
    assert set(states(outcomes).values()) == {"done"}, outcomes
    if a.config.pod_health:
        PodDeviceHealth(a.cluster).refresh()
    assert kube.rbac is not None
    assert kube.used(SA) == kube.rbac.granted(SA, "ml")  # nothing missing (403), nothing unused


def test_403_names_the_exact_resource_and_subresource(kube: KubeEmulator) -> None:
    # pod_health off, DRA off: the Role has no pods/status get, so reading the pod is forbidden
    a = actions(kube, dra=False, pod_health=False, condition=False, event=False, mark="none")
    with pytest.raises(KubernetesError) as caught:
        a.cluster.get_pod_json()
    assert caught.value.status == 403
    assert 'add to the Role: {apiGroups: [""], resources: ["pods/status"], verbs: ["get"]}' in str(caught.value)


def test_403_names_the_rbac_rule_and_the_rest_goes_on(kube: KubeEmulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    kube.fail("PATCH", r"/pods/trainer-0/status$", 403)
    outcomes = evacuate(actions(kube, dra=False))
    state, detail = outcomes["condition"]
    assert state == "failed"
    assert detail.startswith("patch pods/status: forbidden")
    assert 'add to the Role: {apiGroups: [""], resources: ["pods/status"], verbs: ["patch"]}' in detail
    assert outcomes["event"][0] == "done" and outcomes["node-taint"][0] == "done"
    kube.fail("PATCH", r"/api/v1/nodes/node-a$", 403)
    detail = evacuate(actions(kube, dra=False))["node-taint"][1]
    assert 'add to the ClusterRole: {apiGroups: [""], resources: ["nodes"], verbs: ["patch"]}' in detail
    assert all(token not in caplog.text for token in kube.tokens)


def test_404_pod_gone_is_skipped(kube: KubeEmulator) -> None:
    del kube.pods[("ml", "trainer-0")]
    outcomes = evacuate(actions(kube, dra=False, event=False))
    assert outcomes["condition"][0] == "skipped"
    assert outcomes["node-taint"][0] == "done"


def test_409_on_the_node_is_reread_and_retried(kube: KubeEmulator) -> None:
    kube.fail("PATCH", r"/api/v1/nodes/node-a$", 409)
    assert evacuate(actions(kube, dra=False, event=False, condition=False))["node-taint"][0] == "done"
    assert len(kube.received("GET", r"/api/v1/nodes/node-a$")) == 2
    assert len(kube.received("PATCH", r"/api/v1/nodes/node-a$")) == 2


def test_a_stale_resource_version_is_a_real_409(kube: KubeEmulator) -> None:
    """Someone else changes the node between gpuguard's read and write: the emulator's own check."""
    from kubernetes import client

    a = actions(kube, dra=False, event=False, condition=False)
    core = client.CoreV1Api(a.cluster.api)
    node = a.cluster.call_json("get", "nodes", core.read_node, "node-a")
    kube.nodes["node-a"]["metadata"]["resourceVersion"] = "999999"  # another writer
    stale = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}, "spec": {"taints": []}}
    with pytest.raises(KubernetesError) as caught:
        a.cluster.call(
            "patch", "nodes", core.patch_node, "node-a", stale, _content_type="application/strategic-merge-patch+json"
        )
    assert caught.value.status == 409
    assert len(kube.nodes["node-a"]["spec"]["taints"]) == 1  # nothing written


@pytest.mark.parametrize("status", [429, 500, 503])
def test_429_and_5xx_back_off_and_succeed(kube: KubeEmulator, status: int) -> None:
    kube.fail("PATCH", r"/pods/trainer-0/status$", status, times=2)
    assert evacuate(actions(kube, dra=False, event=False, mark="none"))["condition"][0] == "done"
    assert len(kube.received("PATCH", r"/pods/trainer-0/status$")) == 3


def test_a_persistent_5xx_is_bounded_by_the_deadline(kube: KubeEmulator) -> None:
    kube.fail("PATCH", r"/pods/trainer-0/status$", 503, times=1000)
    outcomes = evacuate(actions(kube, dra=False, deadline_s=1.0))
    # Bounded by construction, not by the clock: backoffs of 0.2 s and 0.4 s fit in the 1 s deadline and
    # the next, 0.8 s, does not, so the API server sees at most 3 tries, however slow the machine.
    assert 1 <= len(kube.received("PATCH", r"/pods/trainer-0/status$")) <= 3
    assert outcomes["condition"][0] == "failed" and "503" in outcomes["condition"][1]
    # what came after ran in what was left of the deadline, or was skipped for it; nothing failed on its own
    assert all(
        outcome == "done" or detail == "deadline" for name, (outcome, detail) in outcomes.items() if name != "condition"
    )


def test_pod_reported_device_health(kube: KubeEmulator) -> None:
    kube.pods[("ml", "trainer-0")]["status"]["containerStatuses"] = [
        {
            "name": "trainer",
            "allocatedResourcesStatus": [
                {
                    "name": "nvidia.com/gpu",
                    "resources": [
                        {"resourceID": UUID, "health": "Unhealthy"},
                        {"resourceID": "GPU-00000000", "health": "Healthy"},
                    ],
                }
            ],
        }
    ]
    a = actions(kube)
    found = unhealthy_devices(a.cluster.get_pod_json())
    assert list(found) == [UUID]
    (reason,) = found[UUID]
    assert (reason.code, reason.state.value) == ("KUBELET_DEVICE_UNHEALTHY", "FAILING")
    assert reason.evidence["resource"] == "nvidia.com/gpu"


# -- without a server -------------------------------------------------------------------------------


def test_an_unreachable_server_skips_everything_fast(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{port}", "t")
    cluster = connect(KubernetesConfig(kubeconfig=str(path), dra=False), env=ENV)
    assert cluster is not None
    started = time.monotonic()
    outcomes = evacuate(KubernetesActions(cluster))
    # fast: the refused connection ends it at once, with no retry until the 10 s deadline (a 5 s margin for load)
    assert time.monotonic() - started < KubernetesConfig().deadline_s / 2
    assert outcomes["condition"][0] == "failed" and "unreachable" in outcomes["condition"][1]
    assert outcomes["event"] == ("skipped", "API server unreachable")
    assert outcomes["node-taint"] == ("skipped", "API server unreachable")


def test_in_cluster_configuration_uses_the_service_account(tmp_path: Path) -> None:
    token = "s3cret-sa-token-do-not-log"
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text(token)
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (account / "namespace").write_text("ml-team")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443", "POD_NAME": "p", "NODE_NAME": "n"}
    cluster = connect(KubernetesConfig(), env=env, service_account=account)
    assert cluster is not None
    assert (cluster.source, cluster.namespace, cluster.pod) == ("in-cluster", "ml-team", "p")
    assert cluster.api.configuration.host == "https://10.0.0.1:443"
    assert token not in repr(cluster)


def test_no_cluster_means_off_unless_required(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-kubeconfig")
    assert connect(KubernetesConfig(kubeconfig=missing), env={}) is None
    assert connect(KubernetesConfig(enabled="off"), env=ENV) is None
    with pytest.raises(KubernetesError, match=r"kubernetes\.enabled is on, but there is no service account"):
        connect(KubernetesConfig(enabled="on", kubeconfig=missing), env={})


def test_device_taint_effects_are_checked_at_configuration() -> None:
    with pytest.raises(ConfigError, match=r"kubernetes\.delete_grace_period_s: 0 is not valid"):
        KubernetesConfig(delete_grace_period_s=0)
    with pytest.raises(ConfigError, match=r"kubernetes\.taint_effect: 'PreferNoSchedule' is not valid; with dra=true"):
        KubernetesConfig(taint_effect="PreferNoSchedule")
    assert KubernetesConfig(taint_effect="PreferNoSchedule", dra=False).taint_effect == "PreferNoSchedule"
    with pytest.raises(ConfigError, match=r"kubernetes\.taint_key: 'bad key!'"):
        KubernetesConfig(taint_key="bad key!")


def test_one_pod_health_reader_per_pod_not_per_rank(kube: KubeEmulator) -> None:
    """Local rank 0 reads the pod's status; the pod's other ranks read what it shared, with no request."""
    kube.pods[("ml", "trainer-0")]["status"]["containerStatuses"] = [
        {
            "name": "trainer",
            "allocatedResourcesStatus": [
                {"name": "nvidia.com/gpu", "resources": [{"resourceID": UUID2, "health": "Unhealthy"}]}
            ],
        }
    ]
    cluster = actions(kube, dra=False).cluster
    ranks = [PodDeviceHealth(cluster, reader=True)] + [PodDeviceHealth(cluster, reader=False) for _ in range(7)]
    try:
        for rank in ranks:
            rank.refresh()
        assert len(kube.received("GET", r"/pods/trainer-0/status$")) == 1
        assert all(list(rank.reasons) == [UUID2] for rank in ranks)
        assert ranks[3].reasons[UUID2][0].code == "KUBELET_DEVICE_UNHEALTHY"
        # another pod's leftovers (same name, another UID) are not this pod's evidence
        other = PodDeviceHealth(dataclasses.replace(cluster, pod_uid="uid-someone-else"), reader=False)
        other.refresh()
        assert other.reasons == {}
    finally:
        ranks[0].file.unlink(missing_ok=True)


def test_pod_reported_health_of_a_dra_gpu_is_mapped_to_its_uuid(kube: KubeEmulator) -> None:
    add_dra(kube, pre_created=True, generated=False)
    kube.pods[("ml", "trainer-0")]["status"]["containerStatuses"] = [
        {
            "name": "trainer",
            "allocatedResourcesStatus": [
                {
                    "name": "claim:team-gpus/gpus",
                    "resources": [{"resourceID": "gpu.nvidia.com/node-a/gpu-1", "health": "Unhealthy"}],
                }
            ],
        }
    ]
    health = PodDeviceHealth(actions(kube).cluster)
    health.refresh()
    assert list(health.reasons) == [UUID]  # the UUID NVML and the guard know, not driver/pool/device
    (reason,) = health.reasons[UUID]
    assert reason.evidence["resourceID"] == "gpu.nvidia.com/node-a/gpu-1"
