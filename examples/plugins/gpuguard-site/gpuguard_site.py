"""An installable gpuguard plugin: a webhook notifier and a site health probe.

Installed (``pip install examples/plugins/gpuguard-site``), both are found through the ``gpuguard``
entry-point group by every `gpuguard.Guard` in the environment, with no change to the training code.
Its settings are its own environment variables (``GPUGUARD_*`` names are gpuguard's, and it rejects
ones it does not know).

- ``webhook``: on an evacuation, POSTs JSON to ``SITE_GPU_WEBHOOK_URL`` (Slack, PagerDuty, ...),
  with a short timeout; a failed notification is logged, never raised (the job must leave regardless).
- ``probe``: a custom health source. A site's own checker (a burn-in test, a node problem detector)
  writes the UUIDs of GPUs it found bad, one per line, to ``SITE_GPU_PROBE_FILE``; each such GPU
  gets a FAILING reason ``SITE_PROBE`` with the line as evidence.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any

import gpuguard

log = logging.getLogger("gpuguard.site")


class WebhookNotifier:
    """POSTs ``{"event": "evacuation", "exit_code", "action", "message", "evidence", "checkpoint"}``."""

    def __init__(self, url: str | None = None, timeout_s: float = 3.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    @gpuguard.hookimpl
    def gpuguard_on_evacuation(self, decision: Any, exit_code: int, checkpoint: Any) -> None:
        url = self.url or os.environ.get("SITE_GPU_WEBHOOK_URL")
        if not url:
            return
        body = {
            "event": "evacuation",
            "exit_code": exit_code,
            "action": decision.action.name,
            "message": decision.message,
            "evidence": decision.evidence,
            "checkpoint": checkpoint.id if checkpoint is not None else None,
        }
        request = urllib.request.Request(
            url, json.dumps(body, default=str).encode(), {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except OSError as exc:
            log.warning("webhook %s failed: %s", url, exc)


class SiteProbe:
    """Marks GPUs FAILING that the site's own checker listed in ``SITE_GPU_PROBE_FILE``."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path

    @gpuguard.hookimpl
    def gpuguard_health_reasons(self, snapshot: Any) -> dict[str, list[gpuguard.Reason]]:
        path = self.path or os.environ.get("SITE_GPU_PROBE_FILE")
        if not path:
            return {}
        try:
            lines = Path(path).read_text().splitlines()
        except FileNotFoundError:
            return {}
        bad = {line.split()[0]: line.strip() for line in lines if line.strip()}
        return {
            device.uuid: [
                gpuguard.Reason(
                    "SITE_PROBE",
                    gpuguard.HealthState.FAILING,
                    f"the site probe failed this GPU: {bad[device.uuid]}",
                    gpuguard.Remedy.RESET_GPU,
                    evidence={"probe_file": path, "line": bad[device.uuid]},
                )
            ]
            for device in snapshot.devices
            if device.uuid in bad
        }


webhook = WebhookNotifier()
probe = SiteProbe()
