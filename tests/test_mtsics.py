"""MtSics against the MT-SICS balance simulator on a real pty and a loopback socket, with
garbled replies, error replies, overload and a silent balance."""

from __future__ import annotations

import time

import pytest

from customs_edge.core.errors import DriverFault, DriverSilent
from customs_edge.core.readings import Weight
from customs_edge.drivers.mtsics import MtSics, MtSicsConfig, format_weight, parse_reply
from customs_edge.simulators.base import Endpoints, Faults
from customs_edge.simulators.ore_devices import Bench, SicsBalanceSim


@pytest.fixture(params=["pty", "socket"])
def balance(request: pytest.FixtureRequest):
    bench = Bench(seed=1, cycle_s=8.0)
    sim = SicsBalanceSim(bench, Faults(seed=5))
    with Endpoints(sim) as urls:
        yield sim, bench, urls[request.param]


def make(url: str, **kw: object) -> MtSics:
    return MtSics("scale", MtSicsConfig(port=url, poll_interval_s=0.01, read_timeout_s=0.2, **kw))


def first(d: MtSics, n: int = 50):
    for _ in range(n):
        r = d.read()
        if r is not None:
            return r
    raise AssertionError("no reading")


def test_stable_and_dynamic_weights(balance) -> None:
    _, bench, url = balance
    bench.force(1234.56)
    with make(url) as d:
        r = first(d)
        assert isinstance(r, Weight)
        assert r.value == pytest.approx(1234.56) and r.unit == "g"
        assert r.stable is True and not (r.overload or r.underload)
        bench.force(-12.5, motion=True)
        r = first(d)
        assert r.value == pytest.approx(-12.5) and r.stable is False


def test_stable_command_while_moving_is_busy(balance) -> None:
    _, bench, url = balance
    bench.force(500.0, motion=True)
    with make(url, command="S") as d:
        r = first(d)
        assert r.value is None and r.stable is False and not (r.overload or r.underload)


def test_overload_and_underload(balance) -> None:
    _, bench, url = balance
    bench.force(9000.0)
    with make(url) as d:
        r = first(d)
        assert r.value is None and r.overload is True and r.underload is False
        bench.force(-500.0)
        r = first(d)
        assert r.value is None and r.underload is True and r.overload is False


def test_zero_on_open_and_error_replies(balance) -> None:
    sim, bench, url = balance
    bench.force(20.0)
    with make(url, zero_on_open=True) as d:
        assert bench.zero_offset == 20.0
        assert first(d).value == 0.0
        assert d.command("XYZ") is not None and d.stats.extra["ES"] == 1
        reply = d.command("I4")
        assert reply is not None and reply.text == sim.SERIAL
        bench.force(3000.0)
        reply = d.command("Z")
        assert reply is not None and reply.status == "+"  # outside the zero-setting range


def test_zero_on_open_refused_when_moving(balance) -> None:
    _, bench, url = balance
    bench.force(5.0, motion=True)
    d = make(url, zero_on_open=True)
    with pytest.raises(DriverFault, match="zero on open refused"):
        d.open()
    d.close()


def test_garbled_replies_are_counted_and_skipped(balance) -> None:
    sim, bench, url = balance
    bench.force(777.77)
    sim.faults.corrupt_next(5)
    with make(url) as d:
        readings = []
        while len(readings) < 5:
            r = d.read()
            if r is not None:
                readings.append(r)
        # a damaged reply is a partial line (no CR LF) or an invalid one, both counted; MT-SICS has
        # no checksum, so a flip that turns one digit into another passes as a (wrong) weight
        assert sim.faults.corrupted == 5
        wrong = sum(r.value != pytest.approx(777.77) for r in readings)
        assert d.stats.corrupt + wrong == 5
        assert d.stats.corrupt >= 3
        assert readings[-1].value == pytest.approx(777.77)


def test_silent_balance_raises_driver_silent(balance) -> None:
    sim, bench, url = balance
    bench.force(1.0)
    with make(url, silent_after_s=0.5) as d:
        first(d)
        sim.faults.pause(30)
        deadline = time.monotonic() + 5
        with pytest.raises(DriverSilent):
            while time.monotonic() < deadline:
                d.read()
        assert d.stats.extra["timeouts"] >= 1 and d.stats.faults == 1


@pytest.mark.parametrize(("line", "kind", "status", "weight"), [
    (b"S S     100.00 g", "weight", "S", 100.0),
    (b"S D      99.87 g", "weight", "D", 99.87),
    (b"S S    -12.345 kg", "weight", "S", -12.345),
    (b"S I", "status", "I", None),
    (b"S +", "status", "+", None),
    (b"S -", "status", "-", None),
    (b"Z A", "status", "A", None),
    (b"ES", "error", "ES", None),
    (b"ET", "error", "ET", None),
    (b"EL", "error", "EL", None),
])
def test_parse_valid_replies(line: bytes, kind: str, status: str, weight: float | None) -> None:
    r = parse_reply(line)
    assert r is not None and (r.kind, r.status, r.weight) == (kind, status, weight)


@pytest.mark.parametrize("line", [
    b"S S    100.00 g",      # weight field 9 wide
    b"S X     100.00 g",     # unknown status
    b"S S     10O.00 g",     # letter O for zero
    b"S S     100.00",       # no unit
    b"S S \x00   100.00 g",  # control character
    b"\xffS S     100.00 g",
    b"",
    b"E",
])
def test_parse_rejects_garbled(line: bytes) -> None:
    assert parse_reply(line) is None


def test_format_round_trip() -> None:
    for w in (0.0, 1.5, -3.25, 6199.99):
        r = parse_reply(format_weight(w)[:-2])
        assert r is not None and r.weight == pytest.approx(w)
    with pytest.raises(ValueError):
        format_weight(1e12)
