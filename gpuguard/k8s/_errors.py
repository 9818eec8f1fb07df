"""The one place where the kubernetes client's errors become gpuguard's.

Messages carry the verb, the resource and the server's reason — never a request's headers, so no
token or credential can reach a log.
"""

from __future__ import annotations

import json
from typing import Final

from gpuguard.errors import KubernetesError, KubernetesForbiddenError, KubernetesUnreachableError
from gpuguard.k8s.rbac import CLUSTER_SCOPED

RETRYABLE: Final = frozenset({429, 500, 502, 503, 504})


def _server_message(body: object) -> str:
    try:
        data = json.loads(body) if isinstance(body, (str, bytes)) else None
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])[:300]
    return ""


def rbac_rule(verb: str, group: str, resource: str) -> str:
    """The rule a Role (or ClusterRole, for cluster-scoped resources) needs for this call."""
    kind = "ClusterRole" if resource.split("/", maxsplit=1)[0] in CLUSTER_SCOPED else "Role"
    return f'add to the {kind}: {{apiGroups: ["{group}"], resources: ["{resource}"], verbs: ["{verb}"]}}'


def translate(exc: BaseException, verb: str, resource: str, group: str = "") -> KubernetesError:
    """Map an exception from the kubernetes client (or urllib3 under it) to gpuguard's tree."""
    status = getattr(exc, "status", None)
    name = f"{group}/{resource}" if group else resource
    if isinstance(status, int) and status > 0:
        server = _server_message(getattr(exc, "body", None)) or str(getattr(exc, "reason", "") or "")
        if status == 403:
            return KubernetesForbiddenError(
                f"{verb} {name}: forbidden ({server}); {rbac_rule(verb, group, resource)}",
                status=status,
                verb=verb,
                resource=name,
            )
        return KubernetesError(f"{verb} {name}: HTTP {status} ({server})", status=status, verb=verb, resource=name)
    # No HTTP status: the server was not reached (refused, timed out, DNS, TLS).
    return KubernetesUnreachableError(
        f"{verb} {name}: API server unreachable ({type(exc).__name__})", status=0, verb=verb, resource=name
    )
