"""What each Kubernetes release and each JobSet release can do, with the source of every fact.

The manifests are generated for one Kubernetes release and, for gangs, one JobSet release. A field the
release does not have is never emitted: the API server (or the CRD's structural schema) would drop it
silently, and gpuguard's exit codes would then mean something else than the output says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

KUBERNETES_VERSIONS: Final = ("1.34", "1.35", "1.36", "1.37")
JOBSET_VERSIONS: Final = ("0.6", "0.7", "0.8", "0.9", "0.10", "0.11", "0.12")


def at_least(version: str, other: str) -> bool:
    return tuple(map(int, version.split("."))) >= tuple(map(int, other.split(".")))


@dataclass(frozen=True)
class Feature:
    """A Kubernetes feature that a release may not have on by default.

    Attributes:
        gates: what the operator must turn on before ``default_in``.
        since: the first release that has it at all (alpha).
        default_in: the first release where it is on by default.
        how: what turning it on takes, said in the output's comment.
        source: where these facts come from, said in the output's comment.
    """

    gates: tuple[str, ...]
    since: str
    default_in: str
    how: str
    source: str


FEATURES: Final = {
    # Off, the API server drops restartPolicy/restartPolicyRules from a container without an error
    # (pkg/api/pod/util.go dropDisabledFields), and exit 76 would count as an ordinary failure.
    "restart-container": Feature(
        ("ContainerRestartRules",),
        "1.34",
        "1.35",
        "the ContainerRestartRules feature gate on the API server and kubelets",
        "KEP-5307 (kubernetes/enhancements keps/sig-node/5307-container-restart-policy/kep.yaml: alpha v1.34, "
        "beta v1.35; gate ContainerRestartRules)",
    ),
    "restart-pod": Feature(
        ("RestartAllContainersOnContainerExits",),
        "1.35",
        "1.36",
        "the RestartAllContainersOnContainerExits feature gate (with ContainerRestartRules) on the API server "
        "and kubelets",
        "KEP-5532 (kubernetes/enhancements keps/sig-node/5532-restart-all-containers-on-container-exits/kep.yaml: "
        "alpha v1.35, beta v1.36; pkg/features/kube_features.go: RestartAllContainersOnContainerExits alpha 1.35)",
    ),
    # DeviceTaintRule: DRADeviceTaints alpha 1.33, beta 1.36, GA 1.37; DRADeviceTaintRules alpha 1.35,
    # an off-by-default beta API in 1.36, GA 1.37. Served at resource.k8s.io/v1alpha3 (1.34, 1.35),
    # v1beta2 (1.36), v1 (1.37).
    "device-taint-rules": Feature(
        ("DRADeviceTaints", "DRADeviceTaintRules"),
        "1.34",
        "1.37",
        "the DRADeviceTaints gate (and from 1.35 DRADeviceTaintRules) and --runtime-config for the "
        "resource.k8s.io version that serves DeviceTaintRule (v1alpha3 on 1.34-1.35, v1beta2 on 1.36)",
        "pkg/features/kube_features.go; pkg/registry/resource/rest/storage_resource.go",
    ),
}


@dataclass(frozen=True)
class JobSetField:
    """A JobSet API field gpuguard uses, and the release that introduced it."""

    since: str
    source: str


# Read in kubernetes-sigs/jobset api/jobset/v1alpha2/jobset_types.go at each tag.
JOBSET_FIELDS: Final = {
    "failurePolicy.rules": JobSetField(
        "0.6", "v0.6.0 api/jobset/v1alpha2/jobset_types.go: FailurePolicyRule, RestartJobSetAndIgnoreMaxRestarts"
    ),
    "restartStrategy: BlockingRecreate": JobSetField(
        "0.7", "v0.7.0 api/jobset/v1alpha2/jobset_types.go: JobSetRestartStrategy Recreate;BlockingRecreate"
    ),
    "onJobFailureMessagePatterns": JobSetField(
        "0.10", "v0.10.0 api/jobset/v1alpha2/jobset_types.go: FailurePolicyRule.OnJobFailureMessagePatterns (#1033)"
    ),
    "restartStrategy: InPlaceRestart": JobSetField(
        "0.11",
        "v0.11.0 api/jobset/v1alpha2/jobset_types.go: InPlaceRestart behind the alpha InPlaceRestart feature gate "
        "(KEP-467); its agent runs as a sidecar from v0.12.0 (#1140)",
    ),
}


def jobset_has(version: str, field: str) -> bool:
    return at_least(version, JOBSET_FIELDS[field].since)
