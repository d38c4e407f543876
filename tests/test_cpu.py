"""`predictor.cpu`: threads from the container's CPU limit, read from cgroup files."""

import os
from pathlib import Path

import pytest

from predictor.cpu import cpu_flags, cpu_limit
from predictor.engines.onnx_export import int8_weight_type

USABLE = len(os.sched_getaffinity(0))


def write(root, files: dict) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "100000 100000\n"}, 1),  # cgroup v2, limits.cpu: 1
        ({"cpu.max": "150000 100000\n"}, min(2, USABLE)),  # 1.5 CPUs: two threads, each throttled a little
        ({"cpu.max": "max 100000\n"}, USABLE),  # no limit
        ({"cpu.max": "6400000 100000\n"}, USABLE),  # a limit above the cores we may run on
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1, 500m
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, USABLE),  # v1 unlimited
        ({}, USABLE),  # no cgroup files at all
    ],
)
def test_cpu_limit_follows_the_cgroup_quota(tmp_path, files, expected):
    write(tmp_path / "cgroup", files)
    assert cpu_limit(tmp_path / "cgroup", membership=tmp_path / "no-such-file") == expected


@pytest.mark.parametrize(
    "membership, files",
    [
        ("0::/kubepods/pod1/ctr\n", {"cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "100000 100000\n"}),
        ("4:cpu,cpuacct:/kubepods/pod1/ctr\n1:memory:/x\n",
         {"cpu/kubepods/pod1/cpu.cfs_quota_us": "100000\n", "cpu/kubepods/pod1/cpu.cfs_period_us": "100000\n"}),
    ],
    ids=["v2", "v1"],
)
def test_with_the_hosts_cgroup_namespace_the_own_cgroup_is_found(tmp_path, membership, files):
    """With cgroupns=host the mount point is the node's root cgroup; the pod's limit is further down."""
    write(tmp_path / "cgroup", files)
    (tmp_path / "self-cgroup").write_text(membership)
    assert cpu_limit(tmp_path / "cgroup", membership=tmp_path / "self-cgroup") == 1


@pytest.mark.parametrize("flags, weights", [({"avx2", "fma"}, "u8"), ({"avx2", "avx512f", "avx512_vnni"}, "s8"),
                                            ({"avx2", "avx_vnni"}, "s8"), ({"avx512f", "amx_int8"}, "s8")])
def test_int8_weight_type_follows_vnni(flags, weights):
    assert int8_weight_type(flags) == weights


def test_this_machines_cpu_flags_are_read():
    assert "sse2" in cpu_flags() or not Path("/proc/cpuinfo").is_file()
