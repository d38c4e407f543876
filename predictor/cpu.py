"""How many cores this container may use, and torch's threads sized to match.

`os.cpu_count()` reports the node's cores: a pod limited to 2 CPUs on a 64-core node would start
64 intra-op threads, which the CFS quota then throttles in bursts, slower than 2 threads that
never wait. The quota is read from cgroup v2 (`cpu.max`), else v1 (`cpu.cfs_quota_us`), and
bounded by the CPUs this process may run on.
"""

import logging
import math
import os
from pathlib import Path, PurePosixPath
from typing import Optional

import torch

logger = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


def cpu_limit(cgroup: Path = CGROUP, membership: Path = Path("/proc/self/cgroup")) -> int:
    """Whole CPUs the container may use: the tightest quota on the way from this process's cgroup
    up to the root, rounded up (1.5 CPUs run best as 2 threads, each throttled a little), and at
    most the cores this process may run on."""
    usable = len(os.sched_getaffinity(0))
    quotas = [q for q in map(_quota, _own_cgroups(cgroup, membership)) if q]
    return max(1, min(usable, math.ceil(min(quotas)))) if quotas else usable


def _own_cgroups(cgroup: Path, membership: Path) -> list[Path]:
    """The mount points (in a container's own cgroup namespace its cgroup is mounted there) and,
    when the namespace is the host's, this process's cgroup directory and all its ancestors."""
    directories = [cgroup, cgroup / "cpu"]
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return directories
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0":  # v2: "0::/kubepods/.../container"
            root = cgroup
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/kubepods/..."
            root = cgroup / "cpu"
        else:
            continue
        node = PurePosixPath(path.strip() or "/")
        for directory in (node, *node.parents):
            directories.append(root / str(directory).lstrip("/"))
    return directories


def _quota(directory: Path) -> Optional[float]:
    try:
        text = (directory / "cpu.max").read_text().split()  # v2: "<quota|max> <period>"
        return None if text[0] == "max" else int(text[0]) / int(text[1])
    except (OSError, IndexError, ValueError):
        pass
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())  # v1: -1 means unlimited
        period = int((directory / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def configure_torch_threads(requested: Optional[int]) -> int:
    """Intra-op threads from the flag, else the cgroup limit; one inter-op thread (the model runs
    one forward pass at a time, so a second pool would only compete for the same cores)."""
    threads = requested or cpu_limit()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass
    logger.info("Using %d intra-op thread(s) (%s)", threads, "from --threads" if requested else
                f"cgroup CPU limit; the node has {os.cpu_count()} cores")
    return threads


def multiplies_bf16(flags: Optional[set[str]] = None) -> bool:
    """AVX512-BF16 or AMX: the CPUs where bf16 GEMMs run natively (elsewhere torch and OpenVINO
    emulate them, slower than fp32). Read from /proc/cpuinfo, so the CUDA image, which has no
    OpenVINO, answers it too."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    return {flag for value in _cpuinfo_values("flags", cpuinfo) for flag in value.split()}


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    return next(iter(_cpuinfo_values("model name", cpuinfo)), "unknown CPU")


def _cpuinfo_values(field: str, cpuinfo: Path) -> list[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.split(":", 1)[0].strip() == field]
