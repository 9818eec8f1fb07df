"""The guard: policy ladder, cross-rank agreement, emergency and periodic checkpoints, resume."""

from gpuguard.guard.config import GuardConfig
from gpuguard.guard.guard import Evacuation, EvacuationReport, Guard
from gpuguard.guard.policy import Action, Decision, PolicyLadder

__all__ = ["Action", "Decision", "Evacuation", "EvacuationReport", "Guard", "GuardConfig", "PolicyLadder"]
