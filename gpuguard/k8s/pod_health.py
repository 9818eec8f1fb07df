"""KEP-4680: the kubelet reports each allocated device's health in the pod's own status.

``status.containerStatuses[].allocatedResourcesStatus[].resources[]`` lists ``resourceID`` with
``health`` Healthy/Unhealthy/Unknown. For the NVIDIA device plugin the ID is the GPU's UUID; for a DRA
device (``name: claim:CLAIM/REQUEST``) it is ``driver/pool/device`` (pkg/kubelet/cm/dra), never the
UUID, so those IDs are mapped to UUIDs through the node's ResourceSlices (their ``uuid`` attribute).
An Unhealthy GPU is FAILING evidence for the GPU with that UUID. Read on a thread of its own, so the
guard's decisions read a cache and never wait on the API server.

One reader per pod, not per rank: the pod's first local rank (``LOCAL_RANK`` 0) reads the API server
and writes what it found to a file in the pod's shared memory; the other ranks of the pod read that
file (no API request). Eight ranks on a node make the requests of one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
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


def shared_file(cluster: Cluster) -> Path:
    """Where a pod's reader leaves its findings for the pod's other ranks (one container, one /dev/shm)."""
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return folder / f"gpuguard-pod-health-{cluster.namespace}-{cluster.pod}.json"


def _encode(found: dict[str, list[Reason]]) -> dict[str, list[dict[str, Any]]]:
    return {device: [r.to_dict() for r in reasons] for device, reasons in found.items()}


def _decode(data: dict[str, Any]) -> dict[str, list[Reason]]:
    return {
        str(device): [
            Reason(str(r["code"]), HealthState(r["state"]), str(r["message"]), Remedy(r["remedy"]), dict(r["evidence"]))
            for r in reasons
        ]
        for device, reasons in data.items()
    }


class PodDeviceHealth:
    """Keeps the pod's Unhealthy devices, refreshed every ``pod_health_interval_s``.

    Args:
        reader: read the API server and share the result (the pod's first local rank); False: read the
            reader's file instead. Default: ``LOCAL_RANK`` is 0 or unset.
    """

    def __init__(self, cluster: Cluster, *, reader: bool | None = None) -> None:
        self.cluster = cluster
        self.reader = os.environ.get("LOCAL_RANK", "0") == "0" if reader is None else reader
        self.file = shared_file(cluster)
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
        if not self.reader:
            self._read_shared()
            return
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
            return
        self._write_shared(found)

    def _write_shared(self, found: dict[str, list[Reason]]) -> None:
        data = {"pod_uid": self.cluster.pod_uid, "written_at": time.time(), "reasons": _encode(found)}
        partial = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
        try:
            partial.write_text(json.dumps(data))
            partial.replace(self.file)  # atomic: a reader never sees half a file
        except OSError as exc:
            if not self._warned:
                log.warning("sharing the pod's device health with its other ranks failed: %s", exc)
                self._warned = True

    def _read_shared(self) -> None:
        """The reader's findings; none while they are missing, another pod's, or stale (the reader is gone)."""
        stale_after = 3 * self.cluster.config.pod_health_interval_s + 5
        try:
            data = json.loads(self.file.read_text())
            fresh = time.time() - float(data["written_at"]) <= stale_after
            mine = data.get("pod_uid") == self.cluster.pod_uid
            self.reasons = _decode(data["reasons"]) if fresh and mine else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.reasons = {}

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
