"""KEP-4680: the kubelet reports each allocated device's health in the pod's own status.

``status.containerStatuses[].allocatedResourcesStatus[].resources[]`` lists ``resourceID`` (the GPU's
UUID for the NVIDIA device plugin) with ``health`` Healthy/Unhealthy/Unknown. An Unhealthy GPU is
FAILING evidence for the GPU with that ID. Read on a thread of its own, so the guard's decisions read
a cache and never wait on the API server.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from gpuguard.errors import KubernetesError
from gpuguard.health.model import HealthState, Reason, Remedy
from gpuguard.k8s.cluster import Cluster

log = logging.getLogger("gpuguard.k8s")


def unhealthy_devices(pod: dict[str, Any]) -> dict[str, list[Reason]]:
    """Reasons by device ID for every device the kubelet reports Unhealthy in this pod's status."""
    found: dict[str, list[Reason]] = {}
    for container in pod.get("status", {}).get("containerStatuses", []) or []:
        for resource in container.get("allocatedResourcesStatus", []) or []:
            for device in resource.get("resources", []) or []:
                if device.get("health") != "Unhealthy":
                    continue
                device_id = str(device.get("resourceID", ""))
                found.setdefault(device_id, []).append(
                    Reason(
                        "KUBELET_DEVICE_UNHEALTHY",
                        HealthState.FAILING,
                        f"the kubelet reports {resource.get('name')} {device_id} Unhealthy in container "
                        f"{container.get('name')}",
                        Remedy.RESET_GPU,
                        {"resource": resource.get("name"), "resourceID": device_id, "container": container.get("name")},
                    )
                )
    return found


class PodDeviceHealth:
    """Polls the pod's status every ``pod_health_interval_s`` and keeps the Unhealthy devices."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.reasons: dict[str, list[Reason]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpuguard-k8s-pod-health", daemon=True)
        self._warned = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.cluster.config.request_timeout_s + 1)

    def refresh(self) -> None:
        try:
            self.reasons = unhealthy_devices(self.cluster.get_pod_json())
            self._warned = False
        except KubernetesError as exc:
            if not self._warned:  # said once until it works again
                log.warning("reading the pod's device health failed: %s", exc)
                self._warned = True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.cluster.config.pod_health_interval_s)
