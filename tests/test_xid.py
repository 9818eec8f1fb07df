import csv

import pytest

from gpuguard import HealthState, Remedy, XidTable
from gpuguard.health.xid import DEFAULT_APPLICATION_XIDS

from conftest import ROOT

CATALOG = list(csv.DictReader((ROOT / "gpuguard" / "health" / "xid_catalog.csv").open()))

# What each XID in NVIDIA's catalog means for the job, with the default application list.
EXPECTED = {
    13: (HealthState.HEALTHY, Remedy.OBSERVE),  # application
    31: (HealthState.HEALTHY, Remedy.OBSERVE),  # application
    43: (HealthState.HEALTHY, Remedy.OBSERVE),  # application
    45: (HealthState.HEALTHY, Remedy.OBSERVE),  # application
    48: (HealthState.FAILING, Remedy.RESET_GPU),
    61: (HealthState.DEGRADED, Remedy.CONTACT_SUPPORT),
    62: (HealthState.FAILING, Remedy.RESET_GPU),
    63: (HealthState.HEALTHY, Remedy.OBSERVE),
    64: (HealthState.FAILING, Remedy.RESET_GPU),
    68: (HealthState.HEALTHY, Remedy.OBSERVE),  # application
    69: (HealthState.DEGRADED, Remedy.RESTART_APP),
    74: (HealthState.FAILING, Remedy.RESET_GPU),
    79: (HealthState.LOST, Remedy.REBOOT),
    92: (HealthState.HEALTHY, Remedy.OBSERVE),
    94: (HealthState.DEGRADED, Remedy.RESTART_APP),
    95: (HealthState.FAILING, Remedy.RESET_GPU),
    109: (HealthState.HEALTHY, Remedy.OBSERVE),  # application
    119: (HealthState.FAILING, Remedy.RESET_GPU),
    120: (HealthState.FAILING, Remedy.RESET_GPU),
    136: (HealthState.FAILING, Remedy.RESET_GPU),
    140: (HealthState.FAILING, Remedy.RESET_GPU),
    143: (HealthState.FAILING, Remedy.RESET_GPU),
    **{x: (HealthState.DEGRADED, Remedy.RESET_GPU) for x in range(144, 151)},  # NVLink5
    154: (HealthState.HEALTHY, Remedy.OBSERVE),  # the recovery action field carries the verdict
    155: (HealthState.FAILING, Remedy.RESET_GPU),
}


def test_expectations_cover_the_whole_catalog() -> None:
    assert {int(row["xid"]) for row in CATALOG} == set(EXPECTED)


@pytest.mark.parametrize("xid", sorted(EXPECTED), ids=lambda x: f"xid{x}")
def test_catalog_xid_classification(xid: int) -> None:
    cls = XidTable().classify(xid)
    assert (cls.state, cls.remedy) == EXPECTED[xid]
    assert cls.application == (xid in DEFAULT_APPLICATION_XIDS)


def test_application_xids_are_configurable() -> None:
    table = XidTable(application_xids={13, 31, 43, 45, 68, 109, 94})
    assert table.classify(94).state is HealthState.HEALTHY
    assert table.classify(109).application
    strict = XidTable(application_xids=())
    assert strict.classify(109).state is HealthState.FAILING


def test_unknown_xid_is_not_healthy_and_says_so() -> None:
    # The k8s device plugin marks every non-application XID unhealthy: an unknown one is not harmless.
    cls = XidTable().classify(999)
    assert (cls.state, cls.remedy) == (HealthState.DEGRADED, Remedy.CONTACT_SUPPORT)
    assert "not in gpuguard's XID catalog" in cls.meaning


@pytest.mark.parametrize("xid", [32, 38, 39, 42, 54, 56, 57, 58, 60, 67, 73, 121, 137])
def test_dcgm_warn_list_is_degraded(xid: int) -> None:
    cls = XidTable().classify(xid)
    assert cls.state is HealthState.DEGRADED
    assert "DCGM" in cls.meaning


def test_overrides_take_precedence() -> None:
    table = XidTable(overrides={63: (HealthState.DEGRADED, Remedy.RESET_GPU)})
    assert table.classify(63).state is HealthState.DEGRADED
