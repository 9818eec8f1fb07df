"""What a real Kubernetes API server enforces, per release, for the emulator in kube_emulator.py.

Each rule names the Kubernetes source it mirrors (paths in github.com/kubernetes/kubernetes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

RELEASES: Final = ("1.34", "1.35", "1.36", "1.37")


@dataclass(frozen=True)
class Release:
    """One release's defaults.

    ``gates``: feature gates at their default (pkg/features/kube_features.go, versioned specs).
    ``claims``: resource.k8s.io versions serving ResourceClaims and ResourceSlices (v1 GA in 1.34;
    pkg/registry/resource/rest/storage_resource.go). ``taint_rules``: versions serving DeviceTaintRule
    once it is enabled, and whether it is on by default.
    """

    version: str
    gates: dict[str, bool]
    claims: tuple[str, ...]
    taint_rules: tuple[str, ...]
    taint_rules_default: bool
    device_taint_effects: tuple[str, ...] = ("NoSchedule", "NoExecute")


PROFILES: Final = {
    # ContainerRestartRules: alpha (off) 1.34, beta (on) 1.35. DRADeviceTaints: alpha 1.33, beta 1.36, GA 1.37.
    # DRADeviceTaintRules: alpha 1.35, beta but off (its API is an off-by-default beta) 1.36, GA 1.37.
    "1.34": Release("1.34", {"ContainerRestartRules": False}, ("v1", "v1beta2", "v1beta1"), ("v1alpha3",), False),
    "1.35": Release("1.35", {"ContainerRestartRules": True}, ("v1", "v1beta2", "v1beta1"), ("v1alpha3",), False),
    "1.36": Release(
        "1.36", {"ContainerRestartRules": True}, ("v1", "v1beta2", "v1beta1"), ("v1beta2", "v1alpha3"), False
    ),
    "1.37": Release("1.37", {"ContainerRestartRules": True}, ("v1", "v1beta2", "v1beta1"), ("v1", "v1beta2"), True),
}

DRA_RESOURCES: Final = ("resourceclaims", "resourceslices", "deviceclasses", "resourceclaimtemplates")


def served_dra(release: Release, taint_rules: bool) -> dict[str, list[str]]:
    """resource.k8s.io version -> resources it serves. v1alpha3 serves only DeviceTaintRule from 1.34 on."""
    served: dict[str, list[str]] = {v: list(DRA_RESOURCES) for v in release.claims}
    if taint_rules:
        for version in release.taint_rules:
            served.setdefault(version, []).append("devicetaintrules")
    return served


# -- names: staging/src/k8s.io/apimachinery/pkg/util/validation/validation.go ---------------------

DNS1123_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL: Final = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE: Final = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def dns_label(value: str) -> str | None:
    if len(value) > 63 or not DNS1123_LABEL.match(value):
        return f"{value!r}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"
    return None


def dns1035_label(value: str) -> str | None:
    if len(value) > 63 or not DNS1035_LABEL.match(value):
        return f"{value!r}: a DNS-1035 label must start with an alphabetic character"
    return None


def dns_subdomain(value: str) -> str | None:
    if len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
        return f"{value!r}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters"
    return None


def path_segment(value: str) -> str | None:
    """RBAC objects' names (pkg/apis/rbac/validation: ValidateRBACName = path.IsValidPathSegmentName)."""
    if not value or value in (".", "..") or "/" in value or "%" in value:
        return f"{value!r}: may not be '.' or '..' or contain '/' or '%'"
    return None


# Which name rule each kind's validation applies (ValidateObjectMeta's nameFn per kind).
NAME_RULES: Final = {
    "Service": dns1035_label,  # pkg/apis/core/validation: ValidateServiceName = NameIsDNS1035Label
    "Namespace": dns_label,
    "ServiceAccount": dns_subdomain,
    "Job": dns_subdomain,
    "DaemonSet": dns_subdomain,
    "Event": dns_subdomain,
    "DeviceTaintRule": dns_subdomain,
    "PodDisruptionBudget": dns_subdomain,
    "Role": path_segment,
    "RoleBinding": path_segment,
    "ClusterRole": path_segment,
    "ClusterRoleBinding": path_segment,
}


def generated_name(base: str, suffix: str = "x7k2p") -> str:
    """apiserver/pkg/storage/names/generate.go: the base is cut to 58 characters, 5 random appended."""
    return base[:58] + suffix


# -- events: pkg/apis/core/validation/events.go ---------------------------------------------------

MICRO_TIME: Final = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")


def invalid_event(event: Any) -> str | None:
    """ValidateEventCreate for events.k8s.io/v1 (which requires the new-style fields)."""
    if not isinstance(event, dict):
        return "body must be an Event"
    for key in ("regarding", "reason", "note", "type", "action", "reportingController", "reportingInstance"):
        if not event.get(key):
            return f"{key}: Required value"
    if not event.get("eventTime"):
        return "eventTime: Required value"
    if event["type"] not in ("Normal", "Warning"):
        return "type: Unsupported value"
    # NoteLengthLimit = 1024, len() of a Go string: bytes
    if len(event["note"].encode()) > 1024:
        return f"note: Too long: may not be more than 1024 bytes (has {len(event['note'].encode())})"
    if len(event["reason"]) > 128 or len(event["action"]) > 128:
        return "reason/action: Too long: may not be more than 128 bytes"
    if len(event["reportingInstance"]) > 128:
        return "reportingInstance: Too long: may not be more than 128 bytes"
    # MicroTime.UnmarshalJSON parses RFC3339Micro: "2006-01-02T15:04:05.000000Z07:00", six digits
    if not MICRO_TIME.match(str(event["eventTime"])):
        return f"eventTime: {event['eventTime']!r} is not a MicroTime (RFC 3339 with six fractional digits)"
    meta = event.get("metadata", {})
    name = meta.get("name") or generated_name(meta.get("generateName", ""))
    return dns_subdomain(name) and f"metadata.name: Invalid value: {dns_subdomain(name)}"


# -- nodes: pkg/apis/core/validation/validation.go, ValidateNode / validateNodeTaints ----------------

NODE_TAINT_EFFECTS: Final = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def invalid_taints(taints: list[dict[str, Any]]) -> str | None:
    seen: set[tuple[str, str]] = set()
    for i, taint in enumerate(taints):
        if taint.get("effect") not in NODE_TAINT_EFFECTS:
            return f"spec.taints[{i}].effect: Unsupported value: {taint.get('effect')!r}"
        if not LABEL_VALUE.match(str(taint.get("value", ""))) or len(str(taint.get("value", ""))) > 63:
            return f"spec.taints[{i}].value: Invalid value: {taint.get('value')!r}"
        pair = (str(taint.get("key")), str(taint.get("effect")))
        if pair in seen:
            return f"spec.taints[{i}]: Duplicate value: taints must be unique by key and effect pair"
        seen.add(pair)
    return None


# -- DeviceTaintRule: pkg/apis/resource/validation/validation.go, validateDeviceTaint ----------------


def invalid_device_taint_rule(rule: Any, release: Release, version: str) -> str | None:
    if not isinstance(rule, dict) or rule.get("kind") != "DeviceTaintRule":
        return "body must be a DeviceTaintRule"
    if rule.get("apiVersion") != f"resource.k8s.io/{version}":
        return f"apiVersion {rule.get('apiVersion')!r} does not match the URL's resource.k8s.io/{version}"
    problem = dns_subdomain(rule.get("metadata", {}).get("name", ""))
    if problem:
        return f"metadata.name: Invalid value: {problem}"
    spec = rule.get("spec") or {}
    if not spec.get("deviceSelector"):
        return "spec.deviceSelector: Required value"
    taint = spec.get("taint") or {}
    if taint.get("effect") not in release.device_taint_effects:
        allowed = ", ".join(f'"{e}"' for e in release.device_taint_effects)
        return f"spec.taint.effect: Unsupported value: {taint.get('effect')!r}: supported values: {allowed}"
    if not taint.get("key"):
        return "spec.taint.key: Required value"
    return None


# -- RBAC -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestInfo:
    """staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go, NewRequestInfo."""

    resource_request: bool
    verb: str
    group: str = ""
    resource: str = ""  # "resource" or "resource/subresource"
    namespace: str = ""
    name: str = ""


_VERBS: Final = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def request_info(method: str, path: str, query: dict[str, list[str]]) -> RequestInfo:
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:  # /api, /api/v1, /apis, /apis/GROUP, /apis/GROUP/VERSION: discovery, a non-resource URL
        return RequestInfo(False, method.lower())
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource, name = rest[0], rest[1] if len(rest) > 1 else ""
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    if method == "GET":
        verb = "get" if name else ("watch" if query.get("watch", [""])[0] in ("1", "true") else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _VERBS.get(method, method.lower())
    return RequestInfo(True, verb, group, resource, namespace, name)


def rule_allows(rule: dict[str, Any], info: RequestInfo) -> bool:
    """plugin/pkg/auth/authorizer/rbac/rbac.go RuleAllows: verb, group, resource(/subresource), name."""

    def matches(values: list[str], wanted: str) -> bool:
        return "*" in values or wanted in values

    return (
        matches(rule.get("verbs", []), info.verb)
        and matches(rule.get("apiGroups", []), info.group)
        and matches(rule.get("resources", []), info.resource)
        and (not rule.get("resourceNames") or info.name in rule["resourceNames"])
    )


@dataclass
class Rbac:
    """Roles and bindings as ``kubectl apply`` would create them; who may do what."""

    roles: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)  # (ns, name) -> rules
    cluster_roles: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    bindings: list[tuple[str, str, str, str]] = field(default_factory=list)  # (ns or "", kind, role, subject)

    def load(self, doc: dict[str, Any]) -> None:
        kind, meta = doc.get("kind"), doc.get("metadata", {})
        if kind == "Role":
            self.roles[(meta["namespace"], meta["name"])] = list(doc.get("rules", []))
        elif kind == "ClusterRole":
            self.cluster_roles[meta["name"]] = list(doc.get("rules", []))
        elif kind in ("RoleBinding", "ClusterRoleBinding"):
            ref = doc["roleRef"]
            for subject in doc.get("subjects", []):
                if subject.get("kind") == "ServiceAccount":
                    user = f"system:serviceaccount:{subject['namespace']}:{subject['name']}"
                    ns = meta.get("namespace", "") if kind == "RoleBinding" else ""
                    self.bindings.append((ns, ref["kind"], ref["name"], user))

    def rules_for(self, user: str, namespace: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for ns, kind, role, subject in self.bindings:
            if subject != user:
                continue
            if kind == "ClusterRole":
                # a ClusterRole bound by a RoleBinding grants its rules in that namespace only
                if not ns or ns == namespace:
                    found += self.cluster_roles.get(role, [])
            elif ns == namespace:
                found += self.roles.get((ns, role), [])
        return found

    def granted(self, user: str, namespace: str) -> set[tuple[str, str, str]]:
        """(group, resource, verb) triples that ``user`` holds in ``namespace`` and cluster-wide."""
        out: set[tuple[str, str, str]] = set()
        for rule in self.rules_for(user, namespace):
            for g in rule.get("apiGroups", []):
                for r in rule.get("resources", []):
                    for v in rule.get("verbs", []):
                        out.add((g, r, v))
        return out

    def allows(self, user: str, info: RequestInfo) -> bool:
        if not info.resource_request:
            return True  # discovery: the default system:discovery ClusterRole grants it to every user
        return any(rule_allows(rule, info) for rule in self.rules_for(user, info.namespace))


# -- answers and ConfigMaps ---------------------------------------------------------------------------

STATUS_REASONS: Final = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def status(code: int, message: str) -> tuple[int, dict[str, Any]]:
    """A metav1.Status failure, as the API server answers it."""
    reason = STATUS_REASONS.get(code, "Unknown")
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


CONFIGMAP_KEY: Final = re.compile(r"^[-._a-zA-Z0-9]+$")


def invalid_configmap(cm: Any) -> str | None:
    """pkg/apis/core/validation ValidateConfigMap: keys are config keys; data and binaryData under 1 MiB."""
    if not isinstance(cm, dict) or cm.get("kind", "ConfigMap") != "ConfigMap":
        return "body must be a ConfigMap"
    data = cm.get("data") or {}
    for key, value in data.items():
        if not CONFIGMAP_KEY.match(key) or len(key) > 253:
            return f"data[{key}]: Invalid value: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
        if not isinstance(value, str):
            return f"data[{key}]: Invalid value: must be a string"
    if sum(len(k) + len(v.encode()) for k, v in data.items()) > 1024 * 1024:
        return "data: Too long: must have at most 1048576 bytes"
    return None
