"""A focused emulation of the Kubernetes API server, over real HTTP, for the calls gpuguard makes.

kmock's ``KubernetesEmulator`` merges patches as plain dicts; gpuguard depends on exact semantics,
so this fixture implements them: strategic-merge patches that merge pod conditions by type,
resourceVersion conflicts on nodes, the eviction subresource (which sets DisruptionTarget), the
events.k8s.io/v1 validation rules, DRA discovery, bearer-token checks, and scripted failures
(403, 404, 409, 429, 5xx). Every request is recorded for assertions.
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

STATUS_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str
    body: Any
    authorization: str | None


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int


@dataclass
class KubeEmulator:
    token: str | None = None
    dra_version: str | None = None  # e.g. "v1beta2": serve resource.k8s.io DeviceTaintRules
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    taint_rules: list[dict[str, Any]] = field(default_factory=list)
    claims: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    slices: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    _versions: Any = field(default_factory=lambda: itertools.count(100))

    # -- set-up ---------------------------------------------------------------------------------

    def add_pod(self, namespace: str, name: str, node: str, **status: Any) -> dict[str, Any]:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "resourceVersion": self._rv()},
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
            "metadata": {"name": name, "labels": {}, "resourceVersion": self._rv()},
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
                )
                emulator.requests.append(record)
                status, payload = emulator.route(self.command, url.path, parse_qs(url.query), record)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the API --------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict[str, list[str]], record: Recorded) -> tuple[int, Any]:
        if self.token is not None and record.authorization != f"Bearer {self.token}":
            return _status(401, "Unauthorized")
        for fault in self.faults:
            if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                fault.times -= 1
                return _status(fault.status, f"scripted {fault.status} for {method} {path}")
        body = record.body
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)(/status|/eviction)?", path):
            namespace, name, sub = m.group(1), m.group(2), m.group(3) or ""
            pod = self.pods.get((namespace, name))
            if pod is None:
                return _status(404, f'pods "{name}" not found')
            if method == "GET":
                return 200, pod
            if method == "PATCH" and sub == "/status":
                return self._patch_pod_status(pod, record)
            if method == "POST" and sub == "/eviction":
                if (body or {}).get("kind") != "Eviction":
                    return _status(400, "body must be an Eviction")
                pod["status"]["conditions"].append(
                    {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
                )
                pod["metadata"]["deletionTimestamp"] = "2026-11-27T00:00:01Z"
                return 201, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}
            if method == "DELETE" and not sub:
                del self.pods[(namespace, name)]
                return 200, pod
        if m := re.fullmatch(r"/api/v1/nodes/([^/]+)", path):
            node = self.nodes.get(m.group(1))
            if node is None:
                return _status(404, f'nodes "{m.group(1)}" not found')
            if method == "GET":
                return 200, node
            if method == "PATCH":
                return self._patch_node(node, record)
        if method == "POST" and re.fullmatch(r"/apis/events\.k8s\.io/v1/namespaces/([^/]+)/events", path):
            problem = _invalid_event(body)
            if problem:
                return _status(422, problem)
            event = copy.deepcopy(body)
            event["metadata"]["name"] = event["metadata"].get("name") or (
                event["metadata"]["generateName"] + self._rv()
            )
            self.events.append(event)
            return 201, event
        if path in ("/apis", "/apis/"):
            groups = [{"name": "events.k8s.io", "versions": [{"groupVersion": "events.k8s.io/v1", "version": "v1"}]}]
            if self.dra_version:
                version = {"groupVersion": f"resource.k8s.io/{self.dra_version}", "version": self.dra_version}
                groups.append({"name": "resource.k8s.io", "versions": [version], "preferredVersion": version})
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        if path == "/apis/resource.k8s.io" and self.dra_version:
            version = {"groupVersion": f"resource.k8s.io/{self.dra_version}", "version": self.dra_version}
            return 200, {
                "kind": "APIGroup",
                "name": "resource.k8s.io",
                "versions": [version],
                "preferredVersion": version,
            }
        if self.dra_version and path == f"/apis/resource.k8s.io/{self.dra_version}":
            names = ["devicetaintrules", "resourceclaims", "resourceslices", "deviceclasses"]
            return 200, {
                "kind": "APIResourceList",
                "groupVersion": f"resource.k8s.io/{self.dra_version}",
                "resources": [{"name": n, "namespaced": n == "resourceclaims", "kind": n} for n in names],
            }
        if (
            self.dra_version
            and path == f"/apis/resource.k8s.io/{self.dra_version}/devicetaintrules"
            and method == "POST"
        ):
            if not (body or {}).get("spec", {}).get("deviceSelector"):
                return _status(422, "spec.deviceSelector is required")
            self.taint_rules.append(body)
            return 201, body
        if self.dra_version and (
            m := re.fullmatch(
                rf"/apis/resource\.k8s\.io/{self.dra_version}/namespaces/([^/]+)/resourceclaims/([^/]+)", path
            )
        ):
            claim = self.claims.get((m.group(1), m.group(2)))
            return (200, claim) if claim else _status(404, "resourceclaim not found")
        if self.dra_version and path == f"/apis/resource.k8s.io/{self.dra_version}/resourceslices":
            selector = query.get("fieldSelector", [""])[0]
            node = selector.removeprefix("spec.nodeName=")
            items = [s for s in self.slices if not node or s["spec"].get("nodeName") == node]
            return 200, {"kind": "ResourceSliceList", "items": items}
        return _status(404, f"no route for {method} {path}")

    def _patch_pod_status(self, pod: dict[str, Any], record: Recorded) -> tuple[int, Any]:
        if record.content_type != "application/strategic-merge-patch+json":
            return _status(415, f"this emulator takes strategic merge patches, not {record.content_type}")
        for condition in (record.body or {}).get("status", {}).get("conditions", []):
            # conditions carry patchMergeKey "type": one entry per type, merged field by field
            existing = next((c for c in pod["status"]["conditions"] if c["type"] == condition["type"]), None)
            if existing is None:
                pod["status"]["conditions"].append(dict(condition))
            else:
                existing.update(condition)
        pod["metadata"]["resourceVersion"] = self._rv()
        return 200, pod

    def _patch_node(self, node: dict[str, Any], record: Recorded) -> tuple[int, Any]:
        body = record.body or {}
        wanted = body.get("metadata", {}).get("resourceVersion")
        if wanted is not None and wanted != node["metadata"]["resourceVersion"]:
            return _status(409, "Operation cannot be fulfilled on nodes: the object has been modified")
        if "taints" in body.get("spec", {}):
            node["spec"]["taints"] = body["spec"]["taints"]  # taints have no merge key: the list is replaced
        node["metadata"]["labels"].update(body.get("metadata", {}).get("labels", {}))
        node["metadata"]["resourceVersion"] = self._rv()
        return 200, node


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


def _invalid_event(event: Any) -> str | None:
    """The checks events.k8s.io/v1 validation makes on a new Event."""
    if not isinstance(event, dict):
        return "body must be an Event"
    for key in (
        "regarding",
        "reason",
        "note",
        "type",
        "action",
        "reportingController",
        "reportingInstance",
        "eventTime",
    ):
        if not event.get(key):
            return f"{key}: Required value"
    if event["type"] not in ("Normal", "Warning"):
        return "type: Unsupported value"
    if len(event["note"]) > 1024:
        return "note: Too long: may not be more than 1024 bytes"
    if len(event["reason"]) > 128 or len(event["action"]) > 128:
        return "reason/action: Too long"
    # MicroTime is RFC 3339 with exactly six fractional digits ("2006-01-02T15:04:05.000000Z07:00")
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)", event["eventTime"]):
        return f"eventTime: {event['eventTime']!r} is not a MicroTime"
    if not event.get("metadata", {}).get("name") and not event.get("metadata", {}).get("generateName"):
        return "metadata.name or generateName: Required value"
    return None
