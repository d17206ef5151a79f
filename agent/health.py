"""Health telemetry: what a unit tells the hub about itself (core/wire.py Health).

The sync thread asks for a message every `health_interval_s` (unit config) and as soon as a driver goes up or down
(agent/sync.py), and publishes it retained on `{prefix}/{device_id}/health` over its own link. A sample
costs a few small file reads (/proc/self/statm, the thermal zones), one statvfs and the outbox's counters:
bench/health.py measures it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import customs_edge
from customs_edge.agent.config import UnitConfig
from customs_edge.agent.outbox import Outbox
from customs_edge.core.wire import DriverHealth, Health

_STARTED = time.monotonic()  # about when the agent process started: this module is imported at startup
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

Clock = tuple[float, float]  # (offset of the hub's clock to ours, round trip of that estimate), seconds


def config_hash(cfg: UnitConfig) -> str:
    """sha256 of the config as validated, keys sorted, defaults filled in, 60.0 written 60: two files that
    mean the same config (other key order, a default written out) hash the same."""
    doc = cfg.model_dump(mode="json", serialize_as_any=True)  # driver and app sections with their own keys
    return hashlib.sha256(json.dumps(_canonical(doc), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical(x: Any) -> Any:
    """Integral floats as ints: a float field's default (256) and the same value written (256.0) agree."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, dict):
        return {k: _canonical(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_canonical(v) for v in x]
    return x


def model_versions(app: object) -> dict[str, str]:
    """Manifest name -> version of every model the app holds as an attribute (OnnxModel.manifest)."""
    out = {}
    for value in vars(app).values():
        manifest = getattr(value, "manifest", None)
        name, version = getattr(manifest, "name", None), getattr(manifest, "version", None)
        if isinstance(name, str) and isinstance(version, str):
            out[name] = version
    return out


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def disk_free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Thermal:
    """The SoC temperature: the hottest readable /sys/class/thermal zone, in °C; None without one."""

    def __init__(self, pattern: str = "/sys/class/thermal/thermal_zone*/temp") -> None:
        self.paths = sorted(glob.glob(pattern))

    def read(self) -> float | None:
        temps = []
        for p in self.paths:
            try:
                with open(p, "rb") as f:
                    temps.append(int(f.read().strip()) / 1000.0)
            except (OSError, ValueError):
                continue
        return max(temps) if temps else None


class HealthSampler:
    """Builds Health messages for one unit. `drivers` and `models` are read at each sample (the runtime's
    driver threads, the app's models); the config hash is computed once."""

    def __init__(self, cfg: UnitConfig, outbox: Outbox, drivers: Callable[[], dict[str, dict[str, Any]]],
                 models: Callable[[], dict[str, str]], thermal: Thermal | None = None) -> None:
        self.device_id = cfg.device_id
        self.device_type = cfg.type
        self.outbox = outbox
        self.outbox_dir = Path(cfg.outbox.path).parent
        self.drivers = drivers
        self.models = models
        self.thermal = thermal or Thermal()
        self.config_hash = config_hash(cfg)
        self._cpu = (time.monotonic(), time.process_time())

    def cpu_pct(self) -> float | None:
        """CPU time of the whole process (every thread) since the last call, in % of one core."""
        wall, cpu = time.monotonic(), time.process_time()
        (wall0, cpu0), self._cpu = self._cpu, (wall, cpu)
        return round(100.0 * (cpu - cpu0) / (wall - wall0), 2) if wall > wall0 else None

    def sample(self, clock: Clock | None = None) -> Health:
        now = time.time()
        st = self.outbox.stats()
        return Health(
            device_id=self.device_id, device_type=self.device_type, ts=now, agent_version=customs_edge.__version__,
            uptime_s=round(time.monotonic() - _STARTED, 3), cpu_pct=self.cpu_pct(), rss_bytes=rss_bytes(),
            disk_free_bytes=disk_free_bytes(self.outbox_dir), soc_temp_c=self.thermal.read(),
            outbox_pending=st.pending,
            oldest_unsent_age_s=None if st.oldest_ts is None else round(max(0.0, now - st.oldest_ts), 3),
            dropped={k.removeprefix("dropped."): n for k, n in st.dropped.items()},
            dead_letters=dict(st.dead_letters),
            drivers={role: DriverHealth.model_validate(d) for role, d in self.drivers().items()},
            models=self.models(), config_hash=self.config_hash,
            clock_offset_s=None if clock is None else round(clock[0], 6),
            clock_rtt_s=None if clock is None else round(clock[1], 6))
