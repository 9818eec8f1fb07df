"""The emulated API server's generic REST: get, list (label and field selectors), update (with the
resourceVersion precondition) and delete of the objects ``apply`` created (ConfigMaps, Jobs, JobSets,
TrainJobs, runtimes, ...), listing pods across namespaces by node, listing Events by field, and the
ValidatingAdmissionPolicies, evaluated with a real CEL implementation (cel-python).

Sources: staging/src/k8s.io/apiserver/pkg/registry/generic/registry/store.go (Update: a stale
resourceVersion is a 409 Conflict), pkg/registry/core/pod/strategy.go (pod field selectors:
spec.nodeName, status.phase), pkg/apis/events/v1 conversion (regarding.name, reason), and
staging/src/k8s.io/apiserver/pkg/admission/plugin/policy/validating (matchConditions, variables,
validations; a failed validation bound with validationActions Deny is refused, reason Invalid by default).
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

from helpers import kube_rules as rules

# plural -> (kind, group, namespaced)
PLURALS = {
    "configmaps": ("ConfigMap", "", True),
    "jobs": ("Job", "batch", True),
    "jobsets": ("JobSet", "jobset.x-k8s.io", True),
    "trainjobs": ("TrainJob", "trainer.kubeflow.org", True),
    "trainingruntimes": ("TrainingRuntime", "trainer.kubeflow.org", True),
    "clustertrainingruntimes": ("ClusterTrainingRuntime", "trainer.kubeflow.org", False),
    "services": ("Service", "", True),
    "daemonsets": ("DaemonSet", "apps", True),
}
_NAMESPACED = re.compile(r"/(?:api/v1|apis/([^/]+)/[^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?(/status)?")
_CLUSTER = re.compile(r"/apis/([^/]+)/[^/]+/([^/]+)(?:/([^/]+))?")


def label_selected(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _field(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
    return str(value)


def field_selected(selector: str, obj: dict[str, Any]) -> bool:
    return all(_field(obj, k) == v for k, _, v in (t.partition("=") for t in filter(None, selector.split(","))))


def _items(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": f"{kind}List", "metadata": {"resourceVersion": "1"}, "items": items}


class Rest:
    """Mixed into KubeEmulator, whose objects, pods, events and helpers it uses."""

    objects: dict[tuple[str, str, str], dict[str, Any]]
    pods: dict[tuple[str, str], dict[str, Any]]
    events: list[dict[str, Any]]

    # from the emulator and ControlPlane: _rv(), delete_object(kind, namespace, name)

    def rest(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any] | None:
        """Answer the request if it is one of these routes; None otherwise."""
        labels = query.get("labelSelector", [""])[0]
        fields = query.get("fieldSelector", [""])[0]
        if (method == "GET" and path in ("/api/v1/pods",)) or re.fullmatch(r"/api/v1/namespaces/[^/]+/pods", path):
            if method != "GET":
                return None
            namespace = path.split("/")[4] if "/namespaces/" in path else None
            found = [
                p
                for (ns, _), p in sorted(self.pods.items())
                if (namespace is None or ns == namespace)
                and label_selected(labels, p["metadata"].get("labels") or {})
                and field_selected(fields, p)
            ]
            return 200, _items("Pod", found)
        if method == "GET" and (m := re.fullmatch(r"/apis/events\.k8s\.io/v1/namespaces/([^/]+)/events", path)):
            found = [e for e in self.events if e["metadata"]["namespace"] == m.group(1) and field_selected(fields, e)]
            return 200, _items("Event", found)
        m = _NAMESPACED.fullmatch(path)
        namespace = m.group(2) if m else ""
        if m and m.group(3) in PLURALS:
            plural, name = m.group(3), m.group(4)
        elif (c := _CLUSTER.fullmatch(path)) and c.group(2) in PLURALS and not PLURALS[c.group(2)][2]:
            plural, name = c.group(2), c.group(3)
        else:
            return None
        kind = PLURALS[plural][0]
        if name is None:
            if method != "GET":
                return None
            found = [
                o
                for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and ns == namespace and label_selected(labels, o["metadata"].get("labels") or {})
            ]
            return 200, _items(kind, found)
        key = (kind, namespace, name)
        current = self.objects.get(key)
        if current is None:
            return rules.status(404, f'{plural} "{name}" not found')
        if method == "GET":
            return 200, current
        if method == "PUT":
            wanted = (body or {}).get("metadata", {}).get("resourceVersion")
            if wanted != current["metadata"].get("resourceVersion"):
                return rules.status(
                    409, f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified'
                )
            if kind == "ConfigMap" and (problem := rules.invalid_configmap(body)):
                return rules.status(422, f'ConfigMap "{name}" is invalid: {problem}')
            updated = copy.deepcopy(body)
            updated["metadata"]["resourceVersion"] = self._rv()
            self.objects[key] = updated
            return 200, updated
        if method == "DELETE":
            self.delete_object(kind, namespace, name)
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return None


# -- ValidatingAdmissionPolicy -----------------------------------------------------------------------


@functools.cache
def _program(expression: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(expression))


def compile_policy(policy: dict[str, Any]) -> str | None:
    """Every expression compiled (a type or syntax error is refused at creation); None when all compile."""
    import celpy

    spec = policy["spec"]
    for part in ("matchConditions", "variables", "validations"):
        for item in spec.get(part, []):
            try:
                _program(item["expression"])
            except celpy.CELParseError as exc:
                return f"spec.{part}: compilation failed: {exc}"
    return None


def admit(objects: dict[tuple[str, str, str], dict[str, Any]], request: dict[str, Any]) -> str | None:
    """The first Deny of a bound ValidatingAdmissionPolicy for ``request`` (an UPDATE), or None."""
    import celpy

    def evaluate(expression: str, activation: dict[str, Any]) -> Any:
        return _program(expression).evaluate(activation)

    for (kind, _, name), policy in objects.items():
        if kind != "ValidatingAdmissionPolicy":
            continue
        bound = any(
            k == "ValidatingAdmissionPolicyBinding"
            and b["spec"]["policyName"] == name
            and "Deny" in b["spec"]["validationActions"]
            for (k, _, _), b in objects.items()
        )
        spec = policy["spec"]
        matches = any(
            request["operation"] in r["operations"] and request["resource"] in r["resources"]
            for r in spec["matchConstraints"]["resourceRules"]
        )
        if not (bound and matches):
            continue
        activation = {
            "request": celpy.json_to_cel({"userInfo": request["userInfo"], "operation": request["operation"]}),
            "object": celpy.json_to_cel(request["object"]),
            "oldObject": celpy.json_to_cel(request["oldObject"]),
        }
        if not all(bool(evaluate(c["expression"], activation)) for c in spec.get("matchConditions", [])):
            continue
        variables = celpy.celtypes.MapType({})
        for variable in spec.get("variables", []):  # each may read the ones before it
            value = evaluate(variable["expression"], {**activation, "variables": variables})
            variables = celpy.celtypes.MapType({**variables, celpy.celtypes.StringType(variable["name"]): value})
        activation["variables"] = variables
        for validation in spec["validations"]:
            if not bool(evaluate(validation["expression"], activation)):
                return (
                    f'ValidatingAdmissionPolicy "{name}" with binding "{name}" denied request: {validation["message"]}'
                )
    return None
