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
    names: tuple[str, ...] = ()  # resourceNames: only these objects

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
    if config.mark != "none" and config.marker == "agent":
        # the report on its own pod (read-modify-write through pods/status), then the node agent's answer
        wanted |= {
            Permission("", "pods/status", "get"),
            Permission("", "pods/status", "patch"),
            Permission("events.k8s.io", "events", "list"),
        }
    elif config.mark != "none":
        # read-modify-write: the taints or labels and the record annotation, with resourceVersion
        wanted |= {Permission("", "nodes", "get"), Permission("", "nodes", "patch")}
    if config.dra:
        wanted |= {
            Permission("", "pods/status", "get"),
            Permission(DRA_GROUP, "resourceclaims", "get"),
            Permission(DRA_GROUP, "resourceslices", "list"),
        }
        if config.marker == "pod":
            wanted.add(Permission(DRA_GROUP, "devicetaintrules", "create"))
    if config.evacuation_budget:
        # the pod reads its labels (the gang's attempt) and counts the incident in the budget's ConfigMap
        budget = (config.evacuation_budget,)
        wanted |= {
            Permission("", "pods/status", "get"),
            Permission("", "configmaps", "get", budget),
            Permission("", "configmaps", "update", budget),
            Permission("events.k8s.io", "events", "create"),
        }
    if config.leave == "evict":
        wanted.add(Permission("", "pods/eviction", "create"))
    elif config.leave == "delete":
        wanted.add(Permission("", "pods", "delete"))
    return wanted


def node_check_permissions(dra: bool = False, *, mark_reports: bool = True) -> set[Permission]:
    """The node agent reads its node, marks it on the reports of the pods running there (listing them,
    answering each with an Event in the pod's namespace), and removes gpuguard's own taint, label and
    record once healed; with ``dra`` it also creates and deletes gpuguard's DeviceTaintRules.

    RBAC cannot narrow this to "the node I run on" (resourceNames are fixed strings): the node agent
    runs under its own service account, apart from the training pods, and the generated
    ValidatingAdmissionPolicy keeps its node patches to its own node (its token's node name).
    """
    wanted = {Permission("", "nodes", "get"), Permission("", "nodes", "patch")}
    if mark_reports:
        wanted |= {Permission("", "pods", "list"), Permission("events.k8s.io", "events", "create")}
    if dra:
        wanted |= {
            Permission(DRA_GROUP, "devicetaintrules", "list"),
            Permission(DRA_GROUP, "devicetaintrules", "delete"),
        }
        if mark_reports:
            wanted.add(Permission(DRA_GROUP, "devicetaintrules", "create"))
    return wanted


def rules(permissions: set[Permission]) -> list[dict[str, Any]]:
    """PolicyRules, one per (group, resource), verbs sorted: stable output for review and diffs."""
    grouped: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
    for p in sorted(permissions):
        grouped.setdefault((p.group, p.resource, p.names), []).append(p.verb)
    return [
        {
            "apiGroups": [group],
            "resources": [resource],
            **({"resourceNames": list(names)} if names else {}),
            "verbs": sorted(verbs),
        }
        for (group, resource, names), verbs in grouped.items()
    ]


def split(permissions: set[Permission]) -> tuple[set[Permission], set[Permission]]:
    """(namespaced for a Role, cluster-scoped for a ClusterRole)."""
    cluster = {p for p in permissions if p.cluster_scoped}
    return permissions - cluster, cluster
