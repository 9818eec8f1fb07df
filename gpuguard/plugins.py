"""Plugins through pluggy: extra health sources, decision overrides, checkpoint and evacuation hooks.

Installed plugins are found through the entry-point group ``gpuguard``; others are passed as
``Guard(plugins=[...])``. Hook implementations are checked when they are registered, so a misspelt
hook or argument fails when the guard starts, not mid-training.

Example:
    >>> import gpuguard
    >>> class Notify:
    ...     @gpuguard.hookimpl
    ...     def gpuguard_on_evacuation(self, decision, exit_code, checkpoint):
    ...         print("leaving:", decision.message)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pluggy

from gpuguard.errors import ConfigError

PROJECT = "gpuguard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class GpuGuardSpec:
    """The hooks a plugin may implement (every argument is optional in an implementation)."""

    @hookspec
    def gpuguard_health_reasons(self, snapshot: Any) -> Any:
        """Extra health evidence: return ``{uuid: [Reason, ...]}``. Runs on the guard's thread."""

    @hookspec(firstresult=True)
    def gpuguard_decide(self, decision: Any, snapshot: Any) -> Any:
        """Override the policy: return a `Decision` to use instead, or None to keep it."""

    @hookspec
    def gpuguard_before_checkpoint(self, step: int, reason: str, evidence: Any) -> None:
        """Just before a checkpoint's snapshot; on the training thread."""

    @hookspec
    def gpuguard_after_checkpoint(self, step: int, reason: str, info: Any) -> None:
        """After an emergency checkpoint is durable (``info`` is None if it failed or another rank commits)."""

    @hookspec
    def gpuguard_checkpoint_finished(
        self, step: int, reason: str, info: Any, timings: Any, error: BaseException | None, tier: str
    ) -> None:
        """Any checkpoint this rank took has ended, periodic or emergency: for metrics and logs.

        ``timings`` is a `gpuguard.SaveTimings` (training stall, seconds to durable); ``info`` the
        committed checkpoint (None on ranks that do not commit, or on failure); ``error`` why it failed.
        ``tier`` is where it went: ``"object storage"`` (``checkpoint_dir``), or ``"local"`` for a periodic
        checkpoint kept in the node-local tier alone (``local_dir``, at the steps ``object_store_every``
        skips; every rank commits its own, so ``info`` is that rank's local copy). A save to both tiers
        reports once, as ``"object storage"``; its stall includes the one snapshot both tiers share.
        Periodic ones report from the writer's thread, emergency ones from the training thread.
        """

    @hookspec
    def gpuguard_on_evacuation(self, decision: Any, exit_code: int, checkpoint: Any) -> None:
        """Just before the job leaves with ``exit_code``; Kubernetes actions and notifications go here."""


def plugin_manager(plugins: Iterable[object] = (), *, entry_points: bool = True) -> pluggy.PluginManager:
    """A manager with the installed plugins and ``plugins`` registered and validated.

    Raises:
        ConfigError: a plugin implements a hook that does not exist or with arguments it does not have.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(GpuGuardSpec)
    try:
        if entry_points:
            pm.load_setuptools_entrypoints(PROJECT)
        for plugin in plugins:
            pm.register(plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError("plugins", getattr(exc, "plugin", None), f"invalid plugin: {exc}") from None
    return pm
