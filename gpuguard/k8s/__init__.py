"""Kubernetes: report the GPU's health, mark it, and get the job rescheduled onto healthy GPUs."""

from gpuguard.k8s.actions import ActionOutcome, KubernetesActions
from gpuguard.k8s.cluster import Cluster, connect
from gpuguard.k8s.config import KubernetesConfig
from gpuguard.k8s.manifests import JobSpec, render

__all__ = ["ActionOutcome", "Cluster", "JobSpec", "KubernetesActions", "KubernetesConfig", "connect", "render"]
