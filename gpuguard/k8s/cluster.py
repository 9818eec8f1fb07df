"""Cluster access with the official ``kubernetes`` client, and the one place its calls are made.

In a pod: the service account (``KUBERNETES_SERVICE_HOST`` set). Outside: a kubeconfig. Neither:
off, said once. The pod's name, namespace and node come from the Downward API environment.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gpuguard.errors import KubernetesError, KubernetesUnreachableError
from gpuguard.k8s._errors import RETRYABLE, translate
from gpuguard.k8s.config import KubernetesConfig

log = logging.getLogger("gpuguard.k8s")
T = TypeVar("T")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass
class Cluster:
    """An API client and who we are: the pod, its namespace, its node.

    Every call goes through `call`, which bounds it by ``request_timeout_s`` and by the caller's
    deadline, retries 429 and 5xx with backoff, and translates errors.
    """

    api: Any  # kubernetes.client.ApiClient
    pod: str
    namespace: str
    node: str
    source: str  # "in-cluster" or a kubeconfig path
    config: KubernetesConfig
    pod_uid: str = ""

    def call(
        self,
        verb: str,
        resource: str,
        fn: Callable[..., T],
        *args: Any,
        group: str = "",
        deadline: float | None = None,
        **kwargs: Any,
    ) -> T:
        """One API call with a timeout, bounded retries on 429/5xx, and gpuguard errors."""
        delay = 0.2
        while True:
            timeout = self.config.request_timeout_s
            if deadline is not None:
                timeout = min(timeout, max(0.05, deadline - time.monotonic()))
            try:
                return fn(*args, _request_timeout=timeout, **kwargs)
            except Exception as exc:
                error = translate(exc, verb, resource, group)
                out_of_time = deadline is not None and time.monotonic() + delay >= deadline
                if error.status in RETRYABLE and not out_of_time:
                    log.info("%s; retrying in %.1fs", error, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                raise error from exc

    def call_json(
        self,
        verb: str,
        resource: str,
        fn: Callable[..., Any],
        *args: Any,
        group: str = "",
        deadline: float | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`call`, answered as raw JSON: fields newer than the client's models survive."""
        response: Any = self.call(
            verb, resource, fn, *args, group=group, deadline=deadline, _preload_content=False, **kwargs
        )
        data: dict[str, Any] = json.loads(response.data)
        return data

    def create_json(
        self, resource: str, path: str, body: dict[str, Any], *, group: str = "", deadline: float | None = None
    ) -> dict[str, Any]:
        """POST ``body`` as raw JSON, past the client's models.

        kubernetes 37's typed methods validate a dict body into their model first (pydantic), which turns
        an Event's ``eventTime`` string into a datetime and writes it back with ``isoformat()``: at
        microsecond 0 that is ``...:00+00:00``, which a real API server rejects (MicroTime needs six
        fractional digits, apimachinery/pkg/apis/meta/v1/micro_time.go). The JSON sent is the JSON given.
        """
        from kubernetes.client.exceptions import ApiException

        def send(_request_timeout: float) -> dict[str, Any]:
            method, url, headers, data, post = self.api.param_serialize(
                method="POST",
                resource_path=path,
                header_params={"Content-Type": "application/json", "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self.api.call_api(
                method, url, header_params=headers, body=data, post_params=post, _request_timeout=_request_timeout
            )
            response.read()
            if not 200 <= response.status < 300:
                raise ApiException(http_resp=response)
            answer: dict[str, Any] = json.loads(response.data)
            return answer

        return self.call("create", resource, send, group=group, deadline=deadline)

    def create_event(self, namespace: str, body: dict[str, Any], deadline: float | None = None) -> dict[str, Any]:
        """An events.k8s.io/v1 Event, sent as raw JSON (`create_json`: its eventTime stays six digits)."""
        path = f"/apis/events.k8s.io/v1/namespaces/{namespace}/events"
        return self.create_json("events", path, body, group="events.k8s.io", deadline=deadline)

    def get_pod_json(self, deadline: float | None = None) -> dict[str, Any]:
        """The pod as raw JSON (allocatedResourcesStatus and other new fields included)."""
        from kubernetes import client

        # GET .../pods/NAME/status answers the whole pod (spec included) and is authorized as
        # pods/status, so a 403 must name pods/status, not pods.
        read = client.CoreV1Api(self.api).read_namespaced_pod_status
        return self.call_json("get", "pods/status", read, self.pod, self.namespace, deadline=deadline)


def _downward(env: Mapping[str, str], service_account: Path) -> tuple[str, str, str, str]:
    pod = env.get("POD_NAME") or env.get("HOSTNAME", "")
    namespace = env.get("POD_NAMESPACE", "")
    if not namespace:
        try:
            namespace = (service_account / "namespace").read_text().strip()
        except OSError:
            namespace = "default"
    return pod, namespace, env.get("NODE_NAME", ""), env.get("POD_UID", "")


_SAID: set[str] = set()  # what has been logged once already


def connect(
    config: KubernetesConfig,
    env: Mapping[str, str] | None = None,
    service_account: Path = SERVICE_ACCOUNT,
    *,
    need_pod: bool = True,
) -> Cluster | None:
    """Connect as the pod's service account, or through a kubeconfig; None when neither is there.

    ``need_pod=False`` is for tools that act on nodes only (``gpuguard k8s untaint``, the node check).

    Raises:
        KubernetesError: ``enabled="on"`` but no cluster could be configured.
    """
    env = os.environ if env is None else env
    if config.enabled == "off":
        return None
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    try:
        if env.get("KUBERNETES_SERVICE_HOST"):
            loader = kube_config.incluster_config.InClusterConfigLoader(  # type: ignore[no-untyped-call]
                token_filename=str(service_account / "token"),
                cert_filename=str(service_account / "ca.crt"),
                environ=env,
            )
            loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
            source = "in-cluster"
        else:
            path = config.kubeconfig or env.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            if not Path(path).is_file():
                if config.enabled == "on":
                    raise KubernetesError(
                        f"kubernetes.enabled is on, but there is no service account and no kubeconfig at {path}",
                        status=0,
                        verb="configure",
                        resource="cluster",
                    )
                if "off" not in _SAID:
                    log.info("Kubernetes actions are off: not in a cluster and no kubeconfig at %s", path)
                    _SAID.add("off")
                return None
            kube_config.load_kube_config(config_file=path, client_configuration=configuration)  # type: ignore[no-untyped-call]
            source = path
    except KubernetesError:
        raise
    except Exception as exc:  # a malformed kubeconfig or service account: say what, never its content
        raise KubernetesError(
            f"cannot configure the Kubernetes client ({type(exc).__name__})",
            status=0,
            verb="configure",
            resource="cluster",
        ) from None
    configuration.retries = 0  # gpuguard retries itself, within its deadline
    pod, namespace, node, uid = _downward(env, service_account)
    if not pod and need_pod:
        raise KubernetesError(
            "POD_NAME is not set: add it from the Downward API (fieldRef metadata.name)",
            status=0,
            verb="configure",
            resource="pods",
        )
    log.info("Kubernetes: %s, pod %s/%s on node %s", source, namespace, pod, node or "?")
    return Cluster(client.ApiClient(configuration), pod, namespace, node, source, config, uid)


__all__ = ["Cluster", "KubernetesUnreachableError", "connect"]
