"""How the job's GPUs are read from the environment: CUDA's parsing rules and the mapping onto NVML.

The end-to-end matrix (each variable x CUDA initialised or not, through `gpuguard.Guard`) is in
tests/test_job_scope.py; here the rules themselves, each with the behaviour it mirrors.
"""

from __future__ import annotations

import pytest

from gpuguard.health.devices import GpuInfo, JobScope, parse_cuda_visible, parse_runtime_visible

# A node of four H200s whose NVML order is not PCI bus order (nvml.h: "The order in which NVML
# enumerates devices has no guarantees of consistency between reboots").
NODE = [
    GpuInfo(0, "GPU-aaaa0000-0000-0000-0000-000000000000", "00000000:41:00.0", "NVIDIA H200"),
    GpuInfo(1, "GPU-bbbb0000-0000-0000-0000-000000000000", "00000000:1a:00.0", "NVIDIA H200"),
    GpuInfo(2, "GPU-cccc0000-0000-0000-0000-000000000000", "00000000:c1:00.0", "NVIDIA H200"),
    GpuInfo(3, "GPU-dddd0000-0000-0000-0000-000000000000", "00000000:9a:00.0", "NVIDIA H200"),
]
BY_BUS = [NODE[1].uuid, NODE[0].uuid, NODE[3].uuid, NODE[2].uuid]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0,2", ("cuda_index", (0, 2))),
        ("1gpu,2", ("cuda_index", (1, 2))),  # strtoul: the number an entry starts with
        ("0,2,-1,3", ("cuda_index", (0, 2))),  # a negative index ends the list
        ("0,x,3", ("cuda_index", (0,))),  # so does a non-number
        ("0,0", ("none", ())),  # a repeated index hides every GPU
        ("", ("none", ())),  # an empty value hides every GPU
        ("-1", ("none", ())),
        ("GPU-aaaa,GPU-bbbb", ("uuid", ("GPU-aaaa", "GPU-bbbb"))),
        ("GPU-aaaa,3,GPU-bbbb", ("uuid", ("GPU-aaaa",))),  # the UUID list stops at another kind
        ("MIG-1234", ("uuid", ("MIG-1234",))),
    ],
)
def test_cuda_visible_devices_is_parsed_as_cuda_parses_it(value: str, expected: tuple[str, tuple[object, ...]]) -> None:
    # torch.cuda._parse_visible_devices mirrors CUDA's parser; these are its cases.
    assert parse_cuda_visible(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", ("all", ())),
        ("none", ("none", ())),
        ("void", ("none", ())),
        ("", ("none", ())),
        ("2,3", ("runtime_index", (2, 3))),
        ("GPU-aaaa,MIG-bbbb", ("uuid", ("GPU-aaaa", "MIG-bbbb"))),
        ("0:1,0:2", ("runtime_index", (0,))),  # MIG devices by index pairs: watched through GPU 0
    ],
)
def test_nvidia_visible_devices_forms(value: str, expected: tuple[str, tuple[object, ...]]) -> None:
    assert parse_runtime_visible(value) == expected


def test_cuda_indices_map_in_pci_bus_order_not_nvml_order() -> None:
    scope = JobScope.from_environment({"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, [])
    resolved = scope.resolve(NODE)
    assert resolved.targets == BY_BUS[:2]
    assert "PCI bus order (CUDA_DEVICE_ORDER=PCI_BUS_ID)" in resolved.description


def test_fastest_first_on_identical_gpus_is_pci_bus_order_and_says_so() -> None:
    resolved = JobScope.from_environment({"CUDA_VISIBLE_DEVICES": "3"}, []).resolve(NODE)
    assert resolved.targets == [BY_BUS[3]]
    assert "4 x NVIDIA H200" in resolved.description and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in resolved.description


def test_fastest_first_on_mixed_models_is_refused_loudly() -> None:
    mixed = [*NODE[:3], GpuInfo(3, NODE[3].uuid, NODE[3].pci_bus_id, "NVIDIA L4")]
    resolved = JobScope.from_environment({"CUDA_VISIBLE_DEVICES": "2,3"}, []).resolve(mixed)
    assert resolved.targets is None and resolved.level == "error"
    assert "set CUDA_DEVICE_ORDER=PCI_BUS_ID" in resolved.description
    pinned = JobScope.from_environment({"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, [])
    assert pinned.resolve(mixed).targets == BY_BUS[2:]


def test_an_index_past_the_last_gpu_ends_the_list() -> None:
    resolved = JobScope.from_environment({"CUDA_VISIBLE_DEVICES": "1,7,2"}, []).resolve(NODE)
    assert resolved.targets == [BY_BUS[1]]


def test_local_rank_indexes_the_visible_list() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "LOCAL_RANK": "1"}
    resolved = JobScope.from_environment(env, []).resolve(NODE)
    assert resolved.targets == [BY_BUS[3]]
    assert "LOCAL_RANK=1" in resolved.description


def test_local_rank_alone_indexes_every_gpu_in_cuda_order() -> None:
    resolved = JobScope.from_environment({"LOCAL_RANK": "0"}, []).resolve(NODE)
    assert resolved.targets == [BY_BUS[0]]


def test_fewer_processes_than_gpus_watch_them_all() -> None:
    env = {
        "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }
    assert JobScope.from_environment(env, []).resolve(NODE).targets == BY_BUS


def test_a_local_rank_past_the_visible_list_watches_it_all_with_a_warning() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "LOCAL_RANK": "5"}
    resolved = JobScope.from_environment(env, []).resolve(NODE)
    assert resolved.targets == BY_BUS[:2] and resolved.level == "warning"


def test_a_unique_uuid_prefix_names_its_gpu_and_an_ambiguous_one_does_not() -> None:
    assert JobScope.from_environment({"CUDA_VISIBLE_DEVICES": "GPU-cccc"}, []).resolve(NODE).targets == [NODE[2].uuid]
    assert JobScope.from_environment({"CUDA_VISIBLE_DEVICES": "GPU-"}, []).resolve(NODE).targets == ["GPU-"]


def test_nothing_set_watches_every_gpu_and_says_why() -> None:
    resolved = JobScope.from_environment({}, []).resolve(NODE)
    assert resolved.targets is None and resolved.level == "warning"
    assert "no CUDA device list, CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES or LOCAL_RANK" in resolved.description


def test_runtime_indices_name_host_gpus_only_when_nvml_sees_the_host() -> None:
    in_container = JobScope.from_environment({"NVIDIA_VISIBLE_DEVICES": "5,6"}, []).resolve(NODE[:2])
    assert in_container.targets == [NODE[0].uuid, NODE[1].uuid]  # the runtime mounted exactly those
    on_host = JobScope.from_environment({"NVIDIA_VISIBLE_DEVICES": "2"}, []).resolve(NODE)
    assert on_host.targets == [NODE[2].uuid]


def test_cuda_visible_devices_wins_over_nvidia_visible_devices() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "GPU-aaaa0000-0000-0000-0000-000000000000", "NVIDIA_VISIBLE_DEVICES": "all"}
    assert JobScope.from_environment(env, []).resolve(NODE).targets == [NODE[0].uuid]


def test_cuda_s_own_uuids_win_over_the_environment() -> None:
    bare = NODE[3].uuid.removeprefix("GPU-")  # torch gives the UUID without its prefix
    scope = JobScope.from_environment({"CUDA_VISIBLE_DEVICES": "0"}, [bare])
    assert scope.resolve(None).targets == [bare]
    assert not scope.needs_inventory


def test_a_gpu_nvml_cannot_read_keeps_its_place_in_cuda_s_order() -> None:
    # GPU 1 (the first by PCI bus) is lost: leaving it out would shift index 1 onto the wrong GPU
    lost = [NODE[0], GpuInfo(1, "", "", ""), NODE[2], NODE[3]]
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    # without every PCI bus id, NVML's own enumeration order stands in for PCI bus order
    assert JobScope.from_environment(env, []).resolve(lost).targets == [NODE[0].uuid, 1]
