"""GNSS receiver: NMEA 0183 as a u-blox NEO-6M sends it (9600 8N1, one burst a second).

Written from NMEA 0183 (sentence layout, `*hh` = XOR of every character between `$` and `*`, CR LF,
at most 82 characters) and the u-blox receiver description (its default burst: RMC, VTG, GGA, GSA,
GSV, GLL; empty fields and status V / quality 0 / fix type 1 while there is no fix), never from
drivers/gps.py.

The world: an officer walking a container yard at about 1 m/s (a seeded random walk with heading
drift), receiver noise of a metre or two, and two kinds of events, both at seeded times and both
triggerable by tests: a multipath jump (the reported position off by tens of metres for a few
epochs, HDOP not alarming) and a fix gap (inside a hold or a container: no fix for some epochs).
`GpsWorld.truth` is the ground truth per epoch: where the officer was, what the receiver reported,
and whether it had a fix.

`rate` epochs are sent per real second (1 by default, like the receiver; tests run faster); the UTC
time in the sentences advances one second per epoch from `start`.

    customs-edge simulate gps [--rate 1] [--seed 7] [--corrupt-rate 0.01] [--link /tmp/gps0]
prints {"urls": {"gps": {"pty": "/dev/pts/N", "socket": "socket://127.0.0.1:P"}}} and runs until stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

from customs_edge.simulators.base import (
    Conn,
    Faults,
    PeriodicSim,
    add_endpoint_args,
    endpoints_from_args,
    run_until_signalled,
)

EARTH_M_PER_DEG = 111_320.0  # metres per degree of latitude (and of longitude at the equator)
KNOTS_PER_MPS = 3600 / 1852


def checksum(body: str) -> str:
    """NMEA 0183: XOR of the characters between '$' and '*', two upper-case hex digits."""
    return f"{reduce(lambda acc, ch: acc ^ ord(ch), body, 0):02X}"


def sentence(body: str) -> bytes:
    """'$' + body + '*hh' + CR LF."""
    out = f"${body}*{checksum(body)}\r\n"
    if len(out) > 82:
        raise ValueError(f"NMEA sentences are at most 82 characters: {out!r}")
    return out.encode("ascii")


def _lat(deg: float) -> tuple[str, str]:
    d = abs(deg)
    whole = int(d)
    return f"{whole:02d}{(d - whole) * 60:08.5f}", "N" if deg >= 0 else "S"


def _lon(deg: float) -> tuple[str, str]:
    d = abs(deg)
    whole = int(d)
    return f"{whole:03d}{(d - whole) * 60:08.5f}", "E" if deg >= 0 else "W"


@dataclass(frozen=True, slots=True)
class EpochTruth:
    utc: dt.datetime
    true_lat: float  # where the officer was
    true_lon: float
    lat: float  # what the receiver reported (noise and multipath included)
    lon: float
    alt_m: float
    fix: bool
    multipath_m: float  # the multipath offset in this epoch (0: none)
    satellites: int
    hdop: float
    speed_mps: float
    course_deg: float


class GpsWorld:
    """Deterministic for a seed: one EpochTruth per call to step()."""

    def __init__(self, seed: int | None = None, lat: float = 22.2167, lon: float = 113.5497, alt_m: float = 4.0,
                 start: dt.datetime | None = None, gap_every: int = 120, jump_every: int = 90) -> None:
        self.rng = random.Random(seed)
        self.lat, self.lon, self.alt = lat, lon, alt_m
        self.utc = start or dt.datetime(2026, 3, 14, 8, 0, 0, tzinfo=dt.UTC)
        self.heading = self.rng.uniform(0, 360)
        self.gap_every, self.jump_every = gap_every, jump_every
        self.truth: list[EpochTruth] = []
        self._gap_left = 0
        self._jump_left = 0
        self._jump = (0.0, 0.0)
        self._lock = threading.Lock()

    def lose_fix(self, epochs: int) -> None:
        """The next `epochs` epochs have no fix (the officer walks into a hold)."""
        with self._lock:
            self._gap_left = epochs

    def multipath(self, epochs: int, metres: float) -> None:
        """The next `epochs` epochs are reported `metres` off, in a seeded direction."""
        with self._lock:
            bearing = math.radians(self.rng.uniform(0, 360))
            self._jump_left, self._jump = epochs, (metres * math.cos(bearing), metres * math.sin(bearing))

    def step(self) -> EpochTruth:
        with self._lock:
            n = len(self.truth)
            if self.gap_every and n and n % self.gap_every == 0 and not self._gap_left:
                self._gap_left = self.rng.randint(3, 8)
            if self.jump_every and n and n % self.jump_every == 0 and not self._jump_left:
                bearing = math.radians(self.rng.uniform(0, 360))
                metres = self.rng.uniform(25, 80)
                self._jump_left, self._jump = self.rng.randint(2, 5), (metres * math.cos(bearing),
                                                                         metres * math.sin(bearing))
            self.heading = (self.heading + self.rng.gauss(0, 15)) % 360
            speed = max(0.0, self.rng.gauss(1.0, 0.3))
            north, east = speed * math.cos(math.radians(self.heading)), speed * math.sin(math.radians(self.heading))
            m_per_deg_lon = EARTH_M_PER_DEG * math.cos(math.radians(self.lat))
            self.lat += north / EARTH_M_PER_DEG
            self.lon += east / m_per_deg_lon
            fix = self._gap_left == 0
            self._gap_left = max(0, self._gap_left - 1)
            dn, de = self._jump if self._jump_left else (0.0, 0.0)
            multipath = math.hypot(dn, de) if fix and self._jump_left else 0.0
            self._jump_left = max(0, self._jump_left - 1)
            noise_n, noise_e = self.rng.gauss(0, 1.2), self.rng.gauss(0, 1.2)
            t = EpochTruth(
                utc=self.utc, true_lat=self.lat, true_lon=self.lon,
                lat=self.lat + (noise_n + (dn if multipath else 0)) / EARTH_M_PER_DEG,
                lon=self.lon + (noise_e + (de if multipath else 0)) / m_per_deg_lon,
                alt_m=round(self.alt + self.rng.gauss(0, 2), 1), fix=fix, multipath_m=multipath,
                satellites=self.rng.randint(6, 11) if fix else self.rng.randint(0, 3),
                hdop=round(self.rng.uniform(0.8, 1.6), 2) if fix else 99.99,
                speed_mps=speed, course_deg=round(self.heading, 2),
            )
            self.truth.append(t)
            self.utc += dt.timedelta(seconds=1)
            return t


def burst(t: EpochTruth) -> list[bytes]:
    """The epoch's sentences in u-blox order: RMC, VTG, GGA, GSA, GSV, GLL."""
    hms = t.utc.strftime("%H%M%S") + ".00"
    dmy = t.utc.strftime("%d%m%y")
    if not t.fix:
        return [sentence(b) for b in (
            f"GPRMC,{hms},V,,,,,,,{dmy},,,N", "GPVTG,,,,,,,,,N", f"GPGGA,{hms},,,,,0,{t.satellites:02d},99.99,,,,,,",
            "GPGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99", "GPGSV,1,1,00", f"GPGLL,,,,,{hms},V,N")]
    la, ns = _lat(t.lat)
    lo, ew = _lon(t.lon)
    knots = t.speed_mps * KNOTS_PER_MPS
    used = ",".join(f"{prn:02d}" for prn in range(2, 2 + t.satellites)) + "," * (12 - t.satellites)
    return [sentence(b) for b in (
        f"GPRMC,{hms},A,{la},{ns},{lo},{ew},{knots:.3f},{t.course_deg:.2f},{dmy},,,A",
        f"GPVTG,{t.course_deg:.2f},T,,M,{knots:.3f},N,{t.speed_mps * 3.6:.3f},K,A",
        f"GPGGA,{hms},{la},{ns},{lo},{ew},1,{t.satellites:02d},{t.hdop:.2f},{t.alt_m:.1f},M,9.8,M,,",
        f"GPGSA,A,3,{used},{t.hdop * 1.6:.2f},{t.hdop:.2f},{t.hdop * 1.3:.2f}",
        f"GPGSV,1,1,{min(t.satellites, 4):02d}", f"GPGLL,{la},{ns},{lo},{ew},{hms},A,A")]


class GpsSim(PeriodicSim):
    def __init__(self, world: GpsWorld, rate_hz: float = 1.0, faults: Faults | None = None) -> None:
        super().__init__(faults)
        self.world = world
        self.period = 1.0 / rate_hz
        self.sent = 0  # sentences written

    def tick(self, conn: Conn) -> None:
        for s in burst(self.world.step()):
            conn.write(self.faults.mangle(s))
            self.sent += 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge simulate gps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1.0, help="epochs per second (the receiver: 1)")
    p.add_argument("--lat", type=float, default=22.2167, help="start latitude, degrees")
    p.add_argument("--lon", type=float, default=113.5497, help="start longitude, degrees")
    p.add_argument("--gap-every", type=int, default=120, help="a fix gap every N epochs (0: none)")
    p.add_argument("--jump-every", type=int, default=90, help="a multipath jump every N epochs (0: none)")
    add_endpoint_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    world = GpsWorld(args.seed, args.lat, args.lon, gap_every=args.gap_every, jump_every=args.jump_every)
    sim = GpsSim(world, args.rate, Faults(args.corrupt_rate, args.seed))
    run_until_signalled({"gps": endpoints_from_args(sim, args)}, args=args)
