"""Small helpers shared by the benchmarks: memory and CPU readings of this process."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path


def rss_mb() -> float:
    """Current resident set size of this process, MiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used: robust to other work sharing the cores, unlike wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of process `pid` and its children: the live ones read from /proc, those it reaped from its own
    cutime + cstime (a hub worker's parse process, hub/parser.py)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15]) / TICK  # utime, stime, cutime, cstime
    for kid in children(pid):
        try:
            total += tree_cpu_s(kid)
        except (OSError, IndexError):  # gone meanwhile: reaped, its time in our cutime next read
            pass
    return total


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (none once it is gone)."""
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class CpuMeter:
    """Share of one core this process used between start() and stop()."""

    def start(self) -> CpuMeter:
        self.cpu0, self.wall0 = time.process_time(), time.monotonic()
        return self

    def stop(self) -> float:
        return (time.process_time() - self.cpu0) / max(1e-9, time.monotonic() - self.wall0)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]
