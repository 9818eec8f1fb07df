"""XID classification from NVIDIA's XID catalog (Ampere and newer), shipped as ``xid_catalog.csv``.

The catalog's *immediate action* column decides what an XID means for the job:

============================  ==========  ===============
immediate action              state       remedy
============================  ==========  ===============
IGNORE                        HEALTHY     OBSERVE
RESTART_APP (+ reset later)   DEGRADED    RESTART_APP
WORKFLOW_XID_48, RESET_GPU    FAILING     RESET_GPU
WORKFLOW_NVLINK_ERR           FAILING     RESET_GPU
WORKFLOW_NVLINK5_ERR          DEGRADED    RESET_GPU
RESTART_BM (79: off the bus)  LOST        REBOOT
WORKFLOW_XID_45, XID_154      HEALTHY     OBSERVE (another signal carries the verdict)
CONTACT_SUPPORT               DEGRADED    CONTACT_SUPPORT
============================  ==========  ===============

Application-class XIDs (13, 31, 43, 45, 68, 109 by default) come from the program, not the GPU:
they are recorded as ``OBSERVE`` and never change a GPU's state on their own.

An XID missing from the catalog is not taken as harmless: the Kubernetes device plugin marks a GPU
unhealthy on every XID outside its application list, so here it is ``DEGRADED`` (remedy
``CONTACT_SUPPORT``, the XID in the evidence), which the policy ladder escalates if it persists. The
XIDs DCGM's health watch warns on (32, 38, 39, 42, 54, 56-58, 60, 67, 73, 121, 137) are ``DEGRADED`` at
least. `XidTable` takes overrides for all of these.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Final

from gpuguard.health.model import HealthState, Remedy

DEFAULT_APPLICATION_XIDS: Final[frozenset[int]] = frozenset({13, 31, 43, 45, 68, 109})

# XIDs on which DCGM's health watch (DCGM_HEALTH_WATCH_*) reports a warning; none is in the Ampere+ catalog.
DCGM_WARN_XIDS: Final[frozenset[int]] = frozenset({32, 38, 39, 42, 54, 56, 57, 58, 60, 67, 73, 121, 137})


@dataclass(frozen=True)
class XidClass:
    """What one XID means for the job."""

    xid: int
    meaning: str
    state: HealthState
    remedy: Remedy
    catalog_action: str
    application: bool = False


@dataclass(frozen=True)
class CatalogEntry:
    xid: int
    meaning: str
    immediate_action: str
    investigatory_action: str
    device_plugin_skips: bool
    dcgm_health_watch: str


def _classify_action(action: str) -> tuple[HealthState, Remedy]:
    head = action.split(maxsplit=1)[0] if action else ""
    if head == "IGNORE":
        return HealthState.HEALTHY, Remedy.OBSERVE
    if head == "RESTART_APP":
        return HealthState.DEGRADED, Remedy.RESTART_APP
    if head in ("RESET_GPU", "WORKFLOW_XID_48", "WORKFLOW_NVLINK_ERR"):
        return HealthState.FAILING, Remedy.RESET_GPU
    if head == "WORKFLOW_NVLINK5_ERR":
        return HealthState.DEGRADED, Remedy.RESET_GPU
    if head == "RESTART_BM":
        return HealthState.LOST, Remedy.REBOOT
    if head in ("WORKFLOW_XID_45", "XID_154"):
        # 45 is cleanup after another fault (or a killed process), 154 announces a recovery action:
        # the other fault, or the recovery action field read right after the event, carries the verdict.
        return HealthState.HEALTHY, Remedy.OBSERVE
    return HealthState.DEGRADED, Remedy.CONTACT_SUPPORT


def load_catalog(text: str | None = None) -> dict[int, CatalogEntry]:
    """Parse the XID catalog CSV; the copy shipped in the package when ``text`` is None."""
    if text is None:
        text = resources.files("gpuguard.health").joinpath("xid_catalog.csv").read_text("utf-8")
    entries: dict[int, CatalogEntry] = {}
    for row in csv.DictReader(io.StringIO(text)):
        xid = int(row["xid"])
        entries[xid] = CatalogEntry(
            xid=xid,
            meaning=row["meaning"],
            immediate_action=row["immediate_action"],
            investigatory_action=row["investigatory_action"],
            device_plugin_skips=row["k8s_device_plugin_skips"] == "yes",
            dcgm_health_watch=row["dcgm_health_watch"],
        )
    return entries


class XidTable:
    """Classifies XIDs.

    Args:
        application_xids: XIDs caused by the application; observed, never held against the GPU.
        overrides: XID → (state, remedy), taking precedence over the catalog.

    Example:
        >>> table = XidTable()
        >>> table.classify(48).state
        <HealthState.FAILING: 'FAILING'>
        >>> table.classify(13).application
        True
    """

    def __init__(
        self,
        application_xids: Iterable[int] = DEFAULT_APPLICATION_XIDS,
        overrides: Mapping[int, tuple[HealthState, Remedy]] | None = None,
    ) -> None:
        self._catalog = load_catalog()
        self._application = frozenset(application_xids)
        self._overrides = dict(overrides or {})

    @property
    def known_xids(self) -> frozenset[int]:
        return frozenset(self._catalog)

    def classify(self, xid: int) -> XidClass:
        entry = self._catalog.get(xid)
        meaning = entry.meaning if entry else "not in gpuguard's XID catalog"
        action = entry.immediate_action if entry else ""
        if xid in self._overrides:
            state, remedy = self._overrides[xid]
            return XidClass(xid, meaning, state, remedy, action, application=xid in self._application)
        if xid in self._application:
            return XidClass(xid, meaning, HealthState.HEALTHY, Remedy.OBSERVE, action, application=True)
        if entry is None:
            if xid in DCGM_WARN_XIDS:
                meaning = "not in gpuguard's XID catalog; DCGM's health watch warns on it"
            return XidClass(xid, meaning, HealthState.DEGRADED, Remedy.CONTACT_SUPPORT, action)
        state, remedy = _classify_action(action)
        if xid in DCGM_WARN_XIDS and state.severity < HealthState.DEGRADED.severity:
            state, remedy = HealthState.DEGRADED, Remedy.CONTACT_SUPPORT
        return XidClass(xid, meaning, state, remedy, action)
