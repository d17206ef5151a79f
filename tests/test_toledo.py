"""Toledo continuous output: captured frames, corrupt frames, resync, checksum auto-detection, and the
driver against the simulator on a real pty and a loopback socket."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from customs_edge.agent.apps.scale import ScaleApp, ScaleAppConfig
from customs_edge.core.errors import DriverFault, DriverSilent
from customs_edge.core.readings import Weight
from customs_edge.drivers.toledo import ToledoConfig, ToledoContinuous, ToledoParser, checksum, decode, encode
from customs_edge.simulators.base import Endpoints, Faults
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from customs_edge.simulators.wire import toledo

FIXTURES = Path(__file__).parent / "fixtures" / "toledo" / "frames.txt"


def fixture_frames() -> list[tuple[bytes, dict[str, object], dict[str, int]]]:
    """(frame, its decoded fields, the encoder settings the frame implies) per fixture line."""
    out = []
    for line in FIXTURES.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        hexpart, expected, settings = line.split("|")
        out.append((bytes.fromhex(hexpart), json.loads(expected), json.loads(settings)))
    return out


def captured() -> list[tuple[bytes, dict[str, object]]]:
    return [(frame, expected) for frame, expected, _ in fixture_frames()]


def parse_all(data: bytes, mode: str = "auto") -> tuple[list[dict[str, object]], ToledoParser]:
    p = ToledoParser(mode)  # type: ignore[arg-type]
    p.feed(data)
    out = []
    while (f := p.next()) is not None:
        out.append(f.values())
    return out, p


@pytest.mark.parametrize(("frame", "expected"), captured())
def test_captured_frame_decodes_to_its_fields(frame: bytes, expected: dict[str, object]) -> None:
    assert checksum(frame[:17]) == frame[17], "fixture checksum"
    f = decode(frame[:17], with_checksum=True)
    assert f is not None
    assert f.values() == expected


def test_stream_of_captured_frames_with_and_without_checksum() -> None:
    frames = [f for f, _ in captured()]
    expected = [e for _, e in captured()]
    with_sum = b"".join(frames * 3)
    without = b"".join(f[:17] for f in frames * 3)
    got, p = parse_all(with_sum, "auto")
    # auto mode latched after three frames, so even the last frame (nothing after it) is decoded
    assert got == expected * 3 and p.corrupt == 0 and p.mode == "on"
    got, p = parse_all(without, "auto")
    assert got == expected * 3 and p.corrupt == 0 and p.mode == "off"
    got, p = parse_all(with_sum[:36], "auto")  # before latching, a frame waits to see what follows its CR
    assert len(got) == 1 and p.mode == "auto"
    got, p = parse_all(with_sum, "on")
    assert got == expected * 3 and p.corrupt == 0


def test_bad_checksum_is_counted_and_skipped_and_the_stream_resyncs() -> None:
    good = [f for f, _ in captured()]
    bad = bytearray(good[1])
    bad[17] ^= 0x01
    got, p = parse_all(good[0] + bytes(bad) + good[2] + good[3], "on")
    assert [g["weight"] for g in got] == [12.34, 1230.0, 250.0]
    assert p.corrupt == 1


def test_garbage_truncation_and_bad_fields_resync_on_next_stx() -> None:
    good = [f for f, _ in captured()]
    truncated = good[1][:9]
    bad_digit = bytearray(good[2])
    bad_digit[6] = ord("x")
    stream = b"\xff\x00junk" + good[0] + truncated + bytes(bad_digit) + good[3] + good[0]
    got, p = parse_all(stream, "on")
    assert [g["weight"] for g in got] == [12.34, 250.0, 12.34]
    assert p.corrupt == 3  # leading junk, the truncated frame, the frame with a letter in its digits


def test_forced_mode_that_does_not_match_the_indicator_shows_as_corrupt_frames() -> None:
    frames = b"".join(f[:17] for f, _ in captured())  # indicator without checksum
    got, p = parse_all(frames, "on")
    assert p.corrupt >= 2 and len(got) < 5


def test_auto_mode_unlatches_when_the_indicator_is_reconfigured() -> None:
    p = ToledoParser("auto")
    with_sum = b"".join(encode(i / 10, with_checksum=True) for i in range(10))
    without = b"".join(encode(i / 10, with_checksum=False) for i in range(40))
    p.feed(with_sum + without)
    n = 0
    while p.next() is not None:
        n += 1
    assert p.mode == "off"
    assert n >= 40  # after a few corrupt frames it relearned the setting


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise(data: bytes) -> None:
    for mode in ("auto", "on", "off"):
        p = ToledoParser(mode)  # type: ignore[arg-type]
        p.feed(data)
        while p.next() is not None:
            pass


@given(
    st.integers(min_value=0, max_value=999_999), st.integers(min_value=0, max_value=999_999),
    st.sampled_from([0, 1, 2, 3]), st.booleans(), st.booleans(), st.booleans(), st.sampled_from(["kg", "lb", "g", "t"]),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_every_valid_frame_parses_back_to_its_value(w: int, t: int, decimals: int, negative: bool, motion: bool,
                                                    net: bool, unit: str, with_sum: bool) -> None:
    weight = (-1 if negative else 1) * w / 10**decimals
    tare = t / 10**decimals
    frame = encode(weight, tare, decimals=decimals, unit=unit, motion=motion, net=net, with_checksum=with_sum)
    got, p = parse_all(frame * 4, "on" if with_sum else "off")
    assert p.corrupt == 0 and len(got) == 4
    assert got[0]["weight"] == pytest.approx(weight) and got[0]["tare"] == pytest.approx(tare)
    assert got[0]["motion"] is motion and got[0]["net"] is net and got[0]["unit"] == unit


def _driver(port: str, **kw: object) -> ToledoContinuous:
    return ToledoContinuous("scale", ToledoConfig(driver="toledo-continuous", port=port, **kw))  # type: ignore[arg-type]


def _read_n(d: ToledoContinuous, n: int, timeout: float = 5.0) -> list[Weight]:
    out: list[Weight] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        r = d.read()
        if r is not None:
            assert isinstance(r, Weight)
            out.append(r)
    return out


@pytest.mark.parametrize("kind", ["pty", "socket"])
@pytest.mark.parametrize("with_sum", [True, False])
def test_driver_reads_the_simulator(kind: str, with_sum: bool) -> None:
    sim = ScaleSim(ScaleWorld(seed=3, cycle_s=1.0), rate_hz=100, with_checksum=with_sum)
    with Endpoints(sim) as urls:
        d = _driver(urls[kind])
        d.open()
        try:
            values = _read_n(d, 50)
        finally:
            d.close()
    assert len(values) == 50
    assert d.stats.corrupt <= 1  # at most a partial frame at the moment the port opened
    assert d.parser.mode == ("on" if with_sum else "off")
    assert any((v.value or 0) > 0 for v in values) and all(v.unit == "kg" for v in values)


def test_driver_counts_injected_corruption_and_keeps_reading() -> None:
    faults = Faults(seed=1)
    sim = ScaleSim(ScaleWorld(seed=1), rate_hz=200, faults=faults)
    with Endpoints(sim, tcp_port=None) as urls:
        d = _driver(urls["pty"])
        d.open()
        try:
            _read_n(d, 20)
            before = d.stats.corrupt
            faults.corrupt_next(10)
            values = _read_n(d, 100)
        finally:
            d.close()
    assert len(values) == 100
    assert 5 <= d.stats.corrupt - before <= 12  # each damaged frame counted about once (a truncation may merge two)


def test_silent_port_is_a_driver_fault_not_a_hang() -> None:
    sim = ScaleSim(ScaleWorld(seed=1), rate_hz=50)
    with Endpoints(sim, tcp_port=None) as urls:
        d = _driver(urls["pty"], silent_after_s=0.5)
        d.open()
        try:
            assert _read_n(d, 5)
            sim.faults.pause(5)
            t0 = time.monotonic()
            with pytest.raises(DriverSilent):
                while time.monotonic() - t0 < 3:
                    d.read()
            assert time.monotonic() - t0 < 1.5
        finally:
            d.close()


def test_disconnected_socket_is_a_driver_fault() -> None:
    sim = ScaleSim(ScaleWorld(seed=1), rate_hz=50)
    ep = Endpoints(sim, use_pty=False)
    urls = ep.start()
    d = _driver(urls["socket"], silent_after_s=3)
    d.open()
    try:
        assert _read_n(d, 5)
        ep.drop_clients()  # the cable is pulled
        t0 = time.monotonic()
        with pytest.raises(DriverFault):
            while time.monotonic() - t0 < 5:
                d.read()
        assert time.monotonic() - t0 < 2
    finally:
        d.close()
        ep.stop()


def test_a_backlog_in_one_read_is_decoded_not_trimmed() -> None:
    """After a stall, a serial buffer or a TCP gateway hands over many frames at once."""
    backlog = b"".join(encode(i / 100, with_checksum=True) for i in range(1, 1001))  # 18 kB
    got, p = parse_all(backlog, "auto")
    assert len(got) == 1000 and p.corrupt == 0


# --- status bits: power-up not zeroed, over range ---------------------------------------------------------
@pytest.mark.parametrize(("frame", "expected", "settings"), fixture_frames())
def test_the_simulator_writes_each_fixture_frame_from_its_fields(frame: bytes, expected: dict[str, Any],
                                                                 settings: dict[str, int]) -> None:
    e = expected
    assert toledo.frame(e["weight"], e["tare"], unit=e["unit"], net=e["net"], motion=e["motion"],
                        over_range=e["out_of_range"], power_up=e["power_up_not_zeroed"], **settings) == frame


def test_a_power_up_frame_is_accepted_and_flagged_not_corrupt() -> None:
    """Status B bit 6 ("power-up, not zeroed") is a state of a valid frame; bit 6 of status A or C is not."""
    sim = ScaleSim(ScaleWorld(seed=1), rate_hz=100)
    sim.world.force(0.57)
    sim.power_up = True
    with Endpoints(sim, tcp_port=None) as urls:
        d = _driver(urls["pty"])
        d.open()
        try:
            values = _read_n(d, 10)
        finally:
            d.close()
    assert len(values) == 10 and d.stats.corrupt <= 1  # at most the frame cut when the port opened
    assert all(v.not_zeroed and v.value == pytest.approx(0.57) for v in values)
    frame = bytearray(toledo.frame(1.0))
    for status_byte in (1, 3):  # A and C: bit 6 is always 0
        bad = bytearray(frame)
        bad[status_byte] |= 0x40
        bad[17] = checksum(bytes(bad[:17]))
        assert decode(bytes(bad[:17]), with_checksum=True) is None


def _readings_once(d: ToledoContinuous, settled: Any, n: int, timeout: float = 10.0) -> list[Weight]:
    """The first n readings from the one for which settled(reading) holds (frames already on the line
    when the simulated load changed are skipped)."""
    out: list[Weight] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        r = d.read()
        if r is not None and (out or settled(r)):
            out.append(r)
    assert len(out) == n, f"{len(out)} of {n} readings"
    return out


def test_an_over_range_reading_is_flagged_and_never_a_weighing() -> None:
    """A load over capacity sets status B bit 2: the reading says out of range and the scale app reports
    no weighing from it (nor averages it); the load that follows within range is reported."""
    sim = ScaleSim(ScaleWorld(seed=1, capacity_kg=60.0), rate_hz=100)
    app = ScaleApp("scale-1", ScaleAppConfig(settle_frames=5))
    with Endpoints(sim, tcp_port=None) as urls:
        d = _driver(urls["pty"])
        d.open()
        try:
            sim.world.force(75.0)
            over = _readings_once(d, lambda r: r.overload, 20)
            sim.world.force(20.0)
            within = _readings_once(d, lambda r: r.in_range, 20)
        finally:
            d.close()
    assert all(r.overload and r.value is not None for r in over) and all(r.in_range for r in within)
    records = [rec for r in over + within for rec in app.feed(r)]
    assert [r.payload["weight"] for r in records if r.type == "weighing"] == [pytest.approx(20.0)]
    summary = app.close()[0].payload
    assert summary["out_of_range"] == 20 and summary["max"] == pytest.approx(20.0)
