from __future__ import annotations

import pytest

from gpuguard.health.devices import job_device_selection


@pytest.mark.parametrize(
    ("visible", "order", "expected"),
    [
        (None, None, None),
        ("GPU-aaaa,GPU-bbbb", None, ["GPU-aaaa", "GPU-bbbb"]),
        ("0,2", "PCI_BUS_ID", [0, 2]),
        ("0,2", None, None),  # CUDA's default order is not NVML's: cannot map indices safely
        ("", None, None),
    ],
)
def test_job_devices_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, visible: str | None, order: str | None, expected: object
) -> None:
    for name, value in (("CUDA_VISIBLE_DEVICES", visible), ("CUDA_DEVICE_ORDER", order)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert job_device_selection() == expected
