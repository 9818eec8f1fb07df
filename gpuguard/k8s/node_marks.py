"""gpuguard's marks on a node: one taint per effect, or a label, and a record of why.

Kubernetes keeps one taint per (key, effect) on a node: a second ``key:NoSchedule`` is a 422
(pkg/apis/core/validation/validation.go, validateNodeTaints: "taints must be unique by key and
effect"). So several bad GPUs on one node share one taint, and the annotation
``gpuguard.io/unhealthy-gpus`` records each GPU's UUID, verdict, reasons, time and the pod that saw it.
That record is also what lets an operator, or the node check, take gpuguard's marks away again.

gpuguard's taints carry the value ``gpuguard`` (``OWNER``). A taint with gpuguard's key and any other
value — an administrator's ``gpuguard.io/unhealthy-gpu=rma-ticket-1234:NoExecute`` — is someone else's:
gpuguard never removes it, and when it already holds the (key, effect) gpuguard would add, the node is
marked all the same and gpuguard records that the taint is not its own.

Every change is a read-modify-write: GET the node, PATCH with its ``resourceVersion``; a 409 (someone
else changed the node in between) is re-read and retried.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Callable
from typing import Any, Final

from gpuguard.errors import KubernetesError
from gpuguard.k8s.cluster import Cluster

log = logging.getLogger("gpuguard.k8s")

RECORD_ANNOTATION: Final = "gpuguard.io/unhealthy-gpus"
OWNER: Final = "gpuguard"  # the value of every taint gpuguard places
LABEL_VALUES: Final = ("failing", "degraded")
TRIES: Final = 5
# A node annotation's value counts against the object's 256 KiB of annotations
# (apimachinery/pkg/api/validation/objectmeta.go, TotalAnnotationSizeLimitB); stay far below it.
_RECORD_LIMIT: Final = 32 * 1024


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def effect_for(state: str, configured: str) -> str:
    """The taint's effect for a GPU the job is leaving.

    A node is only marked when the job leaves it (reschedule), so a DEGRADED GPU here is one whose
    degradation escalated: the replacement must not land on it again, so it gets ``NoSchedule`` —
    never ``NoExecute``, which would also evict the node's other pods from a GPU that still works.
    """
    if state.upper() == "DEGRADED" and configured == "NoExecute":
        return "NoSchedule"
    return configured


def is_ours(taint: dict[str, Any], key: str) -> bool:
    return taint.get("key") == key and taint.get("value") == OWNER


def label_value(state: str) -> str:
    return "degraded" if state.upper() == "DEGRADED" else "failing"


def read_record(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The record on ``node``; an unreadable one is reported and replaced, never trusted."""
    raw = (node.get("metadata", {}).get("annotations") or {}).get(RECORD_ANNOTATION)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        log.warning("node %s: annotation %s is not gpuguard's JSON; replacing it", _name(node), RECORD_ANNOTATION)
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)}


def _name(node: dict[str, Any]) -> str:
    return str(node.get("metadata", {}).get("name", "?"))


def _encode(record: dict[str, dict[str, Any]]) -> str:
    text = json.dumps(record, separators=(",", ":"), sort_keys=True)
    while len(text.encode()) > _RECORD_LIMIT and any(r.get("reasons") for r in record.values()):
        for entry in record.values():  # drop reasons before UUIDs: the UUIDs are what must survive
            entry["reasons"] = entry.get("reasons", [])[:-1]
        text = json.dumps(record, separators=(",", ":"), sort_keys=True)
    return text


def _read_modify_write(
    cluster: Cluster, node_name: str, change: Callable[[dict[str, Any]], dict[str, Any] | None], deadline: float | None
) -> dict[str, Any] | None:
    """``change`` returns the patch (without resourceVersion) or None when nothing is to be done."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api)
    for _ in range(TRIES):
        node = cluster.call_json("get", "nodes", core.read_node, node_name, deadline=deadline)
        patch = change(node)
        if patch is None:
            return None
        patch.setdefault("metadata", {})["resourceVersion"] = node["metadata"]["resourceVersion"]
        try:
            cluster.call(
                "patch",
                "nodes",
                core.patch_node,
                node_name,
                patch,
                deadline=deadline,
                _content_type="application/strategic-merge-patch+json",
            )
            return patch
        except KubernetesError as exc:
            if exc.status != 409:  # someone else changed the node: re-read and try again
                raise
    raise KubernetesError(
        f"patch nodes: still conflicting after {TRIES} tries", status=409, verb="patch", resource="nodes"
    )


def mark(
    cluster: Cluster,
    node_name: str,
    *,
    device: str,
    state: str,
    reasons: list[str],
    deadline: float | None,
    reporter: str | None = None,
) -> str:
    """Taint (or label) ``node_name`` for ``device`` and record why; returns what was done.

    ``reporter`` is the pod (namespace/name) that saw it, when the node agent marks on a pod's report.
    """
    c = cluster.config
    effect = effect_for(state, c.taint_effect)
    result: list[str] = []

    def change(node: dict[str, Any]) -> dict[str, Any] | None:
        record = read_record(node)
        entry = record.get(device, {})
        record[device] = {
            "state": state.upper(),
            "reasons": list(dict.fromkeys([*entry.get("reasons", []), *reasons]))[:20],
            "since": entry.get("since") or now_rfc3339(),
            "last": now_rfc3339(),
            "pod": reporter or f"{cluster.namespace}/{cluster.pod}",
            "mark": c.mark,
            "key": c.taint_key,
            "effect": effect,
        }
        patch: dict[str, Any] = {"metadata": {"annotations": {RECORD_ANNOTATION: _encode(record)}}}
        if c.mark == "label":
            current = (node.get("metadata", {}).get("labels") or {}).get(c.taint_key)
            value = "failing" if current == "failing" else label_value(state)  # never downgraded
            if current != value:
                patch["metadata"]["labels"] = {c.taint_key: value}
            result[:] = [f"label {c.taint_key}={value}; {device} recorded"]
            return patch
        taints = list(node.get("spec", {}).get("taints") or [])
        same = [t for t in taints if t.get("key") == c.taint_key and t.get("effect") == effect]
        if same and not is_ours(same[0], c.taint_key):
            # one taint per (key, effect): someone else's already keeps new pods off; it stays theirs
            record[device]["taint_owner"] = str(same[0].get("value", ""))
            result[:] = [
                f"taint {c.taint_key}={same[0].get('value', '')}:{effect} (not gpuguard's) there; {device} recorded"
            ]
        elif same:
            result[:] = [f"taint {c.taint_key}={OWNER}:{effect} already there; {device} recorded"]
        else:
            taints.append({"key": c.taint_key, "value": OWNER, "effect": effect, "timeAdded": now_rfc3339()})
            result[:] = [f"taint {c.taint_key}={OWNER}:{effect}; {device} recorded"]
        patch["metadata"]["annotations"][RECORD_ANNOTATION] = _encode(record)
        patch["spec"] = {"taints": taints}  # taints have no merge key: the list is replaced whole
        return patch

    _read_modify_write(cluster, node_name, change, deadline)
    return result[0]


def marked(node: dict[str, Any], key: str) -> bool:
    """Whether ``node`` carries a mark of gpuguard's: its taint, its label, or its record."""
    taints = node.get("spec", {}).get("taints") or []
    labels = node.get("metadata", {}).get("labels") or {}
    annotations = node.get("metadata", {}).get("annotations") or {}
    return any(is_ours(t, key) for t in taints) or labels.get(key) in LABEL_VALUES or RECORD_ANNOTATION in annotations


def unmark(cluster: Cluster, node_name: str, deadline: float | None = None) -> list[str]:
    """Remove gpuguard's taints (key ``taint_key``, value ``gpuguard``), label and record from a node.

    Every other taint stays, including one with gpuguard's key that gpuguard did not place (another
    value: an administrator's, a ticket's). Returns what was removed (empty when nothing was gpuguard's).
    """
    key = cluster.config.taint_key
    removed: list[str] = []

    def change(node: dict[str, Any]) -> dict[str, Any] | None:
        taints = list(node.get("spec", {}).get("taints") or [])
        ours = [t for t in taints if is_ours(t, key)]
        labels = node.get("metadata", {}).get("labels") or {}
        annotations = node.get("metadata", {}).get("annotations") or {}
        removed[:] = [f"taint {t['key']}={OWNER}:{t.get('effect')}" for t in ours]
        patch: dict[str, Any] = {"metadata": {}}
        if ours:
            patch["spec"] = {"taints": [t for t in taints if not is_ours(t, key)]}
        if labels.get(key) in LABEL_VALUES:
            patch["metadata"]["labels"] = {key: None}  # null deletes the key in a merge patch
            removed.append(f"label {key}")
        if RECORD_ANNOTATION in annotations:
            patch["metadata"]["annotations"] = {RECORD_ANNOTATION: None}
            removed.append(f"annotation {RECORD_ANNOTATION} ({', '.join(sorted(read_record(node))) or 'empty'})")
        return patch if removed else None

    _read_modify_write(cluster, node_name, change, deadline)
    return removed
