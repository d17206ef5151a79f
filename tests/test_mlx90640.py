"""GY-MCU90640 frame parser and driver: captured bytes, corrupt frames, a property, and the real link."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from customs_edge.core.errors import DriverFault, DriverSilent
from customs_edge.core.readings import ThermalFrame
from customs_edge.drivers.mlx90640 import (
    COLS,
    FRAME_LEN,
    ROWS,
    DeadPixels,
    Mlx90640Config,
    Mlx90640Parser,
    Mlx90640Serial,
    ThermalSource,
    checksum,
    command,
    encode,
    parse_command,
)
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.gate import GateSim
from customs_edge.simulators.gate_world import WorldParams

FIX = Path(__file__).resolve().parent / "fixtures" / "gate"


def frame_of(value: float, ambient: float = 25.0) -> np.ndarray:
    return np.full((ROWS, COLS), value, dtype=np.float32)


def parse_all(p: Mlx90640Parser, data: bytes, chunk: int = 0) -> list:
    out = []
    if chunk:
        for i in range(0, len(data), chunk):
            p.feed(data[i:i + chunk])
            while (f := p.next()) is not None:
                out.append(f)
    else:
        p.feed(data)
        while (f := p.next()) is not None:
            out.append(f)
    return out


# --- wire format -------------------------------------------------------------------------------
def test_commands_match_the_module_manual_bytes() -> None:
    assert command(0x35, 0x02) == bytes.fromhex("A53502DC")  # automatic output
    assert command(0x35, 0x01) == bytes.fromhex("A53501DB")  # query one frame
    assert command(0x25, 0x01) == bytes.fromhex("A52501CB")  # 4 Hz
    assert parse_command(bytes.fromhex("A53502DC")) == (0x35, 0x02)
    assert parse_command(bytes.fromhex("A53502DD")) is None


def test_frame_layout_and_checksum_rule_by_hand() -> None:
    pixels = np.arange(ROWS * COLS, dtype=np.float64).reshape(ROWS, COLS) * 0.01 + 20.0
    pixels[0, 0] = -5.0  # negative values are two's complement on the wire
    raw = encode(pixels, 31.25)
    assert len(raw) == FRAME_LEN == 1544
    assert raw[:4] == bytes.fromhex("5A5A0206")
    words = [int.from_bytes(raw[i:i + 2], "little") for i in range(0, 1542, 2)]
    # the STM32 firmware's rule written out: 0x5A5A + 0x0602 + every pixel + Ta, kept to 16 bits
    expected = (0x5A5A + 0x0602 + sum(words[2:770]) + words[770]) & 0xFFFF
    assert int.from_bytes(raw[1542:], "little") == expected == checksum(raw[:1542])
    assert int.from_bytes(raw[4:6], "little", signed=True) == -500
    assert int.from_bytes(raw[1540:1542], "little", signed=True) == 3125


def test_roundtrip_values_and_orientation() -> None:
    pixels = np.zeros((ROWS, COLS))
    pixels[2, 30] = 36.61  # row-major: row 2, column 30
    frames = parse_all(Mlx90640Parser(), encode(pixels + 21.0, 24.5))
    assert len(frames) == 1
    f = frames[0]
    assert f.pixels.shape == (24, 32) and f.pixels.dtype == np.float32
    assert f.pixels[2, 30] == pytest.approx(57.61, abs=1e-4)
    assert f.pixels[0, 0] == pytest.approx(21.0)
    assert f.ambient_c == pytest.approx(24.5)


# --- captured stream ---------------------------------------------------------------------------
def test_captured_stream_with_corrupt_and_short_frames() -> None:
    meta = json.loads((FIX / "capture.json").read_text())
    data = (FIX / "capture.bin").read_bytes()
    for chunk in (0, 1, 97, 1544):
        p = Mlx90640Parser()
        frames = parse_all(p, data, chunk)
        assert p.frames == len(frames) == meta["frames"]
        assert p.corrupt == meta["corrupt"], chunk
        assert p.resyncs >= 2  # the leading tail and the remains of the damaged frames
        for got, want in zip(frames, meta["good"], strict=True):
            assert got.ambient_c == pytest.approx(want["ambient_c"], abs=0.006)
            assert float(got.pixels.max()) == pytest.approx(want["max_c"], abs=0.006)
            assert hashlib.sha256(got.raw).hexdigest() == want["wire_sha256"]
            assert got.dead == want["dead_pixels"]


def test_capture_without_checksum_check_accepts_the_flipped_frame() -> None:
    """With checksum 'none' only the size is checked: the bit flip goes through, the short frame not."""
    meta = json.loads((FIX / "capture.json").read_text())
    p = Mlx90640Parser("none")
    frames = parse_all(p, (FIX / "capture.bin").read_bytes())
    assert len(frames) == meta["frames"] + 1
    assert p.corrupt == 1


def test_bad_checksum_resyncs_on_the_next_header() -> None:
    good = encode(frame_of(30.0), 25.0)
    bad = encode(frame_of(31.0), 25.0, good_checksum=False)
    p = Mlx90640Parser()
    frames = parse_all(p, bad + good + bad + good)
    assert [float(f.pixels[0, 0]) for f in frames] == [30.0, 30.0]
    assert p.corrupt == 2 and p.frames == 2


def test_wrong_size_field_is_corrupt() -> None:
    raw = bytearray(encode(frame_of(30.0), 25.0))
    raw[2:4] = (1000).to_bytes(2, "little")
    p = Mlx90640Parser()
    assert parse_all(p, bytes(raw) + encode(frame_of(29.0), 25.0))[0].pixels[0, 0] == pytest.approx(29.0)
    assert p.corrupt == 1


def test_damaged_header_after_sync_counts_as_corrupt() -> None:
    first, second = encode(frame_of(30.0), 25.0), bytearray(encode(frame_of(31.0), 25.0))
    second[1] = 0x00  # header destroyed: the frame can only be skipped
    p = Mlx90640Parser()
    frames = parse_all(p, first + bytes(second) + first)
    assert len(frames) == 2 and p.corrupt == 1


def test_dead_pixels_are_replaced_by_neighbours_and_counted() -> None:
    px = frame_of(30.0)
    px[5, 5] = 34.0
    px[5, 6] = -273.15  # stuck far outside the sensor's range
    px[0, 0] = 400.0
    frames = parse_all(p := Mlx90640Parser(), encode(px, 25.0))
    f = frames[0]
    assert f.dead == 2 and p.dead_pixels == 2
    assert f.pixels[5, 6] == pytest.approx((34.0 + 30 + 30 + 30) / 4)
    assert f.pixels[0, 0] == pytest.approx(30.0)
    dp = DeadPixels()
    again = px.copy()
    assert dp.repair(again) == 2 and dp.repair(px.copy()) == 2  # the cached plan gives the same answer
    assert np.all(again > 0)


frames_st = st.lists(st.floats(min_value=-20, max_value=120, allow_nan=False), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(values=frames_st, garbage=st.lists(st.binary(max_size=40), min_size=5, max_size=5),
       chunk=st.integers(min_value=1, max_value=2000), flip=st.integers(min_value=4 * 8, max_value=1544 * 8 - 1),
       damaged=st.integers(min_value=0, max_value=4))
def test_property_valid_frames_survive_garbage_and_any_single_bit_flip_is_caught(
        values: list[float], garbage: list[bytes], chunk: int, flip: int, damaged: int) -> None:
    """Whatever noise sits between frames and however the bytes are split, every intact frame comes
    out, in order; a frame with any one bit flipped after its header never does."""
    stream = bytearray()
    want = []
    for i, v in enumerate(values):
        g = garbage[i].replace(b"\x5a", b"\x00")  # noise that cannot fake a header
        stream += g
        raw = bytearray(encode(frame_of(v), 20.0 + i))
        if i == damaged:
            raw[flip // 8] ^= 1 << (flip % 8)
        else:
            want.append(round(v, 2))
        stream += raw
    p = Mlx90640Parser()
    got = [round(float(f.pixels[0, 0]), 2) for f in parse_all(p, bytes(stream), chunk)]
    assert got == want
    assert p.frames == len(want)
    assert p.corrupt >= (1 if damaged < len(values) else 0)


# --- the driver on a real link --------------------------------------------------------------------
def test_driver_satisfies_the_thermal_source_interface() -> None:
    drv = Mlx90640Serial("thermal", Mlx90640Config(port="loop://"))
    assert isinstance(drv, ThermalSource)


def test_config_refuses_unknown_rate_and_keys() -> None:
    with pytest.raises(ValueError, match="rate_hz"):
        Mlx90640Config(port="/dev/ttyUSB0", rate_hz=3)
    with pytest.raises(ValueError, match="extra"):
        Mlx90640Config.model_validate({"driver": "mlx90640-serial", "port": "x", "rate": 8})


def read_until(drv: Mlx90640Serial, n: int, timeout: float = 10.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        r = drv.read()
        if r is not None:
            out.append(r)
    return out


@pytest.mark.parametrize("kind", ["pty", "socket"])
def test_driver_starts_the_module_and_reads_frames(kind: str) -> None:
    sim = GateSim(3, WorldParams(rate_per_h=2000), speed=2.0)
    with Endpoints(sim.thermal, use_pty=kind == "pty", tcp_port=0 if kind == "socket" else None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls[kind], rate_hz=4))
        drv.open()
        try:
            readings = read_until(drv, 5)
        finally:
            drv.close()
    assert len(readings) == 5
    assert (0x25, 0x01) in sim.thermal.commands and (0x35, 0x02) in sim.thermal.commands
    r = readings[0]
    assert isinstance(r, ThermalFrame) and r.source == "thermal"
    assert r.pixels.shape == (24, 32)
    assert 10 < float(np.median(r.pixels)) < 35
    assert isinstance(r.ambient_c, float)
    assert r.dead_pixels == 2  # the world's two dead pixels, replaced
    assert float(r.pixels.min()) > -40


def test_module_sends_nothing_until_told() -> None:
    sim = GateSim(3, speed=1.0)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls["pty"], send_commands=False, silent_after_s=0.6))
        drv.open()
        try:
            with pytest.raises(DriverSilent):
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    assert drv.read() is None
        finally:
            drv.close()
    assert sim.thermal.sent == 0


def test_corrupt_frames_on_the_wire_are_counted_and_skipped() -> None:
    sim = GateSim(4, speed=4.0, corrupt_rate=0.3)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls["pty"]))
        drv.open()
        try:
            readings = read_until(drv, 20, timeout=15)
        finally:
            drv.close()
    assert len(readings) == 20
    assert drv.stats.corrupt >= 2
    assert sim.faults.corrupted >= drv.stats.corrupt - 1  # nothing counted that was not damaged (+ a tail)
    assert all(float(r.pixels.min()) > -40 for r in readings)


def test_frozen_sensor_faults_and_silence_faults() -> None:
    sim = GateSim(5, speed=4.0)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as urls:
        drv = Mlx90640Serial("thermal", Mlx90640Config(port=urls["pty"], frozen_after=5, silent_after_s=0.5))
        drv.open()
        try:
            assert len(read_until(drv, 3)) == 3
            sim.faults.stall(30)
            with pytest.raises(DriverFault, match="frozen"):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    drv.read()
            assert drv.stats.extra["frozen"] == 1
            sim.faults.stall(0)
            sim.faults.pause(30)
            with pytest.raises(DriverSilent):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    drv.read()
            sim.faults.resume()
            drv.close()
            drv.open()  # what the runtime does after a fault: reopen, and frames flow again
            assert len(read_until(drv, 2)) == 2
        finally:
            drv.close()


def test_a_flood_of_false_headers_is_one_corrupt_frame_not_one_per_byte() -> None:
    good = encode(np.full((24, 32), 30.0, np.float32), 22.0)
    p = Mlx90640Parser()
    p.feed(good + b"\x5a" * 100 + good + good)
    frames = 0
    while p.next() is not None:
        frames += 1
    assert frames == 3 and p.corrupt == 1
