"""KEP-4680: the kubelet reports each allocated device's health in the pod's own status.

``status.containerStatuses[].allocatedResourcesStatus[].resources[]`` lists ``resourceID`` with
``health`` Healthy/Unhealthy/Unknown. For the NVIDIA device plugin the ID is the GPU's UUID; for a DRA
device (``name: claim:CLAIM/REQUEST``) it is ``driver/pool/device`` (pkg/kubelet/cm/dra), never the
UUID, so those IDs are mapped to UUIDs through the node's ResourceSlices (their ``uuid`` attribute).
An Unhealthy GPU is FAILING evidence for the GPU with that UUID. Read on a thread of its own, so the
guard's decisions read a cache and never wait on the API server.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from gpuguard.errors import KubernetesError
from gpuguard.health.model import HealthState, Reason, Remedy
from gpuguard.k8s.cluster import Cluster
from gpuguard.k8s.dra import Dra

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
        self._said_dra = False
        self._dra = Dra(cluster)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.cluster.config.request_timeout_s + 1)

    def refresh(self) -> None:
        try:
            found = unhealthy_devices(self.cluster.get_pod_json())
            if any(device_id.count("/") == 2 for device_id in found):
                found = self._dra_to_uuids(found)
            self.reasons = found
            self._warned = False
        except KubernetesError as exc:
            if not self._warned:  # said once until it works again
                log.warning("reading the pod's device health failed: %s", exc)
                self._warned = True

    def _dra_to_uuids(self, found: dict[str, list[Reason]]) -> dict[str, list[Reason]]:
        """Re-key DRA devices' reasons by their GPU's UUID; unmappable ones are said once and kept."""
        if not self.cluster.config.dra:
            if not self._said_dra:
                log.warning(
                    "the kubelet reports DRA devices %s Unhealthy, but kubernetes.dra is off: "
                    "gpuguard cannot map them to GPU UUIDs",
                    sorted(found),
                )
                self._said_dra = True
            return found
        uuids = {ref.resource_id: uuid for ref, uuid in self._dra.uuids(None).items()}
        mapped: dict[str, list[Reason]] = {}
        for device_id, reasons in found.items():
            mapped.setdefault(uuids.get(device_id, device_id), []).extend(reasons)
        return mapped

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.cluster.config.pod_health_interval_s)
