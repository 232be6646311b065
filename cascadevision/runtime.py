"""CPU runtime settings that only work when made before torch is imported.

OpenMP (libgomp, which torch's CPU kernels use) reads `OMP_WAIT_POLICY` and `OMP_NUM_THREADS` once, when torch
is first imported. Its default wait policy lets an idle thread spin for a while before sleeping: on a machine
where another process is busy, the thread a parallel region waits for is descheduled while its siblings spin,
and small ops get 10-100x slower (NMS of 2000 boxes on 2 shared cores: 1856 ms by default, 13.5 ms passive).
The passive policy costs a few microseconds per parallel region on an idle machine.

This module imports nothing heavy, so the CLI (and a script) can call `configure_cpu_runtime()` first.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_cpu_limit(root: str | Path = CGROUP_ROOT) -> float | None:
    """The number of CPUs the cgroup CPU quota allows (may be fractional), or None when there is no quota.

    cgroup v2: `cpu.max` holds "QUOTA PERIOD" or "max PERIOD". cgroup v1: `cpu/cpu.cfs_quota_us` (-1 for no
    quota) and `cpu/cpu.cfs_period_us`, in microseconds. Unreadable or malformed files count as no quota.
    """
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)  # "max" (v2) fails here: no quota
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 writes -1 for no quota
        return None
    return quota_us / period_us


def available_cpus(root: str | Path = CGROUP_ROOT) -> int:
    """The CPUs this process may actually use: its affinity mask, capped by the cgroup quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return cpus


def configure_cpu_runtime(cgroup_root: str | Path = CGROUP_ROOT) -> dict[str, str]:
    """Make torch's CPU threads behave on a shared or CPU-limited machine; call it before `import torch`.

    1. `OMP_WAIT_POLICY=PASSIVE` unless the variable is already set. If torch is already imported, OpenMP has
       read its settings and this part is skipped.
    2. Unless `OMP_NUM_THREADS` is set: when the cgroup CPU quota allows fewer CPUs than the affinity mask
       shows (a container limited to 2 CPUs on a 64-core host), that many threads: `OMP_NUM_THREADS` before
       torch is imported, `torch.set_num_threads` after. Otherwise OpenMP's own choice (which follows the
       affinity mask) is kept.

    Returns the settings it made, e.g. {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}; {} if none.
    """
    torch_loaded = "torch" in sys.modules
    made: dict[str, str] = {}
    if not torch_loaded and "OMP_WAIT_POLICY" not in os.environ:
        made["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_NUM_THREADS" not in os.environ:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = available_cpus(cgroup_root)
        if threads < affinity:
            if torch_loaded:
                torch = sys.modules["torch"]
                if threads < torch.get_num_threads():
                    torch.set_num_threads(threads)
                    made["torch.set_num_threads"] = str(threads)
            else:
                made["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(threads)
    return made
