"""The objects around the workload that keep it safe: the node agent, the health-evacuation budget, and
the ValidatingAdmissionPolicy that keeps node patches to the patcher's own node and gpuguard's marks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from gpuguard.k8s import rbac
from gpuguard.k8s.node_marks import OWNER, RECORD_ANNOTATION

if TYPE_CHECKING:
    from gpuguard.k8s.manifests import JobSpec

HEALTH_PORT: Final = 8081
# KEP-4193 (kubernetes/enhancements keps/sig-auth/4193-bound-service-account-token-improvements, GA 1.32,
# gate ServiceAccountTokenPodNodeInfo): a pod's bound token names its node in the user's extra.
NODE_NAME_EXTRA: Final = "authentication.kubernetes.io/node-name"


def budget(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    """The health-evacuation budget, owned by nobody: deleting or recreating the workload keeps it.

    Only ``limit`` is applied; the pods add ``incidents``, which a later ``kubectl apply`` of the same
    output leaves alone (a key the applied object never had).
    """
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": spec.budget_name, "namespace": spec.namespace, "labels": labels},
        "data": {"limit": str(spec.evacuation_budget)},
    }


RoleMaker = Callable[[str, dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]]


def node_agent(spec: JobSpec, labels: dict[str, str], role_and_binding: RoleMaker) -> list[dict[str, Any]]:
    """The node agent: a DaemonSet under its own service account, a minimal entry point (no torch)."""
    name = f"{spec.name}-node-check"
    meta = {"name": name, "namespace": spec.namespace, "labels": labels}
    subjects = [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}]
    cluster_meta = {"name": f"{spec.name}-{spec.namespace}-node-check", "labels": labels}
    c = spec.actions
    selector = {"app.kubernetes.io/name": name}
    marks = c.marker == "agent"
    container = {
        "name": "node-agent",
        "image": spec.node_agent_image or spec.image,
        "command": [
            "python",
            "-m",
            "gpuguard.k8s.node_agent",
            f"--quiet-period={spec.node_check_quiet_period_s}",
            f"--taint-key={c.taint_key}",
            f"--taint-effect={c.taint_effect}",
            f"--mark={c.mark}",
            f"--health-port={HEALTH_PORT}",
            *(["--dra"] if c.dra else []),
            *([] if marks else ["--no-mark-reports"]),
        ],
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            # NVML needs the node's GPUs without allocating them (the NVIDIA container runtime's way)
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
        ],
        # not ready while it sees no GPU or cannot reach the API server: it could neither mark nor give back
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": HEALTH_PORT}, "periodSeconds": 30},
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    }
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**labels, **selector}},
                "spec": {
                    "serviceAccountName": name,
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    # it must run exactly where gpuguard's taint keeps everything else off
                    "tolerations": [{"key": c.taint_key, "operator": "Exists"}],
                    "containers": [container],
                },
            },
        },
    }
    permissions = rbac.rules(rbac.node_check_permissions(c.dra, mark_reports=marks))
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        *role_and_binding("ClusterRole", cluster_meta, permissions, subjects),
        daemonset,
    ]


def node_patch_policy(spec: JobSpec, labels: dict[str, str], accounts: list[str]) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy: the service accounts that may patch nodes (RBAC cannot say "my node")
    change only the node their pod runs on, and on it only gpuguard's taint, label and record."""
    key = spec.kubernetes.taint_key
    users = ", ".join(f"'system:serviceaccount:{spec.namespace}:{a}'" for a in accounts)
    not_ours = f"!(t.key == '{key}' && has(t.value) && t.value == '{OWNER}')"

    def unchanged_but(part: str, allowed: str) -> str:
        old, new = f"variables.old{part}", f"variables.new{part}"
        return (
            f"{old}.all(k, k == '{allowed}' || (k in {new} && {new}[k] == {old}[k])) && "
            f"{new}.all(k, k == '{allowed}' || k in {old})"
        )

    def either(obj: str, path: str, default: str) -> str:
        return f"(has({obj}.{path}) ? {obj}.{path} : {default})"

    empty = "''"
    spec_unchanged = " && ".join(
        f"{either('object', path, default)} == {either('oldObject', path, default)}"
        for path, default in (("spec.unschedulable", "false"), ("spec.podCIDRs", "[]"), ("spec.providerID", empty))
    )
    name = f"{spec.name}-{spec.namespace}-gpuguard-nodes"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}
                ]
            },
            "matchConditions": [
                {"name": "gpuguard-node-patchers", "expression": f"request.userInfo.username in [{users}]"}
            ],
            "variables": [
                {"name": "oldTaints", "expression": either("oldObject", "spec.taints", "[]")},
                {"name": "newTaints", "expression": either("object", "spec.taints", "[]")},
                {"name": "oldLabels", "expression": either("oldObject", "metadata.labels", "{}")},
                {"name": "newLabels", "expression": either("object", "metadata.labels", "{}")},
                {"name": "oldAnnotations", "expression": either("oldObject", "metadata.annotations", "{}")},
                {"name": "newAnnotations", "expression": either("object", "metadata.annotations", "{}")},
            ],
            "validations": [
                {
                    "expression": f"has(request.userInfo.extra) && '{NODE_NAME_EXTRA}' in request.userInfo.extra && "
                    f"request.userInfo.extra['{NODE_NAME_EXTRA}'].exists(n, n == object.metadata.name)",
                    "message": "gpuguard may mark only the node its pod runs on",
                },
                {
                    "expression": f"variables.oldTaints.filter(t, {not_ours}) == "
                    f"variables.newTaints.filter(t, {not_ours})",
                    "message": f"gpuguard may add or remove only its own taint ({key}={OWNER}); others' stay",
                },
                {
                    "expression": unchanged_but("Labels", key)
                    + " && "
                    + unchanged_but("Annotations", RECORD_ANNOTATION),
                    "message": f"gpuguard may change only its label {key} and its annotation {RECORD_ANNOTATION}",
                },
                {
                    "expression": spec_unchanged,
                    "message": "gpuguard may not cordon a node or change its spec beyond taints",
                },
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": labels},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    return [policy, binding]
