"""How many CPUs this process may really use: its affinity, and in a container its CPU quota."""

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on, lowered to its cgroup's CPU quota (`docker run --cpus 2`
    on a 64-core host is 2, not 64), rounded up; at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time per period that the cgroup allows (cgroup v2 `cpu.max`, else v1's
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`); None where there is no limit or no cgroup."""
    for quota_file, period_file in (
        ("cpu.max", None),
        ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"),
        ("cpu,cpuacct/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_period_us"),
    ):
        try:
            text = (cgroup_root / quota_file).read_text().split()
            if period_file is not None:
                text += (cgroup_root / period_file).read_text().split()
        except OSError:
            continue
        quota, period = text[0], text[1] if len(text) > 1 else "100000"
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period) if int(quota) > 0 and int(period) > 0 else None
        except ValueError:
            return None
    return None


def cpus_per_local_rank(cgroup_root: Path = CGROUP_ROOT) -> int:
    """This process's share of the CPUs when torchrun starts several on one machine."""
    return max(1, available_cpus(cgroup_root) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
