"""Validate custom resources against the CRDs vendored under tests/data/crds (see its README).

The API server validates a custom resource with the CRD's structural schema, and with kubectl's
default ``--validate=strict`` (server-side field validation) an unknown field is an error, not a
silent prune (apiextensions-apiserver pkg/apiserver/schema/pruning; KEP-2885). So each object
schema that lists ``properties`` and does not say ``x-kubernetes-preserve-unknown-fields`` admits no
other field here; ``x-kubernetes-int-or-string`` admits an integer or a string; ``nullable`` admits
null. The CEL rules (``x-kubernetes-validations``) are not evaluated here.
"""

from __future__ import annotations

import functools
import lzma
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).parent.parent / "data" / "crds"
FILES = {
    "JobSet": "jobset-v{version}.yaml.xz",
    "TrainingRuntime": "trainer-v{version}-trainingruntimes.yaml.xz",
    "ClusterTrainingRuntime": "trainer-v{version}-clustertrainingruntimes.yaml.xz",
    "TrainJob": "trainer-v{version}-trainjobs.yaml.xz",
}
JOBSET_RELEASES = ("0.6.0", "0.7.0", "0.10.0", "0.12.0")
TRAINER_RELEASE = "2.3.0"


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-validations")}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def schema(kind: str, version: str) -> dict[str, Any]:
    """The strict JSON schema of ``kind`` at the CRD release ``version``, for its storage version."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: these files are large
    crd = yaml.load(lzma.decompress((CRDS / FILES[kind].format(version=version)).read_bytes()), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return {"apiVersion": f"{crd['spec']['group']}/{served['name']}", **_strict(served["schema"]["openAPIV3Schema"])}


@functools.cache
def _validator(kind: str, version: str) -> tuple[str, jsonschema.Draft7Validator]:
    found = dict(schema(kind, version))
    api = found.pop("apiVersion")
    return api, jsonschema.Draft7Validator(found)


def validate(doc: dict[str, Any], version: str) -> None:
    """Raise ``jsonschema.ValidationError`` (naming the path) when ``doc`` is not a valid ``doc['kind']``."""
    api, validator = _validator(doc["kind"], version)
    if doc.get("apiVersion") != api:
        raise jsonschema.ValidationError(f"apiVersion {doc.get('apiVersion')!r}: this CRD serves {api}")
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        raise error
