"""MtSics against the MT-SICS balance simulator on a real pty and a loopback socket, with
garbled replies, error replies, overload and a silent balance."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from customs_edge.agent.apps.scale import ScaleApp, ScaleAppConfig
from customs_edge.core.errors import DriverFault, DriverSilent
from customs_edge.core.readings import Weight
from customs_edge.core.records import RecordIn
from customs_edge.drivers.mtsics import MtSics, MtSicsConfig, format_weight, parse_reply
from customs_edge.simulators.base import Endpoints, Faults
from customs_edge.simulators.ore_devices import Bench, SicsBalanceSim
from customs_edge.simulators.wire import mtsics as sics


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


# --- the manual's reply codes, read by the driver and written by the simulator independently ------------
MANUAL = Path(__file__).parent / "fixtures" / "mtsics" / "manual_replies.txt"


def manual_replies() -> list[tuple[str, ...]]:
    return [tuple(line.split("\t")) for line in MANUAL.read_text().splitlines() if not line.startswith("#")]


@pytest.mark.parametrize(("reply", "kind", "command", "status", "weight", "unit"), manual_replies())
def test_manual_replies_parse_and_the_simulator_writes_them(reply: str, kind: str, command: str, status: str,
                                                            weight: str, unit: str) -> None:
    r = parse_reply(reply.encode())
    assert r is not None and (r.kind, r.status, r.weight) == (kind, status, float(weight) if weight else None)
    if kind == "weight":
        written = sics.weight(float(weight), unit, stable=status == "S", decimals=len(weight.partition(".")[2]))
    elif kind == "status":
        written = sics.status(command, status)
    else:
        written = {"ES": sics.SYNTAX_ERROR, "ET": sics.TRANSMISSION_ERROR, "EL": sics.LOGICAL_ERROR}[status]
    assert written == reply.encode() + b"\r\n"


@pytest.mark.parametrize("line", [b"S A", b"S D", b"S S", b"Z D", b"Z S", b"SI I", b"ZI A", b"S  I"])
def test_status_codes_the_manual_does_not_give_a_command_are_garbled(line: bytes) -> None:
    assert parse_reply(line) is None


def feed_app(app: ScaleApp, d: MtSics, n: int) -> list[RecordIn]:
    out: list[RecordIn] = []
    for _ in range(n):
        out += app.feed(first(d))
    return out


def test_busy_replies_to_s_are_not_still_so_the_settled_load_is_reported(balance) -> None:
    """With `command: S` a moving balance answers 'S I' (no stable value in time). Busy is no value and
    not stable: the settle count restarts, and the load that then settles is reported as a weighing."""
    _, bench, url = balance
    app = ScaleApp("scale-1", ScaleAppConfig(settle_frames=3, min_weight=1.0))
    bench.force(800.0, motion=True)
    with make(url, command="S") as d:
        busy = first(d)
        assert busy.value is None and not busy.stable
        records = feed_app(app, d, 6)
        bench.force(1234.56)
        records += feed_app(app, d, 6)
    assert [r.payload["weight"] for r in records if r.type == "weighing"] == [pytest.approx(1234.56)]


def test_overload_and_underload_are_flagged_and_never_averaged_as_a_weight(balance) -> None:
    _, bench, url = balance
    app = ScaleApp("scale-1", ScaleAppConfig(settle_frames=3, min_weight=1.0))
    with make(url) as d:
        bench.force(1000.0)
        records = feed_app(app, d, 4)
        bench.force(9000.0)
        over = first(d)
        assert (over.overload, over.underload, over.in_range, over.value) == (True, False, False, None)
        records += app.feed(over) + feed_app(app, d, 3)
        bench.force(-500.0)
        under = first(d)
        assert (under.overload, under.underload, under.value) == (False, True, None)
        records += app.feed(under)
    summary = app.close()[0].payload
    assert [r.payload["weight"] for r in records if r.type == "weighing"] == [pytest.approx(1000.0)]
    assert summary["out_of_range"] == 5
    assert summary["min"] == summary["max"] == summary["mean"] == pytest.approx(1000.0)  # no 0 kg from an overload
