"""What gpuguard asks of Kubernetes when a job leaves a bad GPU, in order, within one deadline:

1. a pod condition (``gpuguard.io/GPUHealthy`` = False) through the pods/status subresource;
2. an events.k8s.io/v1 Event on the pod, with the GPU's UUID and the evidence;
3. the hardware marked: a node taint or label, and for DRA-allocated GPUs a DeviceTaintRule — by the
   pod itself (``marker: pod``), or by the node agent from the pod's own report (``marker: agent``,
   the training pod holding no node rights: see `gpuguard.k8s.reports`);
4. leaving: the exit code (default), the Eviction API, or deleting the pod.

Each action is switchable and bounded. A failure is reported and the next action still runs: a 403
names the RBAC rule to add, a 404 (pod gone) is skipped, a 409 is re-read and retried, 429/5xx back
off; an unreachable API server skips everything left. The job leaves with its exit code regardless.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from gpuguard.errors import KubernetesError, KubernetesUnreachableError
from gpuguard.k8s import node_marks, reports
from gpuguard.k8s.cluster import Cluster
from gpuguard.k8s.dra import DeviceRef, Dra

log = logging.getLogger("gpuguard.k8s")

# events.k8s.io/v1 Event.note is limited to 1 KiB counted in bytes, not characters
# (pkg/apis/core/validation/events.go: NoteLengthLimit = 1024, len(event.Note) on a Go string).
NOTE_LIMIT_BYTES: Final = 1024


@dataclass(frozen=True)
class ActionOutcome:
    """One action's result: ``done``, ``skipped`` or ``failed``, and why."""

    action: str
    outcome: str
    detail: str = ""


def micro_time(moment: _dt.datetime | None = None) -> str:
    """A MicroTime: RFC 3339 with exactly six fractional digits, always, even when they are all 0
    (apimachinery/pkg/apis/meta/v1/micro_time.go, RFC3339Micro = "2006-01-02T15:04:05.000000Z07:00")."""
    moment = (moment or _dt.datetime.now(_dt.timezone.utc)).astimezone(_dt.timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond:06d}Z"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def truncate_bytes(text: str, limit: int, marker: str = "...") -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary, ``marker`` appended when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - len(marker.encode())].decode(errors="ignore") + marker


def _camel(text: str) -> str:
    return "".join(part[:1].upper() + part[1:].lower() for part in text.replace("-", "_").split("_") if part)


def _reason_codes(evidence: dict[str, Any]) -> list[str]:
    codes = []
    for reason in evidence.get("reasons", []) or []:
        code = reason.get("code") if isinstance(reason, dict) else reason
        xid = (reason.get("evidence") or {}).get("xid") if isinstance(reason, dict) else None
        codes.append(f"{code}{f' {xid}' if xid is not None else ''}")
    return [str(c)[:80] for c in codes if c]


class KubernetesActions:
    """Runs the evacuation actions for one pod."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.config = cluster.config
        self.dra = Dra(cluster)

    def evacuate(
        self,
        *,
        device: str | None,
        state: str,
        message: str,
        evidence: dict[str, Any],
        action: str,
        exit_code: int,
        report: bool = True,
        mark: bool = True,
        leave: bool = True,
    ) -> list[ActionOutcome]:
        """Run every enabled action within ``deadline_s``; never raises.

        Args:
            device: the GPU's UUID, when this rank's GPU is the cause.
            state: the GPU's state (``FAILING``, ...), for the condition's reason.
            message: one sentence for the condition and the Event.
            evidence: reasons and thresholds, summarised into the Event's note.
            action: ``reschedule`` or ``restart``.
            report: set the condition and create the Event (the rank that decided does).
            mark: mark the node or device (only the rank whose GPU is bad should).
            leave: run the leave action (once per pod).
        """
        c = self.config
        deadline = time.monotonic() + c.deadline_s
        steps: list[tuple[str, bool, Callable[[float], str]]] = [
            ("condition", report and c.condition, lambda d: self.set_condition(state, message, device, d)),
            ("event", report and c.event, lambda d: self.create_event(message, device, evidence, action, d)),
            (
                "node-" + c.mark,
                mark and c.mark != "none" and device is not None and action == "reschedule",
                lambda d: self.mark_node(device or "", d, state=state, reasons=_reason_codes(evidence)),
            ),
            (
                "device-taint-rule",
                mark and c.dra and c.marker == "pod" and device is not None and action == "reschedule",
                lambda d: self.taint_dra_device(device or "", d, state=state),
            ),
            ("leave-" + c.leave, leave and c.leave != "exit", self.leave),
        ]
        outcomes: list[ActionOutcome] = []
        unreachable = False
        for name, enabled, run in steps:
            if not enabled:
                continue
            if unreachable or time.monotonic() >= deadline:
                outcomes.append(ActionOutcome(name, "skipped", "API server unreachable" if unreachable else "deadline"))
                continue
            try:
                outcomes.append(ActionOutcome(name, "done", run(deadline)))
            except KubernetesUnreachableError as exc:
                unreachable = True
                outcomes.append(ActionOutcome(name, "failed", str(exc)))
            except KubernetesError as exc:
                outcomes.append(ActionOutcome(name, "skipped" if exc.status == 404 else "failed", str(exc)))
        for done in outcomes:
            level = logging.INFO if done.outcome == "done" else logging.WARNING
            log.log(level, "kubernetes %s: %s %s", done.action, done.outcome, done.detail)
        return outcomes

    # -- the actions ----------------------------------------------------------------------------

    def set_condition(self, state: str, message: str, device: str | None, deadline: float) -> str:
        from kubernetes import client

        cl = self.cluster
        condition = {
            "type": self.config.condition_type,
            "status": "False",
            "reason": f"GPU{_camel(state)}",
            "message": (f"GPU {device}: " if device else "") + message,
            "lastTransitionTime": _now(),
            "lastProbeTime": _now(),
        }
        # A strategic merge patch: conditions merge by type, so the kubelet's own are untouched.
        cl.call(
            "patch",
            "pods/status",
            client.CoreV1Api(cl.api).patch_namespaced_pod_status,
            cl.pod,
            cl.namespace,
            {"status": {"conditions": [condition]}},
            deadline=deadline,
            _content_type="application/strategic-merge-patch+json",
        )
        return f"{condition['type']}=False ({condition['reason']})"

    def create_event(
        self, message: str, device: str | None, evidence: dict[str, Any], action: str, deadline: float
    ) -> str:

        cl = self.cluster
        if not cl.pod_uid:
            cl.pod_uid = str(cl.get_pod_json(deadline).get("metadata", {}).get("uid", ""))
        summary = json.dumps(evidence, separators=(",", ":"), default=str)
        note = f"{message}. GPU {device or '-'} on node {cl.node or '-'}. Evidence: {summary}"
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": f"{cl.pod}.gpuguard-", "namespace": cl.namespace},
            "eventTime": micro_time(),
            "type": "Warning",
            "reason": "GPUUnhealthy",
            "action": "RestartInPlace" if action == "restart" else "Reschedule",
            "note": truncate_bytes(note, NOTE_LIMIT_BYTES),
            "regarding": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": cl.pod,
                "namespace": cl.namespace,
                "uid": cl.pod_uid,
            },
            "reportingController": "gpuguard.io/guard",
            "reportingInstance": cl.pod[:128],
        }
        cl.create_event(cl.namespace, body, deadline)  # raw JSON: eventTime keeps its six digits
        return "Warning GPUUnhealthy"

    def mark_node(
        self, device: str, deadline: float, *, state: str = "FAILING", reasons: list[str] | None = None
    ) -> str:
        """Mark the node for ``device``: taint or label it (one taint per key and effect) and record it —
        itself, or through the node agent from this pod's report (``marker: agent``)."""
        cl = self.cluster
        if not cl.node:
            raise KubernetesError(
                "NODE_NAME is not set: add it from the Downward API (fieldRef spec.nodeName)",
                status=404,
                verb="patch",
                resource="nodes",
            )
        if self.config.marker == "agent":
            ref = self._dra_ref(device, deadline) if self.config.dra else None
            reports.report(cl, device, state=state, reasons=reasons or [], dra=ref, deadline=deadline)
            return reports.wait_marked(cl, device, deadline)
        return node_marks.mark(cl, cl.node, device=device, state=state, reasons=reasons or [], deadline=deadline)

    def _dra_ref(self, device: str, deadline: float) -> DeviceRef | None:
        """The DRA device behind ``device`` for the agent to taint; None when there is none (said, not raised)."""
        try:
            if self.dra.version("devicetaintrules", deadline) is None:
                return None
            return self.dra.device_for(device, deadline)
        except KubernetesError as exc:
            log.warning("the DRA device behind %s could not be looked up for the node agent: %s", device, exc)
            return None

    def taint_dra_device(self, device: str, deadline: float, *, state: str = "FAILING") -> str:
        """A DeviceTaintRule for the DRA device behind ``device``; skipped when GPUs are not DRA-allocated.

        An escalated DEGRADED GPU gets ``NoSchedule`` at most (`node_marks.effect_for`): the job left it.
        """
        if self.dra.version("devicetaintrules", deadline) is None:
            raise KubernetesError(
                "resource.k8s.io DeviceTaintRules are not served here",
                status=404,
                verb="create",
                resource="devicetaintrules",
            )
        ref = self.dra.device_for(device, deadline)
        if ref is None:
            raise KubernetesError(
                f"no DRA device of driver {self.config.dra_driver} with UUID {device} is allocated to this pod",
                status=404,
                verb="get",
                resource="resourceclaims",
            )
        return self.dra.taint(ref, device, deadline, effect=node_marks.effect_for(state, self.config.taint_effect))

    def leave(self, deadline: float) -> str:
        from kubernetes import client

        cl = self.cluster
        core = client.CoreV1Api(cl.api)
        if self.config.leave == "evict":
            body = {
                "apiVersion": "policy/v1",
                "kind": "Eviction",
                "metadata": {"name": cl.pod, "namespace": cl.namespace},
            }
            cl.call(
                "create",
                "pods/eviction",
                core.create_namespaced_pod_eviction,
                cl.pod,
                cl.namespace,
                body,
                deadline=deadline,
            )
            return "evicted (DisruptionTarget)"
        # A grace period, never 0: the kubelet's SIGTERM finds the process already leaving with its exit
        # code, which the Job's podFailurePolicy reads (a kill at once would exit 137 and count as a
        # failure). A plain delete sets no DisruptionTarget condition; only eviction does.
        grace = self.config.delete_grace_period_s
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace is not None:  # else the pod's own terminationGracePeriodSeconds applies
            options["gracePeriodSeconds"] = grace
        cl.call("delete", "pods", core.delete_namespaced_pod, cl.pod, cl.namespace, body=options, deadline=deadline)
        return "deleted (" + (f"grace period {grace}s" if grace else "the pod's grace period") + ")"
