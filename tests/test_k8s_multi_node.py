"""``gpuguard k8s manifests --nodes N`` (a JobSet) end to end against the emulated API server, on every
release: applied through the real client, the JobSet controller's child Jobs and their pods, every
node's pod resolving through the JobSet's headless Service before its startup probe passes, one pod
per node, and each pod's guard acting under the generated RBAC and admission policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.kube_emulator import ADMIN, KubeEmulator, write_kubeconfig
from helpers.kube_rules import RELEASES

from gpuguard.k8s import JobSpec, KubernetesActions, KubernetesConfig, connect, render

NODES = 3
SA = "system:serviceaccount:research:llm"


@pytest.fixture(params=RELEASES, ids=[f"k8s-{r}" for r in RELEASES])
def kube(request: pytest.FixtureRequest) -> Iterator[KubeEmulator]:
    emulator = KubeEmulator(release=request.param)
    emulator.url = emulator.start()  # type: ignore[attr-defined]
    emulator.authorize([])  # RBAC on: the Roles come from the applied manifests
    for index in range(NODES + 1):
        emulator.add_node(f"node-{index}")
    yield emulator
    emulator.stop()


def apply(kube: KubeEmulator, spec: JobSpec, tmp_path: Path) -> None:
    """kubectl apply, as an administrator, through the real client (custom resources included)."""
    from kubernetes import client, config, utils

    path = write_kubeconfig(tmp_path / "admin", kube.url, kube.token_for(ADMIN))  # type: ignore[attr-defined]
    api = config.new_client_from_config(config_file=str(path))
    try:
        for doc in render(spec):
            group, _, version = doc["apiVersion"].rpartition("/")
            if group.endswith(("x-k8s.io", "kubeflow.org")):
                plural = doc["kind"].lower() + "s"
                client.CustomObjectsApi(api).create_namespaced_custom_object(
                    group, version, spec.namespace, plural, doc
                )
            else:
                utils.create_from_dict(api, doc, namespace=spec.namespace)
    finally:
        api.close()


def test_a_jobset_gang_end_to_end(kube: KubeEmulator, tmp_path: Path) -> None:
    spec = JobSpec(
        name="llm",
        image="reg/trainer:1",
        gpus=2,
        nodes=NODES,
        namespace="research",
        kubernetes=KubernetesConfig(marker="pod"),
        node_check=False,
        kubernetes_version=kube.release,
    )
    apply(kube, spec, tmp_path)
    with kube._lock:
        for _ in range(3):
            kube.reconcile()  # the JobSet controller, the Job controller, the scheduler
    pods = {p["spec"]["hostname"]: p for (ns, _), p in kube.pods.items() if ns == "research"}
    assert sorted(pods) == [f"llm-node-{i}-0" for i in range(NODES)]
    assert len({p["spec"]["nodeName"] for p in pods.values()}) == NODES  # one pod per node
    assert {p["metadata"]["annotations"]["jobset.sigs.k8s.io/job-index"] for p in pods.values()} == {"0", "1", "2"}

    # every node's pod resolves while none is Ready (the rendezvous is on node 0's pod)
    for index in range(NODES):
        assert kube.resolve(f"llm-node-{index}-0.llm.research") == pods[f"llm-node-{index}-0"]["metadata"]["name"]
    service = kube.objects[("Service", "research", "llm")]
    service["spec"]["publishNotReadyAddresses"] = False  # the emulator's rule: without it, no name yet
    assert kube.resolve("llm-node-0-0.llm.research") is None
    service["spec"]["publishNotReadyAddresses"] = True

    # each pod's guard evacuates two GPUs under the pod's service account, its node's bound token
    for index in range(NODES):
        pod = pods[f"llm-node-{index}-0"]
        name, node = pod["metadata"]["name"], pod["spec"]["nodeName"]
        kubeconfig = write_kubeconfig(tmp_path / f"pod-{index}", kube.url, kube.token_for(SA, node=node))  # type: ignore[attr-defined]
        env = {"POD_NAME": name, "POD_NAMESPACE": "research", "NODE_NAME": node, "POD_UID": pod["metadata"]["uid"]}
        cluster = connect(dataclasses.replace(spec.actions, kubeconfig=str(kubeconfig)), env=env)
        assert cluster is not None
        guard = KubernetesActions(cluster)
        for gpu in range(2):
            outcomes = guard.evacuate(
                device=f"GPU-{index}-{gpu}",
                state="FAILING",
                message=f"GPU {gpu} is FAILING",
                evidence={"reasons": [{"code": "XID_48"}]},
                action="reschedule",
                exit_code=75,
            )
            done = {o.action: o.outcome for o in outcomes}
            assert done["condition"] == done["event"] == done["node-taint"] == "done", outcomes

    for pod in pods.values():
        ours = [c for c in pod["status"]["conditions"] if c["type"] == "gpuguard.io/GPUHealthy"]
        assert len(ours) == 1 and ours[0]["status"] == "False"
        taints = kube.nodes[pod["spec"]["nodeName"]]["spec"]["taints"]
        assert [(t["key"], t["value"], t["effect"]) for t in taints] == [
            ("gpuguard.io/unhealthy-gpu", "gpuguard", "NoSchedule")
        ]
    assert kube.nodes[f"node-{NODES}"]["spec"]["taints"] == []
    assert len(kube.events) == 2 * NODES
    assert not [r for r in kube.requests if r.status in (403, 409, 422)]
    assert kube.rbac is not None and kube.used(SA) <= kube.rbac.granted(SA, "research")
