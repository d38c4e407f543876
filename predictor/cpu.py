"""How many cores this container may use, and torch's threads sized to match.

`os.cpu_count()` reports the node's cores: a pod limited to 2 CPUs on a 64-core node would start
64 intra-op threads, which the CFS quota then throttles in bursts, slower than 2 threads that
never wait. The quota is read from cgroup v2 (`cpu.max`), else v1 (`cpu.cfs_quota_us`), and
bounded by the CPUs this process may run on.
"""

import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


def cpu_limit(cgroup: Path = CGROUP) -> int:
    """Whole CPUs the container may use: the cgroup quota rounded up, at most the usable cores."""
    usable = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup)
    return max(1, min(usable, math.ceil(quota))) if quota else usable


def _cgroup_quota(cgroup: Path) -> Optional[float]:
    try:
        text = (cgroup / "cpu.max").read_text().split()  # v2: "<quota|max> <period>"
        return None if text[0] == "max" else int(text[0]) / int(text[1])
    except (OSError, IndexError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 means unlimited
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
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
