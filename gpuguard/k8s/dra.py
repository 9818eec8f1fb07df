"""DRA (resource.k8s.io): which device a GPU's UUID is, and a DeviceTaintRule for it.

Each resource is looked up at its own served version. They differ per release: on 1.34 and 1.35
``resource.k8s.io/v1alpha3`` serves only DeviceTaintRule while ResourceClaims and ResourceSlices are
served from v1 (and v1beta2, v1beta1); 1.36 adds DeviceTaintRule to v1beta2, 1.37 to v1
(pkg/registry/resource/rest/storage_resource.go per release; pkg/features/kube_features.go:
DRADeviceTaints alpha 1.33, beta 1.36, GA 1.37; DRADeviceTaintRules alpha 1.35, off-by-default beta
1.36, GA 1.37).

A pod's claims are of two kinds: pre-created ones named in ``spec.resourceClaims[].resourceClaimName``
and template-generated ones listed in ``status.resourceClaimStatuses``. A claim's allocation names
devices as driver/pool/device; the node's ResourceSlices carry each device's ``uuid`` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from gpuguard.errors import KubernetesError
from gpuguard.k8s.cluster import Cluster

GROUP: Final = "resource.k8s.io"
NODE_ANNOTATION: Final = "gpuguard.io/node"
MANAGED: Final = "app.kubernetes.io/managed-by=gpuguard"
# newest first; a resource is used at the first of these that serves it
CANDIDATES: Final = {
    "devicetaintrules": ("v1", "v1beta2", "v1alpha3"),
    "resourceclaims": ("v1", "v1beta2", "v1beta1"),
    "resourceslices": ("v1", "v1beta2", "v1beta1"),
}


@dataclass(frozen=True)
class DeviceRef:
    driver: str
    pool: str
    device: str

    @property
    def resource_id(self) -> str:
        """KEP-4680's ``resourceID`` for a DRA device (pkg/kubelet/cm/dra: driver/pool/device)."""
        return f"{self.driver}/{self.pool}/{self.device}"


@dataclass
class Dra:
    """DRA lookups for one pod, with the discovery answers cached (they do not change under a pod)."""

    cluster: Cluster
    _served: dict[str, str | None] = field(default_factory=dict)
    _groups: set[str] | None = None

    def version(self, resource: str, deadline: float | None) -> str | None:
        """The newest version of resource.k8s.io that serves ``resource``, or None."""
        if resource in self._served:
            return self._served[resource]
        from kubernetes import client

        cl = self.cluster
        if self._groups is None:
            groups = cl.call_json("get", "apis", client.ApisApi(cl.api).get_api_versions, deadline=deadline)
            self._groups = {
                v["version"] for g in groups.get("groups", []) if g.get("name") == GROUP for v in g.get("versions", [])
            }
        custom = client.CustomObjectsApi(cl.api)
        for version in CANDIDATES[resource]:
            if version not in self._groups:
                continue
            listing = cl.call_json("get", GROUP, custom.get_api_resources, GROUP, version, deadline=deadline)
            names = {r.get("name") for r in listing.get("resources", [])}
            for name in names:  # cache every resource this version answers for
                if name in CANDIDATES and name not in self._served and version in CANDIDATES[name]:
                    self._served[name] = version
            if resource in names:
                return version
        self._served[resource] = None
        return None

    def _need(self, resource: str, deadline: float | None) -> str:
        version = self.version(resource, deadline)
        if version is None:
            raise KubernetesError(
                f"{GROUP} {resource} are not served by this API server", status=404, verb="get", resource=resource
            )
        return version

    def allocated(self, pod: dict[str, Any], deadline: float | None) -> list[DeviceRef]:
        """The devices of ``dra_driver`` allocated to the pod's claims, pre-created and generated."""
        from kubernetes import client

        cl = self.cluster
        names = [c.get("resourceClaimName") for c in pod.get("spec", {}).get("resourceClaims", []) or []]
        names += [s.get("resourceClaimName") for s in pod.get("status", {}).get("resourceClaimStatuses", []) or []]
        names = list(dict.fromkeys(n for n in names if n))
        if not names:
            return []
        version = self._need("resourceclaims", deadline)
        custom = client.CustomObjectsApi(cl.api)
        found: list[DeviceRef] = []
        for name in names:
            claim = cl.call_json(
                "get",
                "resourceclaims",
                custom.get_namespaced_custom_object,
                GROUP,
                version,
                cl.namespace,
                "resourceclaims",
                name,
                group=GROUP,
                deadline=deadline,
            )
            results = ((claim.get("status") or {}).get("allocation") or {}).get("devices", {}).get("results", [])
            for r in results or []:
                if r.get("driver") == cl.config.dra_driver:
                    found.append(DeviceRef(r["driver"], r["pool"], r["device"]))
        return list(dict.fromkeys(found))

    def uuids(self, deadline: float | None) -> dict[DeviceRef, str]:
        """Every device of ``dra_driver`` on this node with its ``uuid`` attribute."""
        from kubernetes import client

        cl = self.cluster
        version = self._need("resourceslices", deadline)
        custom = client.CustomObjectsApi(cl.api)
        slices = cl.call_json(
            "list",
            "resourceslices",
            custom.list_cluster_custom_object,
            GROUP,
            version,
            "resourceslices",
            group=GROUP,
            field_selector=f"spec.nodeName={cl.node}",
            deadline=deadline,
        )
        found: dict[DeviceRef, str] = {}
        for item in slices.get("items", []):
            spec = item.get("spec", {})
            if spec.get("driver") != cl.config.dra_driver:
                continue
            pool = str(spec.get("pool", {}).get("name", ""))
            for dev in spec.get("devices", []) or []:
                # v1 and v1beta2 put attributes on the device; v1beta1 under "basic"
                attributes = dev.get("attributes") or (dev.get("basic") or {}).get("attributes") or {}
                uuid = (attributes.get("uuid") or {}).get("string")
                if uuid:
                    found[DeviceRef(spec["driver"], pool, dev["name"])] = str(uuid)
        return found

    def device_for(self, uuid: str, deadline: float | None) -> DeviceRef | None:
        """The DRA device allocated to this pod whose UUID is ``uuid``; None when there is none."""
        allocated = self.allocated(self.cluster.get_pod_json(deadline), deadline)
        if not allocated:
            return None
        by_uuid = {u: ref for ref, u in self.uuids(deadline).items()}
        ref = by_uuid.get(uuid)
        return ref if ref in allocated else None

    def taint(self, ref: DeviceRef, uuid: str, deadline: float | None, *, effect: str | None = None) -> str:
        """Create a DeviceTaintRule for ``ref`` on this cluster's node; one that is already there is fine."""
        from kubernetes import client

        cl, c = self.cluster, self.cluster.config
        version = self._need("devicetaintrules", deadline)
        # metadata.name is a DNS subdomain (253): lowercase, the node's name may hold dots
        name = f"gpuguard-{(cl.node or 'node').lower()[:200]}-{uuid.lower().removeprefix('gpu-')[:8]}"
        body = {
            "apiVersion": f"{GROUP}/{version}",
            "kind": "DeviceTaintRule",
            "metadata": {
                "name": name,
                "labels": {"app.kubernetes.io/managed-by": "gpuguard"},
                # which node's check may remove it (a node's name can be longer than a label value)
                "annotations": {NODE_ANNOTATION: cl.node, "gpuguard.io/uuid": uuid},
            },
            "spec": {
                "deviceSelector": {"driver": ref.driver, "pool": ref.pool, "device": ref.device},
                "taint": {"key": c.taint_key, "value": uuid, "effect": effect or c.taint_effect},
            },
        }
        try:
            cl.call(
                "create",
                "devicetaintrules",
                client.CustomObjectsApi(cl.api).create_cluster_custom_object,
                GROUP,
                version,
                "devicetaintrules",
                body,
                group=GROUP,
                deadline=deadline,
            )
        except KubernetesError as exc:
            if exc.status != 409:
                raise
            return f"DeviceTaintRule {name} already there"
        return f"DeviceTaintRule {name} ({version}) for {ref.resource_id}"

    def remove_rules(self, node: str, deadline: float | None = None) -> list[str]:
        """Delete the DeviceTaintRules gpuguard created for devices on ``node``; others' stay."""
        from kubernetes import client

        version = self.version("devicetaintrules", deadline)
        if version is None:
            return []
        cl = self.cluster
        custom = client.CustomObjectsApi(cl.api)
        rules = cl.call_json(
            "list",
            "devicetaintrules",
            custom.list_cluster_custom_object,
            GROUP,
            version,
            "devicetaintrules",
            group=GROUP,
            label_selector=MANAGED,
            deadline=deadline,
        )
        removed = []
        for rule in rules.get("items", []):
            meta = rule.get("metadata", {})
            if (meta.get("annotations") or {}).get(NODE_ANNOTATION) != node:
                continue
            try:
                cl.call(
                    "delete",
                    "devicetaintrules",
                    custom.delete_cluster_custom_object,
                    GROUP,
                    version,
                    "devicetaintrules",
                    meta["name"],
                    group=GROUP,
                    deadline=deadline,
                )
            except KubernetesError as exc:
                if exc.status != 404:  # gone already is what was wanted
                    raise
            removed.append(f"DeviceTaintRule {meta['name']}")
        return removed
