"""Applying manifests to the emulated API server: per-kind name validation, custom resources checked
against their vendored CRDs (tests/data/crds), fields a disabled feature gate drops, and cluster DNS
for pods' hostnames. The controllers that act on the objects are in kube_controllers.py."""

from __future__ import annotations

import copy
from typing import Any

from helpers import kube_rules as rules

# where ``apply`` creates each kind (group/version/plural, namespaced)
KINDS = {
    "ServiceAccount": ("", "serviceaccounts", True),
    "Role": ("rbac.authorization.k8s.io", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings", True),
    "ClusterRole": ("rbac.authorization.k8s.io", "clusterroles", False),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io", "clusterrolebindings", False),
    "Service": ("", "services", True),
    "Job": ("batch", "jobs", True),
    "DaemonSet": ("apps", "daemonsets", True),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets", True),
    "ConfigMap": ("", "configmaps", True),
    "ValidatingAdmissionPolicy": ("admissionregistration.k8s.io", "validatingadmissionpolicies", False),
    "ValidatingAdmissionPolicyBinding": ("admissionregistration.k8s.io", "validatingadmissionpolicybindings", False),
    "JobSet": ("jobset.x-k8s.io", "jobsets", True),
    "TrainJob": ("trainer.kubeflow.org", "trainjobs", True),
    "TrainingRuntime": ("trainer.kubeflow.org", "trainingruntimes", True),
    "ClusterTrainingRuntime": ("trainer.kubeflow.org", "clustertrainingruntimes", False),
}
# the CRD release each custom resource is checked against (tests/data/crds/README.md)
CRD_RELEASES = {"JobSet": "0.12.0", "TrainJob": "2.3.0", "TrainingRuntime": "2.3.0", "ClusterTrainingRuntime": "2.3.0"}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class Workloads:
    """Mixed into KubeEmulator, whose objects, pods, nodes, profile and helpers it uses."""

    objects: dict[tuple[str, str, str], dict[str, Any]]
    pods: dict[tuple[str, str], dict[str, Any]]
    nodes: dict[str, dict[str, Any]]
    rbac: rules.Rbac | None
    profile: rules.Release
    crd_releases: dict[str, str]

    def _rv(self) -> str:
        raise NotImplementedError

    def add_pod(self, namespace: str, name: str, node: str, **status: Any) -> dict[str, Any]:
        raise NotImplementedError

    def add_node(self, name: str, taints: list[dict[str, Any]] | None = None) -> None:
        raise NotImplementedError

    # -- applying manifests: validation, a Job controller, cluster DNS --------------------------

    def _create(self, path: str, body: Any) -> tuple[int, Any] | None:
        kind = (body or {}).get("kind")
        if kind not in KINDS:
            return None
        return self.create(copy.deepcopy(body))

    def create(self, doc: dict[str, Any]) -> tuple[int, Any]:
        kind, meta = doc["kind"], doc.setdefault("metadata", {})
        name_rule = rules.NAME_RULES.get(kind, rules.dns_subdomain)
        problem = name_rule(meta.get("name", ""))
        if problem:
            return _invalid(422, f"{kind} {meta.get('name')!r} is invalid: metadata.name: Invalid value: {problem}")
        namespace = meta.get("namespace", "default") if KINDS[kind][2] else ""
        if namespace and (problem := rules.dns_label(namespace)):
            return _invalid(422, f"metadata.namespace: Invalid value: {problem}")
        key = (kind, namespace, meta["name"])
        if key in self.objects:
            return _invalid(409, f'{KINDS[kind][1]} "{meta["name"]}" already exists')
        if kind in CRD_RELEASES:
            import jsonschema

            from helpers import crd_schema

            try:
                crd_schema.validate(doc, self.crd_releases.get(kind, CRD_RELEASES[kind]))
            except jsonschema.ValidationError as exc:
                where = ".".join(map(str, exc.absolute_path))
                return _invalid(422, f"{kind}.{KINDS[kind][0]} {meta['name']!r} is invalid: {where}: {exc.message}")
        if kind == "ConfigMap" and (problem := rules.invalid_configmap(doc)):
            return _invalid(422, f"ConfigMap {meta['name']!r} is invalid: {problem}")
        if kind in ("Job", "DaemonSet"):
            self._drop_disabled_fields(doc["spec"]["template"]["spec"])
        if kind == "ValidatingAdmissionPolicy":
            from helpers.kube_rest import compile_policy

            if problem := compile_policy(doc):  # the API server compiles every expression when it is created
                return _invalid(422, f"ValidatingAdmissionPolicy {meta['name']!r} is invalid: {problem}")
        if namespace:
            meta["namespace"] = namespace
        meta["resourceVersion"] = self._rv()
        meta["uid"] = f"uid-{kind.lower()}-{meta['name']}-{meta['resourceVersion']}"
        self.objects[key] = doc
        if kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding") and self.rbac is not None:
            self.rbac.load(doc)
        if kind == "Job" and (problem := self._check_job(doc)):
            del self.objects[key]
            return _invalid(422, problem)
        return 201, doc

    def _drop_disabled_fields(self, pod_spec: dict[str, Any]) -> None:
        # pkg/api/pod/util.go dropDisabledFields: with ContainerRestartRules off (1.34's default), a
        # container's restartPolicy and restartPolicyRules are dropped silently, no error.
        if not self.profile.gates["ContainerRestartRules"]:
            for container in pod_spec.get("containers", []):
                container.pop("restartPolicy", None)
                container.pop("restartPolicyRules", None)

    def _check_job(self, job: dict[str, Any]) -> str | None:
        """pkg/apis/batch/validation: the Job's name is a label value (63); Indexed pods' hostnames,
        JOB-INDEX, are DNS labels; a subdomain is a DNS label."""
        name, spec = job["metadata"]["name"], job["spec"]
        if len(name) > 63:
            return f"metadata.name: must be no more than 63 characters (it is the label job-name={name})"
        if problem := rules.dns_label(f"{name}-{int(spec.get('completions', 1)) - 1}"):
            return f"pod hostname: Invalid value: {problem}"
        subdomain = spec["template"]["spec"].get("subdomain")
        if subdomain and (problem := rules.dns_label(subdomain)):
            return f"spec.template.spec.subdomain: Invalid value: {problem}"
        return None

    def resolve(self, hostname: str) -> str | None:
        """Cluster DNS for ``POD-HOSTNAME.SUBDOMAIN[.NAMESPACE]``: the pod's name, or None (NXDOMAIN).

        A pod's hostname record exists when a headless Service named like its subdomain selects it
        and lists it as an endpoint: ready pods only, unless publishNotReadyAddresses
        (pkg/controller/endpointslice; the DNS spec for pods' hostname/subdomain).
        """
        parts = hostname.split(".")
        host, subdomain = parts[0], parts[1] if len(parts) > 1 else ""
        namespace = parts[2] if len(parts) > 2 else "default"
        service = self.objects.get(("Service", namespace, subdomain))
        if service is None or service["spec"].get("clusterIP") != "None":
            return None
        for (ns, name), pod in self.pods.items():
            if ns != namespace or pod["spec"].get("hostname") != host or pod["spec"].get("subdomain") != subdomain:
                continue
            if not selects(service["spec"].get("selector", {}), pod["metadata"].get("labels", {})):
                continue
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])
            if ready or service["spec"].get("publishNotReadyAddresses"):
                return name
        return None


def _invalid(code: int, message: str) -> tuple[int, dict[str, Any]]:
    reason = {409: "AlreadyExists", 422: "Invalid"}.get(code, "Unknown")
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
