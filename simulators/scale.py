"""Weighing indicator in Mettler-Toledo continuous-output mode.

The world: a platform that is empty, then loaded (a few seconds of motion while the load settles),
stable for a while, then unloaded. Frames go out continuously at `rate` per second (a real indicator
at 9600 baud sends ~50/s) with or without the checksum byte. A load above the platform's capacity
sets the out-of-range bit; `ScaleSim.power_up` sets "powered up, not zeroed" (status B bit 6). The
frames are written by simulators/wire/toledo.py, from the format's documentation.

    customs-edge simulate scale [--rate 50] [--checksum on|off] [--corrupt-rate 0.01] [--link /tmp/scale0]
prints {"urls": {"scale": {"pty": "/dev/pts/N", "socket": "socket://127.0.0.1:P"}}} and runs until stopped.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections.abc import Sequence

from customs_edge.simulators.base import (
    Conn,
    DeviceSim,
    Faults,
    add_endpoint_args,
    endpoints_from_args,
    run_until_signalled,
)
from customs_edge.simulators.wire import toledo


class ScaleWorld:
    """Deterministic for a seed: weight(t) for a platform loaded and unloaded in cycles."""

    def __init__(self, seed: int | None = None, capacity_kg: float = 60.0, cycle_s: float = 6.0) -> None:
        self.rng = random.Random(seed)
        self.capacity = capacity_kg
        self.cycle_s = cycle_s
        self.t0 = time.monotonic()
        self._load = 0.0
        self._cycle = -1
        self._forced: tuple[float, bool] | None = None

    def force(self, weight_kg: float | None, motion: bool = False) -> None:
        """Pin the platform's weight (tests); None resumes the cycles."""
        self._forced = None if weight_kg is None else (weight_kg, motion)

    def sample(self, now: float) -> tuple[float, bool]:
        """(displayed weight in kg, motion) at monotonic time `now`."""
        if self._forced is not None:
            return self._forced
        t = now - self.t0
        cycle, phase = divmod(t, self.cycle_s)
        if int(cycle) != self._cycle:
            self._cycle = int(cycle)
            self._load = round(self.rng.uniform(2.0, self.capacity * 0.9), 2)
        f = phase / self.cycle_s
        if f < 0.15:
            return 0.0, False
        if f < 0.3:  # settling: overshoot and ring down
            k = (f - 0.15) / 0.15
            return round(self._load * (1 + 0.2 * (1 - k) * self.rng.uniform(-1, 1)), 2), True
        if f < 0.9:
            return self._load, False
        return round(self._load * (1 - (f - 0.9) * 10), 2), True


class ScaleSim(DeviceSim):
    def __init__(self, world: ScaleWorld, rate_hz: float = 50.0, with_checksum: bool = True,
                 faults: Faults | None = None) -> None:
        super().__init__(faults)
        self.world = world
        self.period = 1.0 / rate_hz
        self.with_checksum = with_checksum
        self.power_up = False  # powered up and not zeroed yet: status B bit 6
        self.sent = 0
        self._lock = threading.Lock()

    def frame(self, now: float) -> bytes:
        with self._lock:
            weight, motion = self.world.sample(now)
        over = weight > self.world.capacity
        return toledo.frame(min(weight, 9999.99), 0.0, decimals=2, unit="kg", motion=motion, over_range=over,
                            power_up=self.power_up, checksum=self.with_checksum)

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        next_t = time.monotonic()
        while not stop.is_set() and not conn.closed:
            now = time.monotonic()
            if now < next_t:
                time.sleep(next_t - now)
                continue
            next_t += self.period
            if next_t < now - 1:  # fell behind (suspended): do not burst
                next_t = now + self.period
            if self.faults.paused:
                continue
            conn.write(self.faults.mangle(self.frame(now)))
            self.sent += 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge simulate scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=50.0, help="frames per second")
    p.add_argument("--checksum", choices=["on", "off"], default="on")
    p.add_argument("--cycle", type=float, default=6.0, help="seconds per load/unload cycle")
    add_endpoint_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sim = ScaleSim(ScaleWorld(args.seed, cycle_s=args.cycle), args.rate, args.checksum == "on",
                   Faults(args.corrupt_rate, args.seed))
    run_until_signalled({"scale": endpoints_from_args(sim, args)}, args=args)
