"""The controllers the emulated cluster runs, each from its source, for the failure semantics that
gpuguard's exit codes rely on:

- the Job controller (kubernetes/kubernetes pkg/controller/job: job_controller.go, indexed_job_utils.go,
  pod_failure_policy.go): Indexed pods named JOB-INDEX-xxxxx with JOB_COMPLETION_INDEX, podFailurePolicy
  rules in order (FailJob -> the Job fails with reason PodFailurePolicy and the rule's message, Ignore ->
  not counted, Count or no match -> counted against backoffLimit, reason BackoffLimitExceeded),
  podReplacementPolicy Failed (a replacement only once the old pod is gone from Running);
- the JobSet controller (kubernetes-sigs/jobset v0.12.0 pkg/controllers/jobset_controller.go and
  failure_policy.go): child Jobs JOBSET-RJOB-INDEX labelled with the restart attempt; the first failed
  Job, in rule order then earliest failure, picks the action (FailJobSet, RestartJobSet counted against
  maxRestarts -> ReachedMaxRestarts, RestartJobSetAndIgnoreMaxRestarts; no rule -> RestartJobSet);
  a restart deletes every Job of the old attempt, and BlockingRecreate creates none until all are gone;
- Kubeflow Trainer (kubeflow/trainer v2.3.0 pkg/runtime/framework/plugins/jobset/builder.go and
  plugins/torch/torch.go): a TrainJob becomes a JobSet from its runtime's template, the trainer
  replicatedJob at replicas 1 with numNodes pods, PET_* injected into the "node" container;
- the scheduler: taints and tolerations (NoSchedule, NoExecute), required node affinity (In, NotIn),
  required pod anti-affinity (Exists, hostname) and one GPU pod per node (each takes all its GPUs).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from typing import Any, Final

JOB_INDEX: Final = "batch.kubernetes.io/job-completion-index"
CONTROLLER_UID: Final = "batch.kubernetes.io/controller-uid"
JOB_NAME: Final = "batch.kubernetes.io/job-name"
JS: Final = "jobset.sigs.k8s.io/"
TERMINAL: Final = ("Failed", "Succeeded")
NOW: Final = "2026-12-01T00:00:00Z"
_clock = itertools.count(1)


def stamp() -> str:
    """A strictly increasing time, so 'earliest failure' is well defined within a test."""
    n = next(_clock)
    return f"2026-12-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z"


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in obj.get("status", {}).get("conditions", []) or []:
        if c.get("type") == kind and c.get("status") == "True":
            return dict(c)
    return None


def finished(obj: dict[str, Any]) -> bool:
    return any(condition(obj, t) for t in ("Failed", "Complete", "Completed"))


def set_condition(obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
    obj.setdefault("status", {}).setdefault("conditions", []).append(
        {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": stamp()}
    )


def match_pod_failure_policy(policy: dict[str, Any] | None, pod: dict[str, Any]) -> tuple[str, str]:
    """(action, FailJob message): pod_failure_policy.go matchPodFailurePolicy; no match is Count."""
    status = pod.get("status", {})
    for index, rule in enumerate((policy or {}).get("rules", [])):
        if "onExitCodes" in rule:
            req = rule["onExitCodes"]
            for cs in status.get("containerStatuses", []) or []:
                term = (cs.get("state") or {}).get("terminated")
                if term is None or term.get("exitCode", 0) == 0:
                    continue
                if req.get("containerName") not in (None, cs["name"]):
                    continue
                inside = term["exitCode"] in req["values"]
                if inside == (req["operator"] == "In"):
                    msg = (
                        f"Container {cs['name']} for pod {pod['metadata']['namespace']}/{pod['metadata']['name']} "
                        f"failed with exit code {term['exitCode']} matching {rule['action']} rule at index {index}"
                    )
                    return rule["action"], msg
        else:
            for c in status.get("conditions", []) or []:
                if any(c.get("type") == p["type"] and c.get("status") == p["status"] for p in rule["onPodConditions"]):
                    msg = (
                        f"Pod {pod['metadata']['namespace']}/{pod['metadata']['name']} has condition {c['type']} "
                        f"matching {rule['action']} rule at index {index}"
                    )
                    return rule["action"], msg
    return "Count", ""


class ControlPlane:
    """Mixed into KubeEmulator: call `reconcile` (under its lock) to run every controller once."""

    objects: dict[tuple[str, str, str], dict[str, Any]]
    pods: dict[tuple[str, str], dict[str, Any]]
    nodes: dict[str, dict[str, Any]]
    controller_events: list[tuple[str, str, str]]  # (object, reason, message)
    _handled: set[str]

    def _rv(self) -> str:
        raise NotImplementedError

    def reconcile(self) -> None:
        self._trainjobs()
        self._jobsets()
        self._jobs()
        self._schedule()

    # -- deletion ---------------------------------------------------------------------------------

    def delete_object(self, kind: str, namespace: str, name: str) -> None:
        """Foreground deletion: marked, and gone once its dependents are (the controllers finish it)."""
        obj = self.objects.get((kind, namespace, name))
        if obj is not None:
            obj["metadata"].setdefault("deletionTimestamp", stamp())
            if kind not in ("Job", "JobSet", "TrainJob"):
                del self.objects[(kind, namespace, name)]

    def terminate_pod(self, pod: dict[str, Any]) -> None:
        """A pod that never ran, or has ended, goes at once; a running one is stopped by the kubelet."""
        meta = pod["metadata"]
        if not pod["spec"].get("nodeName") or pod["status"].get("phase") in TERMINAL:
            self.pods.pop((meta["namespace"], meta["name"]), None)
        else:
            meta.setdefault("deletionTimestamp", stamp())

    def _owned(self, kind: str, label: str, uid: str) -> list[tuple[tuple[str, str, str], dict[str, Any]]]:
        return [
            (k, o)
            for k, o in self.objects.items()
            if k[0] == kind and (o["metadata"].get("labels") or {}).get(label) == uid
        ]

    # -- Job --------------------------------------------------------------------------------------

    def _jobs(self) -> None:
        for key, job in list(self.objects.items()):
            if key[0] != "Job":
                continue
            meta, spec = job["metadata"], job["spec"]
            pods = [
                p for p in self.pods.values() if (p["metadata"].get("labels") or {}).get(CONTROLLER_UID) == meta["uid"]
            ]
            if meta.get("deletionTimestamp"):
                for pod in pods:
                    self.terminate_pod(pod)
                if not pods:
                    del self.objects[key]
                continue
            status = job.setdefault("status", {})
            if not finished(job):
                self._job_failures(job, pods)
            if finished(job):
                for pod in pods:
                    if pod["status"].get("phase") not in TERMINAL:
                        self.terminate_pod(pod)
                continue
            completions = int(spec.get("completions", 1))
            done = {p["metadata"]["annotations"][JOB_INDEX] for p in pods if p["status"].get("phase") == "Succeeded"}
            status["succeeded"] = len(done)
            if len(done) == completions:
                set_condition(job, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")
                continue
            for index in map(str, range(completions)):
                mine = [p for p in pods if p["metadata"]["annotations"][JOB_INDEX] == index]
                live = [p for p in mine if p["status"].get("phase") not in TERMINAL]
                if index not in done and not live:
                    self._create_pod(job, int(index))
            status["active"] = len([p for p in pods if p["status"].get("phase") not in TERMINAL])

    def _job_failures(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        status = job["status"]
        for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
            uid = pod["metadata"]["uid"]
            if pod["status"].get("phase") != "Failed" or uid in self._handled:
                continue
            self._handled.add(uid)
            action, message = match_pod_failure_policy(job["spec"].get("podFailurePolicy"), pod)
            if action == "Ignore":
                status["ignored"] = status.get("ignored", 0) + 1
            elif action == "FailJob":
                set_condition(job, "Failed", "PodFailurePolicy", message)
                return
            else:
                status["failed"] = status.get("failed", 0) + 1
                if status["failed"] > int(job["spec"].get("backoffLimit", 6)):
                    set_condition(job, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
                    return

    def _create_pod(self, job: dict[str, Any], index: int) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        name = f"{meta['name']}-{index}-{self._rv().zfill(5)[-5:]}"
        pod_spec = copy.deepcopy(template["spec"])
        for container in pod_spec["containers"]:
            # job_controller.go addCompletionIndexEnvVariables
            env = container.setdefault("env", [])
            ref = {"fieldRef": {"fieldPath": f"metadata.annotations['{JOB_INDEX}']"}}
            env.insert(0, {"name": "JOB_COMPLETION_INDEX", "valueFrom": ref})
        pod_spec["hostname"] = f"{meta['name']}-{index}"
        labels = {
            **(template.get("metadata", {}).get("labels") or {}),
            JOB_NAME: meta["name"],
            CONTROLLER_UID: meta["uid"],
        }
        labels[JOB_INDEX] = str(index)
        annotations = {**(template.get("metadata", {}).get("annotations") or {}), JOB_INDEX: str(index)}
        self.pods[(meta["namespace"], name)] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "uid": f"uid-{name}",
                "resourceVersion": self._rv(),
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": pod_spec,
            "status": {"phase": "Pending", "conditions": []},
        }

    # -- JobSet -----------------------------------------------------------------------------------

    def _jobsets(self) -> None:
        for key, js in list(self.objects.items()):
            if key[0] != "JobSet":
                continue
            meta, spec = js["metadata"], js["spec"]
            status = js.setdefault("status", {})
            status.setdefault("restarts", 0)
            status.setdefault("restartsCountTowardsMax", 0)
            jobs = self._owned("Job", JS + "jobset-uid", meta["uid"])
            if meta.get("deletionTimestamp"):
                for (_, ns, name), _ in jobs:
                    self.delete_object("Job", ns, name)
                if not jobs:
                    del self.objects[key]
                continue
            previous = [
                (k, j) for k, j in jobs if int(j["metadata"]["labels"][JS + "restart-attempt"]) < status["restarts"]
            ]
            current = [(k, j) for k, j in jobs if (k, j) not in previous]
            if finished(js):
                for (_, ns, name), job in current:
                    if not finished(job):
                        self.delete_object("Job", ns, name)
                continue
            for (_, ns, name), _ in previous:
                self.delete_object("Job", ns, name)
            failed = [j for _, j in current if condition(j, "Failed")]
            if failed:
                self._failure_policy(js, failed)
                continue
            expected = sum(int(r.get("replicas", 1)) for r in spec["replicatedJobs"])
            if len([j for _, j in current if condition(j, "Complete")]) == expected:
                set_condition(js, "Completed", "AllJobsCompleted", "jobset completed successfully")
                continue
            subdomain = (spec.get("network") or {}).get("subdomain") or meta["name"]
            if ("Service", meta["namespace"], subdomain) not in self.objects:
                # jobset_controller.go createHeadlessSvcIfNecessary
                self.create(  # type: ignore[attr-defined]
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "metadata": {"name": subdomain, "namespace": meta["namespace"]},
                        "spec": {
                            "clusterIP": "None",
                            "selector": {JS + "jobset-name": meta["name"]},
                            "publishNotReadyAddresses": True,
                        },
                    }
                )
            blocking = (spec.get("failurePolicy") or {}).get("restartStrategy") == "BlockingRecreate"
            if blocking and previous:
                continue  # constructJobsFromTemplate: nothing new until the old attempt is gone
            names = {k[2] for k, _ in jobs}
            for rjob in spec["replicatedJobs"]:
                for index in range(int(rjob.get("replicas", 1))):
                    name = f"{meta['name']}-{rjob['name']}-{index}"
                    if name not in names:  # shouldCreateJob: not while one of that name is still there
                        self._create_child_job(js, rjob, index, name)

    def _failure_policy(self, js: dict[str, Any], failed: list[dict[str, Any]]) -> None:
        """failure_policy.go executeFailurePolicy, v0.12.0."""
        policy, status, name = js["spec"].get("failurePolicy"), js["status"], js["metadata"]["name"]
        if policy is None:
            set_condition(js, "Failed", "FailedJobs", "jobset failed due to one or more job failures")
            return
        action, rule_name = "RestartJobSet", ""
        for rule in policy.get("rules", []):
            matching = [j for j in failed if _rule_applies(rule, j)]
            if matching:
                action, rule_name = rule["action"], rule.get("name", "")
                break
        if action == "FailJobSet":
            set_condition(js, "Failed", "FailJobSetFailurePolicyAction", "applying FailJobSet failure policy action")
        elif action == "RestartJobSet" and status["restartsCountTowardsMax"] >= int(policy.get("maxRestarts", 0)):
            set_condition(js, "Failed", "ReachedMaxRestarts", "jobset failed due to reaching max number of restarts")
        else:
            status["restarts"] += 1
            if action == "RestartJobSet":
                status["restartsCountTowardsMax"] += 1
        self.controller_events.append((name, action, rule_name))

    def _create_child_job(self, js: dict[str, Any], rjob: dict[str, Any], index: int, name: str) -> None:
        meta = js["metadata"]
        template = copy.deepcopy(rjob["template"])
        marks = {
            JS + "jobset-name": meta["name"],
            JS + "jobset-uid": meta["uid"],
            JS + "replicatedjob-name": rjob["name"],
            JS + "restart-attempt": str(js["status"]["restarts"]),
            JS + "job-index": str(index),
            JS + "job-key": hashlib.sha1(f"{meta['namespace']}/{name}".encode()).hexdigest(),
        }
        exclusive = (meta.get("annotations") or {}).get("alpha.jobset.sigs.k8s.io/exclusive-topology")
        pod_meta = template["spec"]["template"].setdefault("metadata", {})
        for obj in (template.setdefault("metadata", {}), pod_meta):
            obj["labels"] = {**(obj.get("labels") or {}), **marks}
            obj["annotations"] = {**(obj.get("annotations") or {}), **marks}
            if exclusive:
                obj["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] = exclusive
        if (js["spec"].get("network") or {}).get("enableDNSHostnames", True):
            template["spec"]["template"]["spec"]["subdomain"] = (js["spec"].get("network") or {}).get(
                "subdomain"
            ) or meta["name"]
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {**template["metadata"], "name": name, "namespace": meta["namespace"]},
        }
        job["spec"] = template["spec"]
        self.create(job)  # type: ignore[attr-defined]

    # -- Kubeflow Trainer -------------------------------------------------------------------------

    def _trainjobs(self) -> None:
        for key, tj in list(self.objects.items()):
            if key[0] != "TrainJob":
                continue
            meta = tj["metadata"]
            jobset = self.objects.get(("JobSet", meta["namespace"], meta["name"]))
            if meta.get("deletionTimestamp"):
                if jobset is not None:
                    self.delete_object("JobSet", meta["namespace"], meta["name"])
                else:
                    del self.objects[key]
                continue
            if jobset is not None:
                if condition(jobset, "Failed") and not condition(tj, "Failed"):
                    reason = condition(jobset, "Failed") or {}
                    set_condition(tj, "Failed", str(reason.get("reason")), str(reason.get("message")))
                continue
            if not finished(tj):
                self.create(self._jobset_for(tj))  # type: ignore[attr-defined]

    def _jobset_for(self, tj: dict[str, Any]) -> dict[str, Any]:
        meta, trainer = tj["metadata"], tj["spec"].get("trainer") or {}
        ref = tj["spec"]["runtimeRef"]
        namespace = meta["namespace"] if ref.get("kind", "ClusterTrainingRuntime") == "TrainingRuntime" else ""
        runtime = self.objects[(ref.get("kind", "ClusterTrainingRuntime"), namespace, ref["name"])]
        spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
        nodes = int(trainer.get("numNodes") or runtime["spec"]["mlPolicy"].get("numNodes", 1))
        for rjob in spec["replicatedJobs"]:
            if (rjob["template"].get("metadata", {}).get("labels") or {}).get(
                "trainer.kubeflow.org/trainjob-ancestor-step"
            ) != "trainer":
                continue
            rjob["replicas"] = 1
            rjob["template"]["spec"]["parallelism"] = rjob["template"]["spec"]["completions"] = nodes
            for container in rjob["template"]["spec"]["template"]["spec"]["containers"]:
                if container["name"] != "node":
                    continue
                pet = {
                    "PET_NNODES": {"value": str(nodes)},
                    "PET_NPROC_PER_NODE": {"value": str(trainer.get("numProcPerNode", "auto"))},
                    "PET_NODE_RANK": {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{JOB_INDEX}']"}}},
                    "PET_MASTER_ADDR": {"value": f"{meta['name']}-node-0-0.{meta['name']}"},
                    "PET_MASTER_PORT": {"value": "29500"},  # constants.ContainerTrainerPort
                }
                env = [e for e in container.get("env", []) if e["name"] not in pet]
                container["env"] = env + [{"name": n, **v} for n, v in pet.items()]
        return {
            "apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": {"trainer.kubeflow.org/trainjob-name": meta["name"]},
                "ownerReferences": [
                    {
                        "apiVersion": "trainer.kubeflow.org/v1alpha1",
                        "kind": "TrainJob",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": spec,
        }

    # -- scheduler --------------------------------------------------------------------------------

    def _schedule(self) -> None:
        for pod in sorted(self.pods.values(), key=lambda p: p["metadata"]["name"]):
            if pod["spec"].get("nodeName") or pod["metadata"].get("deletionTimestamp"):
                continue
            for name in sorted(self.nodes):
                if self._fits(pod, self.nodes[name]):
                    pod["spec"]["nodeName"] = name
                    pod["status"]["conditions"].append({"type": "PodScheduled", "status": "True"})
                    break

    def _fits(self, pod: dict[str, Any], node: dict[str, Any]) -> bool:
        name, spec = node["metadata"]["name"], pod["spec"]
        if node["spec"].get("unschedulable"):
            return False
        tolerations = spec.get("tolerations") or []
        for taint in node["spec"].get("taints") or []:
            if taint["effect"] in ("NoSchedule", "NoExecute") and not any(_tolerates(t, taint) for t in tolerations):
                return False
        labels = node["metadata"].get("labels") or {}
        affinity = spec.get("affinity") or {}
        required = (affinity.get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
        if required and not any(_node_term(t, labels) for t in required["nodeSelectorTerms"]):
            return False
        here = [
            p
            for p in self.pods.values()
            if p["spec"].get("nodeName") == name and p["status"].get("phase") not in TERMINAL and p is not pod
        ]
        # every pod here takes all of the node's GPUs (and JobSet exclusive placement asks the same)
        return not here


def _tolerates(toleration: dict[str, Any], taint: dict[str, Any]) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint["effect"]:
        return False
    if toleration.get("operator") == "Exists":
        return not toleration.get("key") or toleration["key"] == taint["key"]
    return toleration.get("key") == taint["key"] and toleration.get("value", "") == taint.get("value", "")


def _node_term(term: dict[str, Any], labels: dict[str, str]) -> bool:
    for expr in term.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and value is None:
            return False
    return True


def _rule_applies(rule: dict[str, Any], job: dict[str, Any]) -> bool:
    """failure_policy.go ruleIsApplicable: reasons listed (or none), a pattern found (Go regexp.MatchString)."""
    failure = condition(job, "Failed") or {}
    reasons = rule.get("onJobFailureReasons") or []
    patterns = rule.get("onJobFailureMessagePatterns") or []
    targets = rule.get("targetReplicatedJobs") or []
    parent = (job["metadata"].get("labels") or {}).get(JS + "replicatedjob-name")
    return (
        (not reasons or failure.get("reason") in reasons)
        and (not patterns or any(re.search(p, str(failure.get("message", ""))) for p in patterns))
        and parent is not None
        and (not targets or parent in targets)
    )
