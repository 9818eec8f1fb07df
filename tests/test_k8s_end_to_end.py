"""Fault -> emergency checkpoint -> condition, Event and taint on the (emulated) API server -> exit 75
-> a new process on another node resumes from the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers.kube_emulator import KubeEmulator, write_kubeconfig
from test_kubernetes import UUID

from gpuguard import CheckpointStore
from gpuguard.k8s import JobSpec, KubernetesConfig, render


def pod(
    folder: Path, kube_config: Path, pod_name: str, node: str, fault_step: int | None
) -> tuple[int, dict[str, Any]]:
    report = folder / f"{pod_name}.json"
    env = {
        **os.environ,
        "KUBECONFIG": str(kube_config),
        "GPUGUARD_KUBERNETES_ENABLED": "auto",
        "GPUGUARD_KUBERNETES_DRA": "false",
        "POD_NAME": pod_name,
        "POD_NAMESPACE": "ml",
        "NODE_NAME": node,
    }
    cmd = [
        sys.executable,
        "-m",
        "gpuguard.demo.worker",
        "--dir",
        str(folder),
        "--steps",
        "120",
        "--report",
        str(report),
    ]
    if fault_step is not None:
        cmd += ["--fault-step", str(fault_step)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert report.exists(), result.stderr[-3000:]
    assert all(token not in result.stderr + result.stdout for token in TOKENS)
    return result.returncode, json.loads(report.read_text())


TOKENS: list[str] = []


def test_fault_to_reschedule_to_resume(tmp_path: Path) -> None:
    kube = KubeEmulator(release="1.34")
    # the pods run under exactly the RBAC that the manifests grant for these settings (no DRA)
    kube.authorize(
        render(JobSpec(name="trainer", image="t:1", gpus=1, namespace="ml", kubernetes=KubernetesConfig(dra=False)))
    )
    token = kube.token_for("system:serviceaccount:ml:trainer")
    TOKENS[:] = [token]
    config = write_kubeconfig(tmp_path / "kubeconfig", kube.start(), token)
    try:
        for name, node in (("trainer-a", "node-a"), ("trainer-b", "node-b")):
            kube.add_pod("ml", name, node)
            kube.add_node(node)

        code, first = pod(tmp_path, config, "trainer-a", "node-a", fault_step=60)
        assert code == 75
        with CheckpointStore(f"file://{tmp_path / 'checkpoints'}") as store:
            latest = store.latest()
        assert latest is not None and latest.reason == "emergency" and latest.step == first["evacuated_at"]

        condition = next(
            c for c in kube.pods[("ml", "trainer-a")]["status"]["conditions"] if c["type"] == "gpuguard.io/GPUHealthy"
        )
        assert condition["status"] == "False" and latest.id in condition["message"]
        (event,) = kube.events
        assert event["regarding"]["name"] == "trainer-a" and UUID in event["note"]
        taints = kube.nodes["node-a"]["spec"]["taints"]
        assert [(t["key"], t["effect"]) for t in taints] == [("gpuguard.io/unhealthy-gpu", "NoSchedule")]
        assert UUID in kube.nodes["node-a"]["metadata"]["annotations"]["gpuguard.io/unhealthy-gpus"]
        assert not [r for r in kube.requests if r.status in (403, 422)]
        assert kube.nodes["node-b"]["spec"]["taints"] == []

        # The replacement pod lands on the untainted node and resumes where the first left off.
        code, second = pod(tmp_path, config, "trainer-b", "node-b", fault_step=None)
        assert code == 0
        assert second["resumed_at"] == first["evacuated_at"] + 1
        assert second["finished_at"] == 119
        assert len(kube.events) == 1 and kube.nodes["node-b"]["spec"]["taints"] == []
    finally:
        kube.stop()
