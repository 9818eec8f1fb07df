"""The emulated cluster's kubelets: they run each bound pod's container as a real process (or a
scripted one), report its exit code in the pod's status, restart it in place where a container
restartPolicyRules matches (KEP-5307, when the release has ContainerRestartRules on), and stop it on
deletion (SIGTERM, then SIGKILL after the grace period). One thread runs the controllers and the
kubelets together, every ``interval``.

Environment of a container, as the kubelet builds it (pkg/kubelet/kubelet_pods.go makeEnvironmentVariables):
``value``, ``fieldRef`` (metadata.name, namespace, uid, spec.nodeName, metadata.labels['k'],
metadata.annotations['k']) and ``$(VAR)`` expansion in the command (third_party/forked/golang/expansion).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from helpers.kube_controllers import TERMINAL


class Handle(Protocol):
    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


Runner = Callable[[dict[str, Any], dict[str, str]], Handle]


def field_value(pod: dict[str, Any], path: str) -> str:
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return str((pod["metadata"].get(m.group(1)) or {}).get(m.group(2), ""))
    value: Any = pod
    for part in path.split("."):
        value = value.get(part, "")
    return str(value)


def environment(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            env[item["name"]] = field_value(pod, item["valueFrom"]["fieldRef"]["fieldPath"])
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


@dataclass
class Scripted:
    """A container that ends with ``code`` at once (None: runs until stopped)."""

    code: int | None
    stopped: int | None = None

    def poll(self) -> int | None:
        return self.stopped if self.stopped is not None else self.code

    def terminate(self) -> None:
        self.stopped = 143

    def kill(self) -> None:
        self.stopped = 137


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Processes:
    """Runs a pod's container as a real process: ``gpuguard-run`` as this interpreter's module, cluster
    DNS names as 127.0.0.1 with one port per gang attempt, the fake NVML of the pod's node."""

    folder: Path
    kubeconfig: Callable[[dict[str, Any]], Path]  # the pod's service account's credentials
    nvml: Callable[[str], str]  # node -> GPUGUARD_FAKE_NVML
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def _port(self, pod: dict[str, Any]) -> int:
        labels = pod["metadata"].get("labels") or {}
        attempt = f"{labels.get('jobset.sigs.k8s.io/jobset-uid')}-{labels.get('jobset.sigs.k8s.io/restart-attempt')}"
        return self.ports.setdefault(attempt, free_port())

    def __call__(self, pod: dict[str, Any], container_env: dict[str, str]) -> Handle:
        (container,) = pod["spec"]["containers"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUGUARD_", "KUBERNETES_", "PET_"))}
        env |= container_env | self.extra_env
        env |= {
            "KUBECONFIG": str(self.kubeconfig(pod)),
            "GPUGUARD_KUBERNETES_ENABLED": "auto",
            "GPUGUARD_FAKE_NVML": self.nvml(pod["spec"]["nodeName"]),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        if "PET_MASTER_ADDR" in env:  # Trainer's rendezvous: cluster DNS -> this machine
            env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"] = "127.0.0.1", str(self._port(pod))
        command = [expand(part, env) for part in container["command"]]
        command = [re.sub(r"^--rdzv-endpoint=.*", f"--rdzv-endpoint=127.0.0.1:{self._port(pod)}", c) for c in command]
        if command[0] == "gpuguard-run":
            command = [sys.executable, "-m", "gpuguard.integrations.torchrun", *command[1:]]
        log = self.folder / f"{pod['metadata']['name']}.log"
        self.logs[pod["metadata"]["name"]] = log
        with log.open("w") as out:
            return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder)


@dataclass
class Kubelets:
    kube: Any
    runner: Runner
    grace_s: float = 20.0  # the emulator's cap on terminationGracePeriodSeconds
    running: dict[str, tuple[Handle, float | None]] = field(default_factory=dict)  # pod uid -> (handle, SIGTERM at)

    def sync(self) -> None:
        kube = self.kube
        for pod in list(kube.pods.values()):
            meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
            uid = meta["uid"]
            if not spec.get("nodeName"):
                continue
            handle = self.running.get(uid)
            if meta.get("deletionTimestamp"):
                self._stop(pod, handle)
                continue
            if handle is None and status.get("phase") == "Pending":
                (container,) = spec["containers"]
                self.running[uid] = (self.runner(pod, environment(pod, container)), None)
                status["phase"] = "Running"
                status["containerStatuses"] = [
                    {
                        "name": container["name"],
                        "image": container["image"],
                        "imageID": "",
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {}},
                    }
                ]
                status["conditions"] = [c for c in status["conditions"] if c["type"] != "Ready"]
                status["conditions"].append({"type": "Ready", "status": "True"})
                continue
            if handle is None:
                continue
            code = handle[0].poll()
            if code is None:
                continue
            self._exited(pod, code)

    def _exited(self, pod: dict[str, Any], code: int) -> None:
        (container,) = pod["spec"]["containers"]
        cs = pod["status"]["containerStatuses"][0]
        restart = [
            r
            for r in container.get("restartPolicyRules", []) or []
            if r["action"] in ("Restart", "RestartAllContainers")
            and (code in r["exitCodes"]["values"]) == (r["exitCodes"]["operator"] == "In")
        ]
        if restart and self.kube.profile.gates["ContainerRestartRules"]:
            cs["restartCount"] += 1
            cs["lastState"] = {"terminated": {"exitCode": code}}
            self.running[pod["metadata"]["uid"]] = (self.runner(pod, environment(pod, container)), None)
            return
        del self.running[pod["metadata"]["uid"]]
        cs["state"] = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}
        cs["ready"] = False
        pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod["status"]["conditions"] = [c for c in pod["status"]["conditions"] if c["type"] != "Ready"]

    def _stop(self, pod: dict[str, Any], handle: tuple[Handle, float | None] | None) -> None:
        meta = pod["metadata"]
        if handle is None or pod["status"].get("phase") in TERMINAL:
            self.kube.pods.pop((meta["namespace"], meta["name"]), None)
            self.running.pop(meta["uid"], None)
            return
        process, since = handle
        if since is None:
            process.terminate()
            self.running[meta["uid"]] = (process, time.monotonic())
        elif process.poll() is None and time.monotonic() - since > min(
            self.grace_s, pod["spec"].get("terminationGracePeriodSeconds", 30)
        ):
            process.kill()
        if process.poll() is not None:
            self.running.pop(meta["uid"], None)
            self.kube.pods.pop((meta["namespace"], meta["name"]), None)

    def stop_all(self) -> None:
        for process, _ in self.running.values():
            if process.poll() is None:
                process.kill()
        for process, _ in self.running.values():
            if isinstance(process, subprocess.Popen):
                process.wait(10)


class Cluster:
    """The controllers and kubelets on a thread of their own, every ``interval`` seconds."""

    def __init__(self, kube: Any, runner: Runner, interval: float = 0.05) -> None:
        self.kube, self.kubelets, self.interval = kube, Kubelets(kube, runner), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kube-emulator-cluster", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Cluster:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.kubelets.stop_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.kube._lock:
                    self.kube.reconcile()
                    self.kubelets.sync()
            except BaseException as exc:  # a test helper bug: the test's wait says so
                self.error = exc
                raise
            self._stop.wait(self.interval)

    def wait(self, what: Callable[[], Any], timeout: float, describe: str) -> Any:
        """Wait for ``what()`` to be true (a guard against hangs, not a timing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise AssertionError(f"the cluster thread failed: {self.error!r}") from self.error
            with self.kube._lock:
                found = what()
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {describe}")


__all__ = ["Cluster", "Handle", "Kubelets", "Processes", "Scripted", "environment", "signal"]
