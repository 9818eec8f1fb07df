"""The RBAC that gpuguard's Kubernetes actions need, derived from the actions enabled.

One table says which call each action makes; the manifests grant exactly those verbs and nothing
else, and the tests run every action against an API server that authorizes with these rules, so a
missing verb (403) and an unused one (granted, never used) both fail a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpuguard.k8s.config import KubernetesConfig

DRA_GROUP = "resource.k8s.io"


@dataclass(frozen=True, order=True)
class Permission:
    """One verb on one resource (``resource/subresource`` for subresources)."""

    group: str
    resource: str
    verb: str

    @property
    def cluster_scoped(self) -> bool:
        return self.resource.split("/", maxsplit=1)[0] in CLUSTER_SCOPED


CLUSTER_SCOPED = frozenset({"nodes", "devicetaintrules", "resourceslices"})


def guard_permissions(config: KubernetesConfig) -> set[Permission]:
    """What the training pods' service account needs for ``config``'s actions.

    The pod is read through pods/status (``read_namespaced_pod_status``): the DRA claims it names and
    its KEP-4680 device health. Its UID comes from the Downward API (``POD_UID``) in the generated Job.
    """
    wanted: set[Permission] = set()
    if config.condition:
        wanted.add(Permission("", "pods/status", "patch"))
    if config.event:
        wanted.add(Permission("events.k8s.io", "events", "create"))
    if config.pod_health:
        wanted.add(Permission("", "pods/status", "get"))
    if config.mark != "none":
        # read-modify-write: the taints or labels and the record annotation, with resourceVersion
        wanted |= {Permission("", "nodes", "get"), Permission("", "nodes", "patch")}
    if config.dra:
        wanted |= {
            Permission("", "pods/status", "get"),
            Permission(DRA_GROUP, "resourceclaims", "get"),
            Permission(DRA_GROUP, "resourceslices", "list"),
            Permission(DRA_GROUP, "devicetaintrules", "create"),
        }
    if config.leave == "evict":
        wanted.add(Permission("", "pods/eviction", "create"))
    elif config.leave == "delete":
        wanted.add(Permission("", "pods", "delete"))
    return wanted


def node_check_permissions(dra: bool = False) -> set[Permission]:
    """The node check reads its node and removes gpuguard's taint, label and record from it, and with
    ``dra`` the DeviceTaintRules gpuguard created for the node's devices.

    RBAC cannot narrow this to "the node I run on" (resourceNames are fixed strings), so the node
    check runs under its own service account, apart from the training pods.
    """
    wanted = {Permission("", "nodes", "get"), Permission("", "nodes", "patch")}
    if dra:
        wanted |= {
            Permission(DRA_GROUP, "devicetaintrules", "list"),
            Permission(DRA_GROUP, "devicetaintrules", "delete"),
        }
    return wanted


def rules(permissions: set[Permission]) -> list[dict[str, Any]]:
    """PolicyRules, one per (group, resource), verbs sorted: stable output for review and diffs."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for p in sorted(permissions):
        grouped.setdefault((p.group, p.resource), []).append(p.verb)
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
        for (group, resource), verbs in grouped.items()
    ]


def split(permissions: set[Permission]) -> tuple[set[Permission], set[Permission]]:
    """(namespaced for a Role, cluster-scoped for a ClusterRole)."""
    cluster = {p for p in permissions if p.cluster_scoped}
    return permissions - cluster, cluster
