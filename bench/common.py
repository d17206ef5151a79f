"""Small helpers shared by the benchmarks: memory and CPU readings of this process."""

from __future__ import annotations

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
