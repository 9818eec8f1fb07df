"""Prometheus metrics for a guard: device state and reasons, NVML readings, checkpoints, evacuations.

Optional: ``pip install 'gpuguard[prometheus]'`` (prometheus-client). Usage::

    guard = gpuguard.Guard(checkpoint_dir=..., state=state)
    metrics = GuardMetrics(address="0.0.0.0:9401").attach(guard)   # the endpoint is off without an address
    with guard:
        ...

NVML readings use dcgm-exporter's metric names and labels (``gpu``, ``UUID``, ``pci_bus_id``,
``modelName``) where the two overlap, so dashboards and alerts written for dcgm-exporter read them
(names from NVIDIA/dcgm-exporter ``etc/default-counters.csv`` and DCGM's field ids). gpuguard's own
metrics are prefixed ``gpuguard_``. Device metrics are read from the monitor's last snapshot when
Prometheus scrapes (memory only: no NVML call on the scrape); counters are kept by plugin hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from gpuguard.errors import ConfigError
from gpuguard.health.model import HealthState
from gpuguard.plugins import hookimpl

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("gpuguard.metrics needs prometheus-client: pip install 'gpuguard[prometheus]'") from exc

# gpuguard reading -> (dcgm-exporter name, help). DCGM field names: DCGM_FI_DEV_GPU_TEMP (150),
# DCGM_FI_DEV_MEMORY_TEMP (140), DCGM_FI_DEV_POWER_USAGE (155), DCGM_FI_DEV_GPU_UTIL (203),
# DCGM_FI_DEV_PCIE_REPLAY_COUNTER (202), DCGM_FI_DEV_ECC_*_VOL/AGG_TOTAL (310-313),
# DCGM_FI_DEV_*_REMAPPED_ROWS (393, 394), DCGM_FI_DEV_ROW_REMAP_FAILURE (395),
# DCGM_FI_DEV_ROW_REMAP_PENDING (396), DCGM_FI_DEV_NVLINK_*_ERROR_COUNT_TOTAL (409, 419, 429, 439),
# DCGM_FI_DEV_PCIE_LINK_WIDTH (238).
DCGM_NAMES: dict[str, tuple[str, str]] = {
    "temperature": ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C)."),
    "memory_temperature": ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C)."),
    "power_w": ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W)."),
    "utilization": ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)."),
    "pcie_replay": ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "Total number of PCIe retries."),
    "pcie_link_width": ("DCGM_FI_DEV_PCIE_LINK_WIDTH", "PCIe link width (lanes)."),
    "ecc_sbe_volatile": ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors."),
    "ecc_dbe_volatile": ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors."),
    "ecc_sbe_aggregate": ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", "Total number of single-bit persistent ECC errors."),
    "ecc_dbe_aggregate": ("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", "Total number of double-bit persistent ECC errors."),
    "remapped_correctable": ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Rows remapped for correctable errors."),
    "remapped_uncorrectable": ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Rows remapped for uncorrectable errors."),
    "remap_failure": ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "Whether remapping of rows has failed."),
    "remap_pending": ("DCGM_FI_DEV_ROW_REMAP_PENDING", "Whether a row remap is pending (needs a GPU reset)."),
    "nvlink_crc_flit_errors": ("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "NVLink flow-control CRC errors."),
    "nvlink_crc_data_errors": ("DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "NVLink data CRC errors."),
    "nvlink_replay_errors": ("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "NVLink retries."),
    "nvlink_recovery_errors": ("DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "NVLink recovery errors."),
}
DEVICE_LABELS = ["gpu", "UUID", "pci_bus_id", "modelName"]
STATES = [s.name for s in HealthState]


class _DeviceCollector(Collector):
    """Device state, reasons and readings from the monitor's last snapshot, read at scrape time."""

    def __init__(self, metrics: GuardMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        monitor = self.metrics.guard.monitor if self.metrics.guard is not None else None
        state = GaugeMetricFamily(
            "gpuguard_device_state",
            "1 for the GPU's current health state, 0 for the others.",
            labels=[
                *DEVICE_LABELS,
                "state",
            ],
        )
        reasons = GaugeMetricFamily(
            "gpuguard_device_reason",
            "1 for each active reason the GPU is not healthy (stable code, state it implies, remedy).",
            labels=[*DEVICE_LABELS, "code", "state", "remedy"],
        )
        readings = {
            key: GaugeMetricFamily(name, text, labels=DEVICE_LABELS) for key, (name, text) in DCGM_NAMES.items()
        }
        if monitor is not None:
            for device in monitor.snapshot().devices:
                labels = [str(device.index), device.uuid, device.pci_bus_id, device.name]
                for name in STATES:
                    state.add_metric([*labels, name], 1.0 if device.state.name == name else 0.0)
                for reason in device.reasons:
                    reasons.add_metric([*labels, reason.code, reason.state.name, reason.remedy.name], 1.0)
                for key, value in device.readings.items():
                    if key in readings and isinstance(value, (int, float)) and not isinstance(value, bool):
                        readings[key].add_metric(labels, float(value))
                    elif key in readings and isinstance(value, bool):
                        readings[key].add_metric(labels, 1.0 if value else 0.0)
        yield state
        yield reasons
        yield from (family for family in readings.values() if family.samples)
        yield from self._step_time()

    def _step_time(self) -> Iterator[GaugeMetricFamily]:
        """The step-time comparison the guard made last; a slowdown alone never moves the job."""
        detector = getattr(self.metrics.guard, "slowdown", None)
        latest = getattr(detector, "latest", None)
        if latest is None:
            return
        yield GaugeMetricFamily(
            "gpuguard_step_seconds", "Median of this rank's recent step times.", value=latest.step_s
        )
        yield GaugeMetricFamily(
            "gpuguard_step_baseline_seconds", "Median step time after warm-up (the baseline).", value=latest.baseline_s
        )
        yield GaugeMetricFamily(
            "gpuguard_step_slowdown",
            "Recent steps over the baseline (0.25: 25% slower); moves the job only with NVML evidence on the GPU "
            "and this rank slower than its peers, or with evacuate_on_slowdown_alone.",
            value=latest.slowdown,
        )


class GuardMetrics:
    """Prometheus metrics for one `gpuguard.Guard`, and an optional HTTP endpoint to scrape them.

    Args:
        registry: where the metrics live; a new ``CollectorRegistry`` by default (pass
            ``prometheus_client.REGISTRY`` to serve them beside your own).
        address: ``host:port`` for the HTTP endpoint (``127.0.0.1:9401``, ``0.0.0.0:0`` for any free
            port); None (default) serves nothing.

    Raises:
        ConfigError: an address that is not ``host:port``.

    Example:
        >>> import gpuguard
        >>> from gpuguard.metrics import GuardMetrics
        >>> guard = gpuguard.Guard(checkpoint_dir="memory://doc-metrics")
        >>> metrics = GuardMetrics().attach(guard)
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, address: str | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.address = _parse_address(address) if address is not None else None
        self.guard: Any = None
        self.port: int | None = None
        self._server: Any = None
        self._lock = threading.Lock()
        self._unhealthy_since: float | None = None  # monitor clock: when the worst device left HEALTHY
        self._newest_step: int | None = None  # guarded by _lock
        self.checkpoints = Counter(
            "gpuguard_checkpoints",
            "Checkpoints this rank took, by reason (periodic, emergency) and outcome (ok, failed).",
            ["reason", "outcome"],
            registry=self.registry,
        )
        buckets = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.stall = Histogram(
            "gpuguard_checkpoint_stall_seconds",
            "Seconds the training thread waited for a checkpoint's snapshot.",
            ["reason"],
            buckets=buckets,
            registry=self.registry,
        )
        self.durable = Histogram(
            "gpuguard_checkpoint_durable_seconds",
            "Seconds from a checkpoint's start until it was durable and committed.",
            ["reason"],
            buckets=buckets,
            registry=self.registry,
        )
        self.evacuations = Counter(
            "gpuguard_evacuations",
            "Evacuations, by action and exit code.",
            ["action", "exit_code"],
            registry=self.registry,
        )
        self.decision_latency = Gauge(
            "gpuguard_decision_latency_seconds",
            "At the last evacuation: seconds from a GPU leaving HEALTHY to the guard's decision (monitor clock).",
            registry=self.registry,
        )
        self.last_checkpoint_step = Gauge(
            "gpuguard_last_checkpoint_step",
            "Step of the newest checkpoint this rank saw committed.",
            registry=self.registry,
        )
        self.registry.register(_DeviceCollector(self))

    def attach(self, guard: Any) -> GuardMetrics:
        """Watch ``guard`` (before or after it starts) and start the endpoint if an address was given."""
        if self.guard is not None:
            raise ConfigError("guard", guard, "this GuardMetrics is already attached to a guard; make one per guard")
        self.guard = guard
        guard.plugins.register(self, name=f"gpuguard-metrics-{id(self):x}")
        if self.address is not None:
            self.serve()
        return self

    def serve(self) -> int:
        """Start the HTTP endpoint (once); returns its port."""
        with self._lock:
            if self._server is None:
                if self.address is None:
                    raise ConfigError("address", None, "give GuardMetrics(address='host:port') to serve metrics")
                host, port = self.address
                self._server, _ = start_http_server(port, addr=host, registry=self.registry)
                self.port = int(self._server.server_port)
            assert self.port is not None
            return self.port

    def close(self) -> None:
        """Stop the endpoint, if it runs."""
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None

    # -- hooks --------------------------------------------------------------------------------------

    @hookimpl
    def gpuguard_health_reasons(self, snapshot: Any) -> None:
        # Runs on the guard's thread at every evaluation: note when the job's GPUs stop being healthy.
        worst = snapshot.worst
        if worst is HealthState.HEALTHY or worst is HealthState.UNKNOWN:
            self._unhealthy_since = None
        elif self._unhealthy_since is None:
            self._unhealthy_since = min((d.updated_at for d in snapshot.devices if d.state is worst), default=None)

    @hookimpl
    def gpuguard_checkpoint_finished(
        self, step: int, reason: str, info: Any, timings: Any, error: BaseException | None, tier: str
    ) -> None:
        if tier != "object storage":
            # These series describe checkpoints in object storage, as before local-only saves reported here
            # (an alert on the last checkpoint step must not be fed by a copy that a lost node takes with it).
            return
        self.checkpoints.labels(reason, "failed" if error is not None else "ok").inc()
        self.stall.labels(reason).observe(timings.stall_s)
        if error is None:
            self.durable.labels(reason).observe(timings.durable_s)
            # Saves finish on their writer threads, so an older one can report after a newer one: keep the
            # newest step rather than whichever finished last.
            with self._lock:
                if self._newest_step is None or step > self._newest_step:
                    self._newest_step = step
                    self.last_checkpoint_step.set(step)

    @hookimpl
    def gpuguard_on_evacuation(self, decision: Any, exit_code: int) -> None:
        self.evacuations.labels(decision.action.name, str(exit_code)).inc()
        decided_at = getattr(self.guard, "decided_at", None)
        if decided_at is not None and self._unhealthy_since is not None:
            self.decision_latency.set(max(0.0, decided_at - self._unhealthy_since))


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError("address", address, "must be host:port, e.g. 127.0.0.1:9401 (port 0: any free port)")
    return host.strip("[]"), int(port)


__all__ = ["DCGM_NAMES", "GuardMetrics"]
