"""A focused emulation of the Kubernetes API server, over real HTTP, for the calls gpuguard makes.

kmock's ``KubernetesEmulator`` merges patches as plain dicts; gpuguard depends on exact semantics,
so this fixture implements them, per release profile (1.34-1.37, see kube_rules.py): which
group/version serves which resource; RBAC, against the Roles and ClusterRoles that gpuguard's
manifests generate; strategic-merge patches (conditions by type, labels and annotations with null
deletion, taints replaced whole); 409 on a stale resourceVersion; node-taint uniqueness; Event byte
limits and MicroTime; device-taint effects; DNS names; eviction refused with 429 under a
PodDisruptionBudget; delete with a grace period; ValidatingAdmissionPolicies (real CEL); and the
controllers that give gpuguard's exit codes their meaning: Job, JobSet, Kubeflow Trainer and a
scheduler (kube_controllers.py), with kubelets that run pods as processes (kube_kubelet.py). Every
request is recorded; faults can be scripted (403, 404, 409, 429, 5xx).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from helpers import kube_rules as rules
from helpers.kube_controllers import ControlPlane
from helpers.kube_rest import Rest, admit
from helpers.kube_workloads import Workloads, selects

STATUS_REASONS = {
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
ADMIN = "system:admin"


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str
    body: Any
    authorization: str | None
    user: str = ""
    status: int = 0
    info: rules.RequestInfo | None = None
    raw: bytes | None = None  # the body's bytes as they came over the wire


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int


@dataclass
class KubeEmulator(Workloads, Rest, ControlPlane):
    """``release`` picks the profile; ``device_taint_rules`` None means the release's default."""

    release: str = "1.37"
    device_taint_rules: bool | None = None
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> user
    rbac: rules.Rbac | None = None  # None: every authenticated request is allowed
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    taint_rules: list[dict[str, Any]] = field(default_factory=list)
    claims: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    slices: list[dict[str, Any]] = field(default_factory=list)
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (kind, ns, name)
    requests: list[Recorded] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    extras: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # bearer token -> user's extra
    controller_events: list[tuple[str, str, str]] = field(default_factory=list)
    _handled: set[str] = field(default_factory=set)
    crd_releases: dict[str, str] = field(default_factory=dict)  # kind -> CRD release installed
    _versions: Any = field(default_factory=lambda: itertools.count(100))
    _lock: Any = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.profile = rules.PROFILES[self.release]
        if self.device_taint_rules is None:
            self.device_taint_rules = self.profile.taint_rules_default
        self.dra = rules.served_dra(self.profile, self.device_taint_rules)

    # -- set-up ---------------------------------------------------------------------------------

    def reset(self, device_taint_rules: bool | None = None) -> None:
        """Forget every object, token, rule, request and fault: a fresh cluster on the same server."""
        with self._lock:
            for name in ("pods", "nodes", "claims", "objects", "tokens", "extras"):
                getattr(self, name).clear()
            for name in ("events", "taint_rules", "slices", "requests", "faults", "controller_events"):
                getattr(self, name).clear()
            self._handled.clear()
            self.rbac = None
            self.device_taint_rules = device_taint_rules
            self.__post_init__()

    def token_for(self, user: str, node: str | None = None) -> str:
        """A bearer token for ``user``; ``node``: a pod's bound token, which names the pod's node in the
        user's extra (KEP-4193, ServiceAccountTokenPodNodeInfo, GA 1.32)."""
        token = f"token-{len(self.tokens)}-{user.replace(':', '-')}"
        self.tokens[token] = user
        if node is not None:
            self.extras[token] = {"authentication.kubernetes.io/node-name": [node]}
        return token

    def authorize(self, objects: list[dict[str, Any]]) -> None:
        """Authorize every service account's request with the RBAC objects among ``objects``."""
        self.rbac = self.rbac or rules.Rbac()
        for doc in objects:
            self.rbac.load(doc)

    def used(self, user: str) -> set[tuple[str, str, str]]:
        """(group, resource, verb) of the resource requests ``user`` made and was allowed."""
        return {
            (r.info.group, r.info.resource, r.info.verb)
            for r in self.requests
            if r.user == user and r.info is not None and r.info.resource_request and r.status != 403
        }

    def add_pod(self, namespace: str, name: str, node: str, **status: Any) -> dict[str, Any]:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{name}",
                "resourceVersion": self._rv(),
                "labels": {},
            },
            "spec": {"nodeName": node, "containers": [{"name": "trainer", "image": "trainer:1"}]},
            "status": {
                "phase": "Running",
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-27T00:00:00Z"},
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-27T00:00:00Z"},
                ],
                **status,
            },
        }
        self.pods[(namespace, name)] = pod
        return pod

    def add_node(self, name: str, taints: list[dict[str, Any]] | None = None) -> None:
        self.nodes[name] = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {}, "annotations": {}, "resourceVersion": self._rv()},
            "spec": {"taints": list(taints or [])},
        }

    def fail(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        """The next ``times`` matching requests answer ``status``."""
        self.faults.append(Fault(method, re.compile(path_regex), status, times))

    def received(self, method: str, path_regex: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(path_regex, r.path)]

    def _rv(self) -> str:
        return str(next(self._versions))

    # -- serving --------------------------------------------------------------------------------

    def start(self) -> str:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                url = urlparse(self.path)
                record = Recorded(
                    self.command,
                    url.path,
                    self.headers.get("Content-Type", ""),
                    body,
                    self.headers.get("Authorization"),
                    raw=raw,
                )
                with emulator._lock:  # one request at a time, as etcd's compare-and-swap would order them
                    emulator.requests.append(record)
                    status, payload = emulator.serve(self.command, url.path, parse_qs(url.query), record)
                    record.status = status
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="kube-emulator", daemon=True).start()
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve(self, method: str, path: str, query: dict[str, list[str]], record: Recorded) -> tuple[int, Any]:
        # authentication (a bearer token), then authorization (RBAC), then the faults, then the API
        token = (record.authorization or "").removeprefix("Bearer ")
        user = self.tokens.get(token)
        if user is None:
            return _status(401, "Unauthorized")
        record.user = user
        info = rules.request_info(method, path, query)
        record.info = info
        if self.rbac is not None and user != ADMIN and not self.rbac.allows(user, info):
            scope = f' in the namespace "{info.namespace}"' if info.namespace else " at the cluster scope"
            group = f' in API group "{info.group}"' if info.resource_request else ""
            resource = info.resource.replace("/", '" with subresource "') if info.resource_request else path
            return _status(403, f'User "{user}" cannot {info.verb} resource "{resource}"{group}{scope}')
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                fault.times -= 1
                return _status(fault.status, f"scripted {fault.status} for {method} {path}")
        return self.route(method, path, query, record)

    # -- the API --------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict[str, list[str]], record: Recorded) -> tuple[int, Any]:
        body = record.body
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)(/status|/eviction)?", path):
            return self._pod(method, m.group(1), m.group(2), m.group(3) or "", record)
        if m := re.fullmatch(r"/api/v1/nodes/([^/]+)", path):
            node = self.nodes.get(m.group(1))
            if node is None:
                return _status(404, f'nodes "{m.group(1)}" not found')
            if method == "GET":
                return 200, node
            if method == "PATCH":
                return self._patch_node(node, record)
        if method == "POST" and (m := re.fullmatch(r"/apis/events\.k8s\.io/v1/namespaces/([^/]+)/events", path)):
            problem = rules.invalid_event(body)
            if problem:
                return _status(422, f"Event is invalid: {problem}")
            event = copy.deepcopy(body)
            event["metadata"]["name"] = event["metadata"].get("name") or (
                rules.generated_name(event["metadata"]["generateName"], self._rv().zfill(5))
            )
            self.events.append(event)
            return 201, event
        if path.startswith("/apis/resource.k8s.io") or path in ("/apis", "/apis/"):
            return self._dra(method, path, query, record)
        if method == "POST" and (created := self._create(path, body)) is not None:
            return created
        if (answered := self.rest(method, path, query, body)) is not None:
            return answered
        return _status(404, f"the server could not find the requested resource ({method} {path})")

    def _pod(self, method: str, namespace: str, name: str, sub: str, record: Recorded) -> tuple[int, Any]:
        pod = self.pods.get((namespace, name))
        if pod is None:
            return _status(404, f'pods "{name}" not found')
        if method == "GET":
            return 200, pod
        if method == "PATCH" and sub == "/status":
            return self._patch_pod_status(pod, record)
        if method == "POST" and sub == "/eviction":
            return self._evict(pod, record.body)
        if method == "DELETE" and not sub:
            # pkg/registry/core/pod/strategy.go CheckGracefulDelete: the pod stays, terminating, for its
            # grace period (default: spec.terminationGracePeriodSeconds, 30); 0 removes it at once.
            # A plain delete adds no DisruptionTarget condition (only eviction and the controllers do).
            grace = (record.body or {}).get("gracePeriodSeconds")
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else int(grace)
            if grace == 0:
                del self.pods[(namespace, name)]
            else:
                pod["metadata"]["deletionTimestamp"] = "2026-11-27T00:00:01Z"
                pod["metadata"]["deletionGracePeriodSeconds"] = grace
            return 200, pod
        return _status(405, f"{method} is not supported on pods{sub}")

    def _evict(self, pod: dict[str, Any], body: Any) -> tuple[int, Any]:
        if (body or {}).get("kind") != "Eviction":
            return _status(400, "body must be an Eviction")
        # pkg/registry/core/pod/storage/eviction.go: a PDB that allows no disruption refuses with 429
        labels = pod["metadata"].get("labels") or {}
        for (kind, ns, name), pdb in self.objects.items():
            selector = pdb.get("spec", {}).get("selector", {}).get("matchLabels", {})
            covers = kind == "PodDisruptionBudget" and ns == pod["metadata"]["namespace"]
            blocks = int(pdb.get("status", {}).get("disruptionsAllowed", 0)) <= 0
            if covers and blocks and selects(selector, labels):
                return _status(429, f"Cannot evict pod as it would violate the pod's disruption budget {name}.")
        pod["status"]["conditions"].append(
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
        )
        pod["metadata"]["deletionTimestamp"] = "2026-11-27T00:00:01Z"
        return 201, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}

    def _patch_pod_status(self, pod: dict[str, Any], record: Recorded) -> tuple[int, Any]:
        if record.content_type != "application/strategic-merge-patch+json":
            return _status(415, f"this emulator takes strategic merge patches, not {record.content_type}")
        body = record.body or {}
        wanted = body.get("metadata", {}).get("resourceVersion")
        if wanted is not None and wanted != pod["metadata"]["resourceVersion"]:
            return _status(409, "Operation cannot be fulfilled on pods: the object has been modified")
        for part in ("labels", "annotations"):
            # pkg/registry/core/pod/strategy.go podStatusStrategy: only spec, deletionTimestamp and
            # ownerReferences are reset on a status update; metadata labels and annotations go through
            target = pod["metadata"].setdefault(part, {})
            for key, value in (body.get("metadata", {}).get(part) or {}).items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        for condition in body.get("status", {}).get("conditions", []):
            # PodStatus.Conditions carries patchMergeKey "type": one entry per type, merged field by field
            existing = next((c for c in pod["status"]["conditions"] if c["type"] == condition["type"]), None)
            if existing is None:
                pod["status"]["conditions"].append(dict(condition))
            else:
                existing.update(condition)
        pod["metadata"]["resourceVersion"] = self._rv()
        return 200, pod

    def _patch_node(self, node: dict[str, Any], record: Recorded) -> tuple[int, Any]:
        if record.content_type != "application/strategic-merge-patch+json":
            return _status(415, f"this emulator takes strategic merge patches, not {record.content_type}")
        body = record.body or {}
        meta = body.get("metadata", {})
        # a resourceVersion in the patch is a precondition: stale means 409 (optimistic concurrency)
        wanted = meta.get("resourceVersion")
        if wanted is not None and wanted != node["metadata"]["resourceVersion"]:
            return _status(409, "Operation cannot be fulfilled on nodes: the object has been modified")
        updated = copy.deepcopy(node)
        for key, value in body.get("spec", {}).items():
            updated["spec"][key] = value  # NodeSpec.Taints has no merge key: replaced whole, as scalars are
        for part in ("labels", "annotations"):  # maps merge; null deletes a key
            target = updated["metadata"].setdefault(part, {})
            for key, value in (meta.get(part) or {}).items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        problem = rules.invalid_taints(updated["spec"].get("taints") or [])
        if problem:
            return _status(422, f'Node "{node["metadata"]["name"]}" is invalid: {problem}')
        token = (record.authorization or "").removeprefix("Bearer ")
        request = {
            "operation": "UPDATE",
            "resource": "nodes",
            "userInfo": {"username": record.user, "extra": self.extras.get(token, {})},
            "object": updated,
            "oldObject": node,
        }
        if denied := admit(self.objects, request):
            return _status(422, denied)  # a validation's reason defaults to Invalid (ValidatingAdmissionPolicy API)
        if sum(len(k) + len(v) for k, v in updated["metadata"]["annotations"].items()) > 256 * 1024:
            return _status(422, "metadata.annotations: Too long: must have at most 262144 bytes")
        updated["metadata"]["resourceVersion"] = self._rv()
        node.clear()
        node.update(updated)
        return 200, node

    # -- DRA ------------------------------------------------------------------------------------

    def _dra(self, method: str, path: str, query: dict[str, list[str]], record: Recorded) -> tuple[int, Any]:
        versions = [{"groupVersion": f"resource.k8s.io/{v}", "version": v} for v in self.dra]
        if path in ("/apis", "/apis/"):
            groups = [{"name": "events.k8s.io", "versions": [{"groupVersion": "events.k8s.io/v1", "version": "v1"}]}]
            groups.append({"name": "resource.k8s.io", "versions": versions, "preferredVersion": versions[0]})
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        if path == "/apis/resource.k8s.io":
            return 200, {"kind": "APIGroup", "name": "resource.k8s.io", "versions": versions}
        m = re.fullmatch(r"/apis/resource\.k8s\.io/([^/]+)(/.*)?", path)
        version, rest = (m.group(1), m.group(2) or "") if m else ("", "")
        served = self.dra.get(version)
        if served is None:
            return _status(404, f"the server could not find the requested resource (resource.k8s.io/{version})")
        if not rest:
            return 200, {
                "kind": "APIResourceList",
                "groupVersion": f"resource.k8s.io/{version}",
                "resources": [
                    {"name": n, "namespaced": n in ("resourceclaims", "resourceclaimtemplates")} for n in served
                ],
            }
        if m := re.fullmatch(r"/namespaces/([^/]+)/resourceclaims/([^/]+)", rest):
            if "resourceclaims" not in served:
                return _status(404, f"resourceclaims are not served at resource.k8s.io/{version}")
            claim = self.claims.get((m.group(1), m.group(2)))
            return (200, claim) if claim else _status(404, f'resourceclaims "{m.group(2)}" not found')
        if rest == "/resourceslices" and method == "GET":
            if "resourceslices" not in served:
                return _status(404, f"resourceslices are not served at resource.k8s.io/{version}")
            selector = query.get("fieldSelector", [""])[0]
            node = selector.removeprefix("spec.nodeName=")
            items = [s for s in self.slices if not node or s["spec"].get("nodeName") == node]
            return 200, {"kind": "ResourceSliceList", "items": items}
        if rest == "/devicetaintrules" and method == "GET":
            if "devicetaintrules" not in served:
                return _status(404, f"devicetaintrules are not served at resource.k8s.io/{version}")
            wanted = dict(part.split("=", 1) for part in query.get("labelSelector", [""])[0].split(",") if "=" in part)
            items = [r for r in self.taint_rules if selects(wanted, r["metadata"].get("labels", {})) or not wanted]
            return 200, {"kind": "DeviceTaintRuleList", "items": items}
        if (m := re.fullmatch(r"/devicetaintrules/([^/]+)", rest)) and method == "DELETE":
            if "devicetaintrules" not in served:
                return _status(404, f"devicetaintrules are not served at resource.k8s.io/{version}")
            found = [r for r in self.taint_rules if r["metadata"]["name"] == m.group(1)]
            if not found:
                return _status(404, f'devicetaintrules "{m.group(1)}" not found')
            self.taint_rules.remove(found[0])
            return 200, found[0]
        if rest == "/devicetaintrules" and method == "POST":
            if "devicetaintrules" not in served:
                return _status(404, f"devicetaintrules are not served at resource.k8s.io/{version}")
            problem = rules.invalid_device_taint_rule(record.body, self.profile, version)
            if problem:
                return _status(422, f"DeviceTaintRule is invalid: {problem}")
            name = record.body["metadata"]["name"]
            if any(r["metadata"]["name"] == name for r in self.taint_rules):
                return _status(409, f'devicetaintrules "{name}" already exists')
            self.taint_rules.append(record.body)
            return 201, record.body
        return _status(404, f"no route for {method} {path}")


def _status(code: int, message: str) -> tuple[int, dict[str, Any]]:
    reason = STATUS_REASONS.get(code, "Unknown")
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def write_kubeconfig(path: Any, server: str, token: str) -> Any:
    """A kubeconfig for ``server`` that authenticates with ``token`` (the real client reads it)."""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: emu, cluster: {{server: '{server}'}}}}]\n"
        f"users: [{{name: u, user: {{token: {token}}}}}]\n"
        "contexts: [{name: c, context: {cluster: emu, user: u}}]\ncurrent-context: c\n"
    )
    return path
