"""NMEA 0183 GNSS receiver: the driver on sentences published by receiver makers and users (fixtures),
and on the simulator (written from the standard, never importing the driver) with its ground truth."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from customs_edge.agent.registry import lookup
from customs_edge.core.errors import DriverSilent
from customs_edge.core.readings import Position, ReadingError
from customs_edge.drivers.gps import NmeaGps, NmeaGpsConfig
from customs_edge.simulators.base import Conn, DeviceSim, Endpoints, Faults
from customs_edge.simulators.gps import EARTH_M_PER_DEG, EpochTruth, GpsSim, GpsWorld, sentence

FIXTURES = Path(__file__).parent / "fixtures" / "nmea"


class Replay(DeviceSim):
    """Sends the bytes of a fixture once `go` is set (after the driver opened the port and dropped
    stale input), then stays quiet with the port open."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data
        self.go = threading.Event()

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        while not self.go.wait(0.05):
            if stop.is_set():
                return
        conn.write(self.data)
        stop.wait()


def read_positions(drv: NmeaGps, done: Callable[[list[Position]], bool], timeout: float = 20.0) -> list[Position]:
    out: list[Position] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(out):
        r = drv.read()
        if r is not None:
            assert isinstance(r, Position)
            out.append(r)
    return out


def replay(name: str, settle_reads: int = 10) -> tuple[list[Position], NmeaGps]:
    """Every Position the driver makes of a fixture, read over a pty (the epochs end when the line idles)."""
    source = Replay((FIXTURES / name).read_bytes())
    with Endpoints(source, use_pty=True, tcp_port=None) as urls:
        drv = NmeaGps("gps", NmeaGpsConfig(port=urls["pty"], read_timeout_s=0.1))
        drv.open()
        source.go.set()
        try:
            got: list[Position] = []
            idle = 0
            deadline = time.monotonic() + 20
            while idle < settle_reads and time.monotonic() < deadline:  # until the line stays quiet
                r = drv.read()
                idle = 0 if r is not None or drv.parser.buf else idle + 1
                if r is not None:
                    assert isinstance(r, Position)
                    got.append(r)
        finally:
            drv.close()
    return got, drv


def minutes(deg: int, mins: float) -> float:
    return deg + mins / 60


def test_the_haicom_manual_gga_example() -> None:
    (p,), drv = replay("haicom-hi505-gga.nmea")
    assert p.valid and p.quality == 1 and p.satellites == 6 and p.hdop == 1.7 and p.alt_m == 78.8
    assert p.lat == pytest.approx(minutes(24, 47.2038), abs=1e-9)
    assert p.lon == pytest.approx(minutes(121, 0.4990), abs=1e-9)
    assert p.fix_time is None  # GGA has no date, and no RMC came to give one
    assert drv.stats.corrupt == 0 and drv.stats.frames == 1


def test_a_ublox_at_power_up_reports_no_fix_and_its_banner_is_not_corrupt() -> None:
    got, drv = replay("ublox-neo6m-power-up.nmea")
    assert len(got) == 2  # two bursts (RMC .. GLL, RMC .. GGA)
    assert all(not p.valid and p.lat is None and p.lon is None and p.quality == 0 for p in got)
    assert got[0].fix_mode == 1 and got[0].hdop == 99.99 and got[0].satellites == 0
    assert drv.stats.corrupt == 0 and drv.stats.frames == 14
    assert drv.stats.extra["other"] == 9  # 5 TXT, 2 VTG, GSV, GLL: good sentences, not used
    assert drv.stats.extra["fix_lost"] == 0  # never had one


def test_a_stale_position_without_a_fix_is_not_valid() -> None:
    (p,), drv = replay("stale-position-no-fix.nmea")
    assert not p.valid and p.quality == 0 and p.fix_mode == 1
    assert p.lat == pytest.approx(minutes(56, 11.5305), abs=1e-9)  # what it said, flagged not to be used
    assert p.lon == pytest.approx(-minutes(3, 2.0369), abs=1e-9)
    assert p.fix_time == dt.datetime(2011, 4, 16, 7, 58, 51, 891000, tzinfo=dt.UTC).timestamp()
    assert drv.stats.corrupt == 0


def test_a_dgps_fix_after_a_gap_is_regained_and_dated() -> None:
    got, drv = replay("ublox-dgps-capture.nmea")
    assert [p.valid for p in got] == [False, False, True, True]
    fixed, rmc_only = got[2], got[3]
    assert fixed.quality == 2 and fixed.satellites == 8 and fixed.hdop == 1.3 and fixed.alt_m == 28.4
    assert fixed.lat == pytest.approx(minutes(50, 53.00542), abs=1e-9)
    assert fixed.lon == pytest.approx(-minutes(1, 29.91575), abs=1e-9)
    assert fixed.fix_time == dt.datetime(2017, 7, 10, 9, 19, 6, tzinfo=dt.UTC).timestamp()  # the date of RMC
    assert rmc_only.quality is None and rmc_only.speed_mps == pytest.approx(0.082 * 1852 / 3600)
    assert rmc_only.fix_time == dt.datetime(2017, 7, 10, 9, 19, 7, tzinfo=dt.UTC).timestamp()
    assert drv.stats.extra["fix_regained"] == 1 and drv.stats.extra["fix_lost"] == 0


def test_a_published_sentence_with_a_wrong_checksum_is_corrupt() -> None:
    got, drv = replay("published-bad-checksum.nmea")
    assert got == [] and drv.stats.corrupt == 1 and drv.stats.frames == 0


def test_noise_and_cut_sentences_are_counted_and_skipped() -> None:
    good = (FIXTURES / "haicom-hi505-gga.nmea").read_bytes()
    drv = NmeaGps("gps", NmeaGpsConfig(port="loop://"))
    drv.parser.feed(b"\x00\xffnoise\r\n" + good[:30] + good + b"$GPGGA,no checksum\r\n" + b"x" * 400)
    assert drv._next() is None  # one epoch, still open
    assert drv.parser.corrupt == 4  # noise line, cut sentence, missing checksum, 400 bytes without a line end
    assert drv.parser.frames == 1


def test_readings_refuse_impossible_positions() -> None:
    with pytest.raises(ReadingError, match=r"Position\.lat: a valid position has lat and lon"):
        Position(source="gps", valid=True)
    with pytest.raises(ReadingError, match=r"Position\.lat: must be within"):
        Position(source="gps", valid=True, lat=91.0, lon=0.0)
    with pytest.raises(ReadingError, match=r"Position\.quality"):
        Position(source="gps", valid=False, quality=9)
    with pytest.raises(ReadingError, match=r"Position\.hdop"):
        Position(source="gps", valid=False, hdop=float("nan"))


def test_the_driver_is_registered_and_declares_positions() -> None:
    cls = lookup("driver", "nmea-gps")
    assert cls is NmeaGps
    assert (Position,) == cls.PRODUCES
    assert NmeaGpsConfig(port="/dev/ttyUSB0").baudrate == 9600


def dated(got: list[Position]) -> list[Position]:
    """The Positions with a fix time: all but possibly the first, when the driver joined mid-burst and
    got a GGA before any RMC had told it the date."""
    assert all(p.fix_time is not None for p in got[1:])
    return [p for p in got if p.fix_time is not None]


def truth_by_time(world: GpsWorld) -> dict[float, EpochTruth]:
    return {t.utc.timestamp(): t for t in list(world.truth)}


def metres(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    return math.hypot((lat1 - lat2) * EARTH_M_PER_DEG, (lon1 - lon2) * EARTH_M_PER_DEG * math.cos(math.radians(lat1)))


def assert_faithful(p: Position, t: EpochTruth) -> None:
    """The Position says what the receiver reported in that epoch, to the resolution of the sentences."""
    assert p.valid == t.fix
    if not t.fix:
        assert p.lat is None and p.quality == 0 and p.fix_mode == 1
        return
    assert p.lat is not None and p.lon is not None
    assert p.lat == pytest.approx(t.lat, abs=2e-7) and p.lon == pytest.approx(t.lon, abs=2e-7)  # 0.00001'
    assert p.alt_m == pytest.approx(t.alt_m, abs=0.05) and p.satellites == t.satellites
    assert p.hdop == pytest.approx(t.hdop, abs=0.005) and p.fix_mode == 3 and p.quality == 1
    assert p.speed_mps == pytest.approx(t.speed_mps, abs=0.001) and p.course_deg == pytest.approx(t.course_deg)


def test_driver_on_the_simulator_reports_every_epoch_as_the_receiver_said_it() -> None:
    world = GpsWorld(5, gap_every=0, jump_every=0)
    sim = GpsSim(world, rate_hz=20)
    with Endpoints(sim, use_pty=False, tcp_port=0) as urls:
        drv = NmeaGps("gps", NmeaGpsConfig(port=urls["socket"]))
        drv.open()
        try:
            got = read_positions(drv, lambda out: len(out) >= 30)
        finally:
            drv.close()
    truth = truth_by_time(world)
    got = dated(got)
    assert len(got) >= 29
    times = [p.fix_time for p in got]
    assert times == sorted(times) and len(set(times)) == len(times)  # one Position per epoch
    assert all(b - a == 1.0 for a, b in itertools.pairwise(times))  # none missing: 1 Hz
    for p in got:
        assert_faithful(p, truth[p.fix_time])
    assert drv.stats.corrupt == 0


def test_fix_loss_regain_and_a_multipath_jump_as_the_ground_truth_says() -> None:
    world = GpsWorld(6, gap_every=0, jump_every=0)
    sim = GpsSim(world, rate_hz=20)
    with Endpoints(sim, use_pty=True, tcp_port=None) as urls:
        drv = NmeaGps("gps", NmeaGpsConfig(port=urls["pty"]))
        drv.open()
        try:
            got = read_positions(drv, lambda out: sum(p.valid for p in out) >= 5)
            world.lose_fix(4)  # into a hold
            got += read_positions(drv, lambda out: any(not p.valid for p in out) and out[-1].valid)
            world.multipath(3, 60.0)  # a reflection off a container stack
            got += read_positions(drv, lambda out: len(out) >= 10)
        finally:
            drv.close()
    truth = truth_by_time(world)
    got = dated(got)
    for p in got:
        assert_faithful(p, truth[p.fix_time])
    lost = [p for p in got if not p.valid]
    assert len(lost) == 4
    assert drv.stats.extra["fix_lost"] == 1 and drv.stats.extra["fix_regained"] == 1
    jumped = [(p, truth[p.fix_time]) for p in got if truth[p.fix_time].multipath_m]
    assert len(jumped) == 3
    for p, t in jumped:  # reported as the receiver said: ~60 m off where the officer was (the app judges)
        assert p.lat is not None and p.lon is not None
        assert 50 < metres(p.lat, p.lon, t.true_lat, t.true_lon) < 70


def test_damaged_sentences_are_counted_and_never_become_wrong_positions() -> None:
    world = GpsWorld(7, gap_every=25, jump_every=0)
    sim = GpsSim(world, rate_hz=25, faults=Faults(corrupt_rate=0.05, seed=7))
    with Endpoints(sim, use_pty=False, tcp_port=0) as urls:
        drv = NmeaGps("gps", NmeaGpsConfig(port=urls["socket"]))
        drv.open()
        try:
            got = read_positions(drv, lambda out: len(out) >= 60 and drv.stats.corrupt >= 3, timeout=40)
        finally:
            drv.close()
    truth = truth_by_time(world)
    assert drv.stats.corrupt >= 3
    for p in dated(got):
        t = truth[p.fix_time]
        if p.lat is not None and t.fix:  # an epoch missing its GGA or RMC still says only what was sent
            assert p.lat == pytest.approx(t.lat, abs=2e-7) and p.lon == pytest.approx(t.lon, abs=2e-7)


def test_a_receiver_that_stops_sending_is_silent() -> None:
    sim = GpsSim(GpsWorld(8), rate_hz=10)
    with Endpoints(sim, use_pty=True, tcp_port=None) as urls:
        drv = NmeaGps("gps", NmeaGpsConfig(port=urls["pty"], silent_after_s=1.0))
        drv.open()
        try:
            assert read_positions(drv, lambda out: len(out) >= 2)
            sim.faults.pause(60)
            with pytest.raises(DriverSilent):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    drv.read()
        finally:
            drv.close()


def test_sentences_with_good_checksums_but_impossible_fields_are_corrupt() -> None:
    """A checksum guards the line, not the sender: a field that does not decode is counted, never a crash."""
    drv = NmeaGps("gps", NmeaGpsConfig(port="loop://"))
    good = "4807.038,N,01131.324,E,1,08,0.9,545.4,M,46.9,M,,"
    drv.parser.feed(sentence("GPRMC,123518,A,4807.038,N,01131.324,E,022.4,084.4,230394,003.1,W")
                    + sentence(f"GPGGA,123518,{good}"))
    for body in ("GPGGA,12x519,4807.038,N,01131.324,E,1,08,0.9,545.4,M,46.9,M,,",  # time
                 "GPGGA,123520,9507.038,N,01131.324,E,1,08,0.9,545.4,M,46.9,M,,",  # latitude 95 degrees
                 "GPRMC,123521,A,4807.038,N,01131.324,E,022.4,084.4,320394,003.1,W",  # 32 March
                 "GPGGA,123522,4807.038,N,01131.324,E,q,08,0.9,545.4,M,46.9,M,,"):  # fix quality
        drv.parser.feed(sentence(body))
    drv.parser.feed(sentence(f"GPGGA,123523,{good}") + sentence(f"GPGGA,123524,{good}"))
    got = list(iter(drv._next, None))
    day = dt.datetime(1994, 3, 23, 12, 35, tzinfo=dt.UTC).timestamp()
    assert [p.fix_time for p in got] == [day + 18, day + 23]
    assert all(p.valid and p.lat == pytest.approx(minutes(48, 7.038)) for p in got)
    assert drv.stats.corrupt == 4


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120) | st.sampled_from([b"$GPGGA,", b"*", b"\r\n", b"$GPRMC,123519,A,"]),
                max_size=30))
def test_no_bytes_make_the_driver_raise(chunks: list[bytes]) -> None:
    drv = NmeaGps("gps", NmeaGpsConfig(port="loop://"))
    for c in chunks:
        drv.parser.feed(c)
        while drv._next() is not None:
            pass
    drv._finish()
    assert len(drv.parser.buf) <= 4 * 82 + 120
