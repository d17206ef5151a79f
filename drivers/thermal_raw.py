"""Radiometric thermal cameras that stream raw Y16 frames: a 384x288 industrial camera's raw-frame output,
or a FLIR Lepton 3.5 (160x120) forwarded by a small streamer; read over TCP (socket://host:port) or a
serial line, opened by URL like every serial instrument (`port`).

Frame, every field little-endian (docs/gate.md, "Raw-frame thermal cameras"):
  magic "TFR1" | header length (32) | width | height | pixel format (1 = kelvin x 100, 2 = kelvin x 10) |
  frame counter u32 | timestamp u64 µs since power-on | housing °C x 100 i16 | flags u16 (bit 0: flat-field
  correction in progress) | payload length u32 | width x height uint16 | CRC-32 (zlib) of all before it.

Bad input is counted, never fatal: a bad CRC or length (`corrupt`), bytes skipped to find the next magic
(`resyncs`), frames lost (counter gaps, `lost`), frames taken while the shutter is closed (`ffc`, not
radiometric: not delivered). A camera in another resolution than `width` x `height` raises DriverFault
naming both (the app's model is trained for one optics). Dead pixels (outside -40...300 °C) are replaced
by their neighbours' mean and counted, as for the MLX90640. Yields ThermalFrame (float32 °C, ambient_c =
the housing temperature).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from customs_edge.core import readings as rd
from customs_edge.core.errors import DriverFault
from customs_edge.drivers.base import SerialPortConfig, StreamSerialDriver
from customs_edge.drivers.mlx90640 import DeadPixels

MAGIC = b"TFR1"
HEAD = struct.Struct("<4sHHHHIQhHI")
HEAD_LEN = HEAD.size  # 32
CRC_LEN = 4
COUNTS_PER_K = {1: 100.0, 2: 10.0}
FLAG_FFC = 0x0001
MAX_PIXELS = 1280 * 1024


@dataclass(frozen=True, slots=True)
class RawFrame:
    pixels: np.ndarray
    counter: int
    uptime_us: int
    housing_c: float
    ffc: bool
    dead: int


class RawFrameParser:
    """Incremental: feed(bytes), then next() until None. Counters: frames, corrupt, resyncs, dead_pixels."""

    def __init__(self, max_buffer: int = 8 << 20) -> None:
        self.buf = bytearray()
        self.max_buffer = max_buffer
        self.frames = self.corrupt = self.resyncs = self.dead_pixels = 0
        self._dead = DeadPixels()

    def feed(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.max_buffer:
            self._skip(len(self.buf) - 4)

    def _skip(self, start: int) -> None:
        i = self.buf.find(MAGIC, start)
        if i < 0:
            i = max(0, len(self.buf) - 3)  # part of a magic may be on its way
        if i:
            del self.buf[:i]
            self.resyncs += 1

    def next(self) -> RawFrame | None:
        while True:
            if not self.buf.startswith(MAGIC):
                self._skip(0)
                if not self.buf.startswith(MAGIC):
                    return None
            if len(self.buf) < HEAD_LEN:
                return None
            _, hlen, w, h, fmt, counter, uptime, housing, flags, plen = HEAD.unpack_from(self.buf)
            if hlen != HEAD_LEN or fmt not in COUNTS_PER_K or plen != w * h * 2 or not 0 < w * h <= MAX_PIXELS:
                self.corrupt += 1
                self._skip(1)
                continue
            total = HEAD_LEN + plen + CRC_LEN
            if len(self.buf) < total:
                return None
            body = memoryview(self.buf)[: HEAD_LEN + plen]
            crc = int.from_bytes(self.buf[HEAD_LEN + plen: total], "little")
            if zlib.crc32(body) != crc:
                body.release()
                self.corrupt += 1
                self._skip(1)
                continue
            pixels = np.frombuffer(body[HEAD_LEN:], dtype="<u2").astype(np.float32).reshape(h, w)
            body.release()
            del self.buf[:total]
            pixels *= np.float32(1.0 / COUNTS_PER_K[fmt])
            pixels -= np.float32(273.15)
            dead = self._dead.repair(pixels)
            self.dead_pixels += dead
            self.frames += 1
            return RawFrame(pixels, counter, uptime, housing / 100.0, bool(flags & FLAG_FFC), dead)


class ThermalRawConfig(SerialPortConfig):
    driver: Literal["thermal-raw"] = "thermal-raw"
    width: int = Field(gt=0, le=1280, description="the camera's frame width (160 for a Lepton 3.5, 384 ...)")
    height: int = Field(gt=0, le=1024, description="the camera's frame height (120, 288 ...)")
    baudrate: int = Field(921600, gt=0, description="serial lines only; ignored over socket://")
    read_timeout_s: float = Field(0.2, gt=0, le=10)
    silent_after_s: float = Field(3.0, gt=0, description="no valid frame for this long is a fault")


class ThermalRaw(StreamSerialDriver):
    """Yields rd.ThermalFrame (float32 height x width °C, ambient_c = housing temperature, dead_pixels)."""

    Config = ThermalRawConfig
    PRODUCES = (rd.ThermalFrame,)
    config: ThermalRawConfig
    parser: RawFrameParser

    def __init__(self, role: str, config: ThermalRawConfig) -> None:
        super().__init__(role, config)
        self.parser = RawFrameParser()
        self._last_counter: int | None = None
        for key in ("lost", "ffc", "wrong_size"):
            self.stats.extra[key] = 0

    def open(self) -> None:
        self._last_counter = None
        super().open()

    def _next(self) -> rd.ThermalFrame | None:
        p = self.parser
        while True:
            f = p.next()
            self.stats.frames, self.stats.corrupt = p.frames, p.corrupt
            self.stats.extra["resyncs"], self.stats.extra["dead_pixels"] = p.resyncs, p.dead_pixels
            if f is None:
                return None
            if self._last_counter is not None:
                gap = (f.counter - self._last_counter - 1) & 0xFFFFFFFF
                if gap < 1 << 31:
                    self.stats.extra["lost"] += gap
            self._last_counter = f.counter
            h, w = f.pixels.shape
            if (w, h) != (self.config.width, self.config.height):
                self.stats.extra["wrong_size"] += 1
                self.stats.faults += 1
                raise DriverFault(f"{self.role}: the camera sends {w}x{h} frames, the config says "
                                  f"{self.config.width}x{self.config.height}: set width/height to the camera's "
                                  f"mode (and app.model to a model trained for it)")
            if f.ffc:
                self.stats.extra["ffc"] += 1  # shutter closed: not a radiometric image of the scene
                continue
            return rd.ThermalFrame(source=self.role, pixels=f.pixels, ambient_c=f.housing_c, dead_pixels=f.dead)
