"""Kubernetes actions with the real ``kubernetes`` client over real HTTP, against an emulated API server."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers.kube_emulator import KubeEmulator

from gpuguard import KubernetesError
from gpuguard.k8s import KubernetesActions, KubernetesConfig, connect
from gpuguard.k8s.pod_health import unhealthy_devices

TOKEN = "s3cret-sa-token-do-not-log"
UUID = "GPU-19a36126-98b4-8ad1-96d3-832414cda6ec"
ENV = {"POD_NAME": "trainer-0", "POD_NAMESPACE": "ml", "NODE_NAME": "node-a"}


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: emu, cluster: {{server: '{server}'}}}}]\n"
        f"users: [{{name: u, user: {{token: {TOKEN}}}}}]\n"
        "contexts: [{name: c, context: {cluster: emu, user: u}}]\ncurrent-context: c\n"
    )
    return path


@pytest.fixture
def kube(tmp_path: Path) -> Any:
    emulator = KubeEmulator(token=TOKEN, dra_version="v1beta2")
    server = emulator.start()
    emulator.add_pod("ml", "trainer-0", "node-a")
    emulator.add_node("node-a", taints=[{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}])
    emulator.kubeconfig = kubeconfig(tmp_path / "kubeconfig", server)  # type: ignore[attr-defined]
    yield emulator
    emulator.stop()


def actions(kube: KubeEmulator, **settings: Any) -> KubernetesActions:
    cluster = connect(KubernetesConfig(kubeconfig=str(kube.kubeconfig), **settings), env=ENV)  # type: ignore[attr-defined]
    assert cluster is not None
    return KubernetesActions(cluster)


def evacuate(a: KubernetesActions, action: str = "reschedule") -> dict[str, tuple[str, str]]:
    evidence = {"reasons": [{"code": "XID", "evidence": {"xid": 48}}], "rung": "reschedule"}
    outcomes = a.evacuate(
        device=UUID, state="FAILING", message="GPU 0 is FAILING: XID 48", evidence=evidence, action=action, exit_code=75
    )
    return {o.action: (o.outcome, o.detail) for o in outcomes}


def test_condition_event_and_taint_reach_the_server(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube, dra=False))
    assert {k: v[0] for k, v in outcomes.items()} == {"condition": "done", "event": "done", "node-taint": "done"}

    (patch,) = kube.received("PATCH", r"/pods/trainer-0/status$")
    assert patch.content_type == "application/strategic-merge-patch+json"
    assert patch.authorization == f"Bearer {TOKEN}"
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
    assert event["reportingController"] == "gpuguard.io/guard" and event["reportingInstance"] == "trainer-0"
    assert UUID in event["note"] and '"xid":48' in event["note"] and "node-a" in event["note"]

    taints = kube.nodes["node-a"]["spec"]["taints"]
    assert taints[0] == {"key": "dedicated", "value": "ml", "effect": "NoSchedule"}  # others' taints kept
    assert {k: taints[1][k] for k in ("key", "value", "effect")} == {
        "key": "gpuguard.io/unhealthy-gpu",
        "value": UUID,
        "effect": "NoSchedule",
    }


def test_conditions_merge_by_type(kube: KubeEmulator) -> None:
    a = actions(kube, dra=False, event=False, mark="none")
    evacuate(a)
    evacuate(a)
    types = [c["type"] for c in kube.pods[("ml", "trainer-0")]["status"]["conditions"]]
    assert types.count("gpuguard.io/GPUHealthy") == 1


def test_a_taint_that_is_already_there_is_not_added_twice(kube: KubeEmulator) -> None:
    a = actions(kube, dra=False, event=False, condition=False)
    evacuate(a)
    assert "already there" in evacuate(a)["node-taint"][1]
    assert len(kube.nodes["node-a"]["spec"]["taints"]) == 2


def test_label_instead_of_taint(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube, dra=False, mark="label", event=False, condition=False))
    assert outcomes["node-label"][0] == "done"
    assert kube.nodes["node-a"]["metadata"]["labels"] == {"gpuguard.io/unhealthy-gpu": UUID}
    assert len(kube.nodes["node-a"]["spec"]["taints"]) == 1


def test_a_device_taint_rule_for_dra_allocated_gpus(kube: KubeEmulator) -> None:
    kube.pods[("ml", "trainer-0")]["status"]["resourceClaimStatuses"] = [
        {"name": "gpus", "resourceClaimName": "trainer-0-gpus"}
    ]
    kube.claims[("ml", "trainer-0-gpus")] = {
        "status": {
            "allocation": {
                "devices": {
                    "results": [
                        {"request": "gpus", "driver": "gpu.nvidia.com", "pool": "node-a", "device": "gpu-0"},
                        {"request": "gpus", "driver": "gpu.nvidia.com", "pool": "node-a", "device": "gpu-1"},
                    ]
                }
            }
        }
    }
    kube.slices.append(
        {
            "spec": {
                "nodeName": "node-a",
                "driver": "gpu.nvidia.com",
                "pool": {"name": "node-a"},
                "devices": [
                    {"name": "gpu-0", "attributes": {"uuid": {"string": "GPU-00000000"}}},
                    {"name": "gpu-1", "attributes": {"uuid": {"string": UUID}}},
                ],
            }
        }
    )
    outcomes = evacuate(actions(kube, event=False, condition=False, mark="none"))
    assert outcomes["device-taint-rule"][0] == "done", outcomes
    (rule,) = kube.taint_rules
    assert rule["apiVersion"] == "resource.k8s.io/v1beta2" and rule["kind"] == "DeviceTaintRule"
    assert rule["spec"]["deviceSelector"] == {"driver": "gpu.nvidia.com", "pool": "node-a", "device": "gpu-1"}
    assert rule["spec"]["taint"] == {"key": "gpuguard.io/unhealthy-gpu", "value": UUID, "effect": "NoSchedule"}


def test_no_dra_allocation_skips_the_device_taint_rule(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube, event=False, condition=False, mark="none"))
    assert outcomes["device-taint-rule"][0] == "skipped"
    assert kube.taint_rules == []


def test_leave_by_eviction_sets_disruption_target(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube, dra=False, leave="evict"))
    assert outcomes["leave-evict"][0] == "done"
    (eviction,) = kube.received("POST", r"/pods/trainer-0/eviction$")
    assert eviction.body["kind"] == "Eviction"
    types = [c["type"] for c in kube.pods[("ml", "trainer-0")]["status"]["conditions"]]
    assert "DisruptionTarget" in types


def test_leave_by_deleting_the_pod(kube: KubeEmulator) -> None:
    assert evacuate(actions(kube, dra=False, leave="delete"))["leave-delete"][0] == "done"
    assert ("ml", "trainer-0") not in kube.pods


def test_a_restart_in_place_does_not_mark_the_hardware(kube: KubeEmulator) -> None:
    outcomes = evacuate(actions(kube), action="restart")
    assert set(outcomes) == {"condition", "event"}
    assert kube.events[0]["action"] == "RestartInPlace"
    assert len(kube.nodes["node-a"]["spec"]["taints"]) == 1


def test_403_names_the_rbac_rule_and_the_rest_goes_on(kube: KubeEmulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    kube.fail("PATCH", r"/pods/trainer-0/status$", 403)
    outcomes = evacuate(actions(kube, dra=False))
    state, detail = outcomes["condition"]
    assert state == "failed"
    assert detail.startswith("patch pods/status: forbidden")
    assert 'add to the Role: {apiGroups: [""], resources: ["pods/status"], verbs: ["patch"]}' in detail
    assert outcomes["event"][0] == "done" and outcomes["node-taint"][0] == "done"
    kube.nodes["node-a"]["spec"]["taints"] = kube.nodes["node-a"]["spec"]["taints"][:1]
    kube.fail("PATCH", r"/api/v1/nodes/node-a$", 403)
    detail = evacuate(actions(kube, dra=False))["node-taint"][1]
    assert 'add to the ClusterRole: {apiGroups: [""], resources: ["nodes"], verbs: ["patch"]}' in detail
    assert TOKEN not in caplog.text and all(TOKEN not in d for _, d in outcomes.values())


def test_404_pod_gone_is_skipped(kube: KubeEmulator) -> None:
    del kube.pods[("ml", "trainer-0")]
    outcomes = evacuate(actions(kube, dra=False))
    assert outcomes["condition"][0] == "skipped" and outcomes["event"][0] == "skipped"
    assert outcomes["node-taint"][0] == "done"


def test_409_on_the_node_is_reread_and_retried(kube: KubeEmulator) -> None:
    kube.fail("PATCH", r"/api/v1/nodes/node-a$", 409)
    assert evacuate(actions(kube, dra=False, event=False, condition=False))["node-taint"][0] == "done"
    assert len(kube.received("GET", r"/api/v1/nodes/node-a$")) == 2
    assert len(kube.received("PATCH", r"/api/v1/nodes/node-a$")) == 2


@pytest.mark.parametrize("status", [429, 500, 503])
def test_429_and_5xx_back_off_and_succeed(kube: KubeEmulator, status: int) -> None:
    kube.fail("PATCH", r"/pods/trainer-0/status$", status, times=2)
    assert evacuate(actions(kube, dra=False, event=False, mark="none"))["condition"][0] == "done"
    assert len(kube.received("PATCH", r"/pods/trainer-0/status$")) == 3


def test_a_persistent_5xx_is_bounded_by_the_deadline(kube: KubeEmulator) -> None:
    import time

    kube.fail("PATCH", r"/pods/trainer-0/status$", 503, times=1000)
    started = time.monotonic()
    outcomes = evacuate(actions(kube, dra=False, deadline_s=1.0))
    assert time.monotonic() - started < 3.0
    assert outcomes["condition"][0] == "failed"


def test_an_unreachable_server_skips_everything_fast(tmp_path: Path) -> None:
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = connect(
        KubernetesConfig(kubeconfig=str(kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{port}")), dra=False), env=ENV
    )
    assert cluster is not None
    started = time.monotonic()
    outcomes = evacuate(KubernetesActions(cluster))
    assert time.monotonic() - started < 3.0
    assert outcomes["condition"][0] == "failed" and "unreachable" in outcomes["condition"][1]
    assert outcomes["event"] == ("skipped", "API server unreachable")
    assert outcomes["node-taint"] == ("skipped", "API server unreachable")


def test_in_cluster_configuration_uses_the_service_account(tmp_path: Path) -> None:
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text(TOKEN)
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (account / "namespace").write_text("ml-team")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443", "POD_NAME": "p", "NODE_NAME": "n"}
    cluster = connect(KubernetesConfig(), env=env, service_account=account)
    assert cluster is not None
    assert (cluster.source, cluster.namespace, cluster.pod) == ("in-cluster", "ml-team", "p")
    assert cluster.api.configuration.host == "https://10.0.0.1:443"
    assert TOKEN not in repr(cluster)


def test_no_cluster_means_off_unless_required(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-kubeconfig")
    assert connect(KubernetesConfig(kubeconfig=missing), env={}) is None
    assert connect(KubernetesConfig(enabled="off"), env=ENV) is None
    with pytest.raises(KubernetesError, match=r"kubernetes\.enabled is on, but there is no service account"):
        connect(KubernetesConfig(enabled="on", kubeconfig=missing), env={})


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
