"""MLX90640 thermal array behind the GY-MCU90640 serial module (STM32 reads the sensor, streams frames).

Frame, 1544 bytes, every 16-bit field little-endian:
  5A 5A | size (02 06 = 1538: the bytes that follow up to the checksum) | 768 x int16 pixels, °C x 100,
  row-major 24 rows x 32 columns | int16 ambient (sensor die) °C x 100 | uint16 checksum.
Checksum ("sum16"): the sum of the 771 preceding 16-bit words (header and size included), truncated to
16 bits. Source: an STM32 firmware that reproduces the module's output (CheckCode = 0x5A5A + 0x0602 +
every pixel + Ta); see docs/gate.md. It is one function, `checksum`, and `checksum: none` turns it off.
Commands: `A5 cmd arg sum` (sum = low byte of the three): 0x25 refresh rate, 0x35 output mode
(01 query one frame, 02 automatic output), 0x15 baud rate.

The module is sent `rate_hz` on open; the frames are then counted over `rate_window_s` windows. A
window slower than RATE_TOLERANCE x rate_hz raises one DriverFault (once per driver: the runtime's
reopen sends the rate again) and is counted in stats.rate_low afterwards; a faster one is counted in
stats.rate_high (a simulator run with --speed sends faster on purpose). stats.frame_rate_mhz holds
the last window's rate in milli-hertz.

The parser resynchronises on the next `5A 5A` after a bad frame and counts it. Pixels outside the
sensor's range (a dead pixel reads an impossible value) are replaced by the mean of their valid
neighbours and counted; they never fault the driver. A frozen sensor (the module repeats the same
frame) raises DriverFault; a silent one DriverSilent (SilenceWatch).

The driver yields ThermalFrame readings, the type the gate app consumes in its `thermal` role; any driver
that produces ThermalFrame fits there (camera-opencv with y16: a Lepton over UVC, °C = (Y16 - 27315) / 100).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import serial
from pydantic import Field, field_validator

from customs_edge.core import readings as rd
from customs_edge.core.errors import DriverFault
from customs_edge.drivers.base import DriverStats, SerialPortConfig, StreamSerialDriver

ROWS, COLS = 24, 32
PIXELS = ROWS * COLS
HEADER = b"\x5a\x5a"
SIZE = PIXELS * 2 + 2  # pixels + ambient: 1538 = 0x0602
FRAME_LEN = 4 + SIZE + 2  # 1544
VALID_C = (-40.0, 300.0)  # the MLX90640's object range; outside it a pixel is dead

CMD_RATE, CMD_MODE, CMD_BAUD = 0x25, 0x35, 0x15
MODE_QUERY, MODE_AUTO = 0x01, 0x02
# Refresh-rate argument of command 0x25, from the module's manual ("GYMCU90640 Module User Manual V1.0",
# section IV.4; ../shared/PROTOCOLS.md): A5 25 00 CA = 0.5 Hz ... A5 25 04 CE = 8 Hz. The npm package
# gy-mcu90640-node lists the same order. (vvkuryshev's main.py comments A5 25 01 CB as "4 Hz": the
# manual says 1 Hz.) tests/fixtures/gate/commands.txt holds the manual's bytes.
RATE_ARGS: dict[float, int] = {0.5: 0x00, 1.0: 0x01, 2.0: 0x02, 4.0: 0x03, 8.0: 0x04}
RATE_TOLERANCE = 0.75  # a window below this share of rate_hz (or above rate_hz / it) does not match
BAUD_ARGS: dict[int, int] = {9600: 0x01, 115200: 0x02, 460800: 0x03}


def command(cmd: int, arg: int) -> bytes:
    """`A5 cmd arg sum`, sum = (0xA5 + cmd + arg) & 0xFF. command(0x35, 0x02) == A5 35 02 DC."""
    return bytes([0xA5, cmd & 0xFF, arg & 0xFF, (0xA5 + cmd + arg) & 0xFF])


def checksum(body: bytes | bytearray | memoryview) -> int:
    """Sum of the 16-bit little-endian words of `body` (header .. ambient, 1542 bytes), mod 2**16."""
    return int(np.frombuffer(body, dtype="<u2").sum(dtype=np.uint64)) & 0xFFFF


@dataclass(frozen=True, slots=True)
class ThermalFrame:
    pixels: np.ndarray  # float32 (24, 32) °C, dead pixels already replaced
    ambient_c: float  # the module's ambient (sensor die) temperature
    dead: int  # pixels replaced in this frame
    raw: bytes  # the 1536 pixel bytes, to detect a frozen sensor


def encode(pixels_c: np.ndarray, ambient_c: float, *, good_checksum: bool = True) -> bytes:
    """A frame as the module sends it (tests and benches; the simulator has its own). Values are clipped
    to int16."""
    arr = np.asarray(pixels_c, dtype=np.float64)
    if arr.shape != (ROWS, COLS):
        raise ValueError(f"pixels must be {ROWS}x{COLS}, got {arr.shape}")
    vals = np.clip(np.rint(arr * 100.0), -32768, 32767).astype("<i2")
    amb = np.array([np.clip(round(ambient_c * 100.0), -32768, 32767)], dtype="<i2")
    body = HEADER + SIZE.to_bytes(2, "little") + vals.tobytes() + amb.tobytes()
    s = checksum(body)
    if not good_checksum:
        s ^= 0x0101
    return body + s.to_bytes(2, "little")


class DeadPixels:
    """Replaces pixels outside VALID_C, in place, by the mean of their valid 4-neighbours (the frame's
    mean when none is valid). The plan is cached: dead pixels stay dead, frame after frame."""

    def __init__(self) -> None:
        self._key = b""
        self._idx = np.zeros(0, dtype=np.intp)  # dead pixels (flat indices)
        self._nbr = np.zeros((0, 4), dtype=np.intp)  # their neighbours (a dead pixel's own index pads)
        self._w = np.zeros((0, 4), dtype=np.float32)  # 1 for a valid neighbour, 0 for padding

    def repair(self, pixels: np.ndarray) -> int:
        flat = pixels.reshape(-1)
        bad = (flat < VALID_C[0]) | (flat > VALID_C[1]) | np.isnan(flat)
        idx = np.flatnonzero(bad)
        if not idx.size:
            return 0
        key = idx.tobytes()
        if key != self._key:
            self._key = key
            self._plan(bad.reshape(pixels.shape), idx)
        n = self._w.sum(axis=1)
        vals = (flat[self._nbr] * self._w).sum(axis=1)
        lonely = n == 0
        if lonely.any():
            good = ~bad
            vals[lonely] = flat[good].mean() if good.any() else 0.0
            n[lonely] = 1.0
        flat[idx] = vals / n
        return int(idx.size)

    def _plan(self, bad: np.ndarray, idx: np.ndarray) -> None:
        h, w = bad.shape
        nbr = np.repeat(idx[:, None], 4, axis=1)
        wt = np.zeros((idx.size, 4), dtype=np.float32)
        for k, i in enumerate(idx.tolist()):
            r, c = divmod(i, w)
            for j, (rr, cc) in enumerate(((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))):
                if 0 <= rr < h and 0 <= cc < w and not bad[rr, cc]:
                    nbr[k, j], wt[k, j] = rr * w + cc, 1.0
        self._idx, self._nbr, self._w = idx, nbr, wt


def repair_dead(pixels: np.ndarray) -> int:
    """One-off repair (see DeadPixels). Returns how many pixels were replaced."""
    return DeadPixels().repair(pixels)


class Mlx90640Parser:
    """Incremental parser. feed(bytes), then next() until None. Counters: frames (valid), corrupt
    (dropped for size or checksum, or garbage between frames), resyncs (times bytes were skipped to
    find a header), dead_pixels (replaced so far)."""

    def __init__(self, checksum_rule: Literal["sum16", "none"] = "sum16", max_buffer: int = 1 << 20) -> None:
        self.rule = checksum_rule
        self.buf = bytearray()
        self.max_buffer = max_buffer
        self.frames = 0
        self.corrupt = 0
        self.resyncs = 0
        self.dead_pixels = 0
        self._dead = DeadPixels()
        self._synced = False  # a valid frame was seen: later garbage means a damaged frame
        self._rejected = False  # the bytes being skipped belong to a frame already counted
        self._since_bad = FRAME_LEN  # bytes skipped since the last counted corrupt frame

    def feed(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.max_buffer:  # only when nobody calls next(): bound the memory anyway
            self._skip_to_header(len(self.buf) - FRAME_LEN)

    def _skip_to_header(self, start: int) -> bool:
        """Drop bytes before the next header at or after `start`. False when none is buffered yet.
        A run of bytes skipped after the stream was in sync is one corrupt frame (a damaged header),
        unless it is the remains of a frame just rejected (already counted)."""
        i = self.buf.find(HEADER, start)
        if i < 0:
            keep = 1 if self.buf[-1:] == HEADER[:1] else 0  # half a header may be on its way
            i = len(self.buf) - keep
        if i:
            del self.buf[:i]
            self._since_bad += i
            self.resyncs += 1
            if self._synced and not self._rejected:
                self.corrupt += 1
            self._rejected = True  # further bytes of the same run are not counted again
        return bool(self.buf) and self.buf.startswith(HEADER)

    def next(self) -> ThermalFrame | None:
        while True:
            if not self.buf.startswith(HEADER) and not self._skip_to_header(0):
                return None
            if len(self.buf) < FRAME_LEN:
                return None
            size = int.from_bytes(self.buf[2:4], "little")
            ok = size == SIZE
            if ok and self.rule == "sum16":
                ok = checksum(memoryview(self.buf)[: FRAME_LEN - 2]) == int.from_bytes(
                    self.buf[FRAME_LEN - 2: FRAME_LEN], "little")
            if not ok:
                # one count per damaged frame: a run of false headers (a flood of 0x5A) is one, not one per byte
                if self._since_bad >= FRAME_LEN:
                    self.corrupt += 1
                    self._since_bad = 0
                self._rejected = True
                self._skip_to_header(1)
                continue
            raw = bytes(self.buf[4: 4 + PIXELS * 2])
            ambient = int.from_bytes(self.buf[4 + PIXELS * 2: 6 + PIXELS * 2], "little", signed=True) / 100.0
            del self.buf[:FRAME_LEN]
            self._synced, self._rejected, self._since_bad = True, False, FRAME_LEN
            pixels = np.frombuffer(raw, dtype="<i2").astype(np.float32).reshape(ROWS, COLS)
            pixels *= np.float32(0.01)
            dead = self._dead.repair(pixels)
            self.dead_pixels += dead
            self.frames += 1
            return ThermalFrame(pixels, ambient, dead, raw)


@runtime_checkable
class ThermalSource(Protocol):
    """A thermal camera driver: it yields rd.ThermalFrame (float32 (H, W) °C, any H x W), which is
    what the gate app consumes. The MLX90640 driver below is one; so is camera-opencv with `y16: true`
    (a FLIR Lepton 3.5 over UVC, read with OpenCV, CAP_PROP_CONVERT_RGB off)."""

    role: str
    stats: DriverStats

    def open(self) -> None: ...

    def read(self) -> rd.Reading | None: ...

    def close(self) -> None: ...


class Mlx90640Config(SerialPortConfig):
    driver: Literal["mlx90640-serial"] = "mlx90640-serial"
    baudrate: int = Field(460800, gt=0, description="460800 for 8 Hz; 115200 caps the module near 7 frames/s")
    rate_hz: float = Field(8.0, description="refresh rate sent to the module on open: 0.5, 1, 2, 4 or 8")
    rate_window_s: float = Field(10.0, gt=0, le=3600,
                                 description="frames are counted over this window and compared with rate_hz")
    checksum: Literal["sum16", "none"] = Field(
        "sum16", description="frame checksum rule: 16-bit sum of the preceding words, or none")
    frozen_after: int = Field(16, ge=2, description="this many identical frames in a row: the sensor is frozen")
    send_commands: bool = Field(True, description="send 'rate' and 'automatic output' on open")
    silent_after_s: float = Field(3.0, gt=0, description="no valid frame for this long is a fault")

    @field_validator("rate_hz")
    @classmethod
    def _rate(cls, v: float) -> float:
        if float(v) not in RATE_ARGS:
            raise ValueError(f"rate_hz must be one of {', '.join(f'{r:g}' for r in sorted(RATE_ARGS))}")
        return float(v)


class Mlx90640Serial(StreamSerialDriver):
    """Yields rd.ThermalFrame (float32 24x32 °C, ambient_c, dead_pixels)."""

    Config = Mlx90640Config
    PRODUCES = (rd.ThermalFrame,)
    config: Mlx90640Config
    parser: Mlx90640Parser

    def __init__(self, role: str, config: Mlx90640Config) -> None:
        super().__init__(role, config)
        self.parser = Mlx90640Parser(self.config.checksum)  # counters accumulate across reopens
        self._recent: deque[bytes] = deque(maxlen=2)
        self._same = 0
        self._window_t0: float | None = None  # the frame rate window: its first frame's time
        self._window_frames = 0
        self._rate_reported = False
        for key in ("rate_low", "rate_high", "frame_rate_mhz"):
            self.stats.extra[key] = 0

    def open(self) -> None:
        self.parser._synced = False
        self._recent.clear()
        self._same = 0
        self._window_t0 = None
        super().open()

    def _on_open(self, port: serial.SerialBase) -> None:
        if not self.config.send_commands:
            return
        try:
            port.write(command(CMD_RATE, RATE_ARGS[float(self.config.rate_hz)]))
            port.write(command(CMD_MODE, MODE_AUTO))
            port.flush()
        except (serial.SerialException, OSError) as exc:
            raise self._io_fault(exc, "cannot send start-up commands") from exc

    def _next(self) -> rd.ThermalFrame | None:
        frame = self.parser.next()
        p = self.parser
        self.stats.frames, self.stats.corrupt = p.frames, p.corrupt
        self.stats.extra["resyncs"] = p.resyncs
        self.stats.extra["dead_pixels"] = p.dead_pixels
        if frame is None:
            return None
        self._count_rate()
        if self._recent and frame.raw == self._recent[-1]:
            self._same += 1
        else:
            self._same = 1
        self._recent.append(frame.raw)
        if self._same >= self.config.frozen_after:
            self._same = 0
            self.stats.faults += 1
            self.stats.extra["frozen"] = self.stats.extra.get("frozen", 0) + 1
            raise DriverFault(f"{self.role}: sensor frozen: {self.config.frozen_after} identical frames in a row")
        return rd.ThermalFrame(source=self.role, pixels=frame.pixels, ambient_c=frame.ambient_c,
                               dead_pixels=frame.dead)

    def _count_rate(self) -> None:
        """One more valid frame: at the end of each window compare the frames per second with rate_hz."""
        now = time.monotonic()
        if self._window_t0 is None:
            self._window_t0, self._window_frames = now, 0
            return
        self._window_frames += 1
        elapsed = now - self._window_t0
        if elapsed < self.config.rate_window_s:
            return
        hz = self._window_frames / elapsed
        self._window_t0, self._window_frames = now, 0
        self.stats.extra["frame_rate_mhz"] = round(hz * 1000)
        want = self.config.rate_hz
        if hz > want / RATE_TOLERANCE:
            self.stats.extra["rate_high"] += 1
        if hz >= RATE_TOLERANCE * want:
            return
        self.stats.extra["rate_low"] += 1
        if not self._rate_reported:
            self._rate_reported = True
            self.stats.faults += 1
            raise DriverFault(
                f"{self.role}: {hz:.2f} frames/s over {elapsed:.0f} s, configured rate_hz {want:g}: check the "
                f"module's refresh rate (sent on open unless send_commands is off) and the baud rate "
                f"({self.config.baudrate}; 115200 carries at most ~7 frames/s, 8 Hz needs 460800)")
