"""Mettler-Toledo *continuous output* (IND245/IND445 and compatible indicators).

Frame: STX, SWA, SWB, SWC, 6 weight digits, 6 tare digits, CR, and an optional checksum byte
(-(sum of the 17 preceding bytes)) & 0x7F. 18 bytes with it, 17 without: the indicator's setting.
Digits are right-aligned, space-padded, with no sign and no decimal point; both live in the status
bytes (see ../shared/PROTOCOLS.md). Status bytes A and C have bit 5 set and bit 6 clear; status B's
bit 6 is "power-up, not zeroed" (Mettler-Toledo Wildcat user's manual, table 6-10): a valid frame,
flagged `power_up_not_zeroed`. Status B bit 2 (out of range, over capacity) is flagged `out_of_range`:
its digits are not a weight. The parser resynchronises on the next STX after a bad frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from customs_edge.core.readings import Weight
from customs_edge.drivers.base import SerialPortConfig, StreamSerialDriver

STX, CR = 0x02, 0x0D
BODY = 17  # STX .. CR inclusive
# SWA bits 0-2 -> power of ten applied to the digits: 0 = XXXX00 ... 7 = X.XXXXX
DECIMALS = {0: 2, 1: 1, 2: 0, 3: -1, 4: -2, 5: -3, 6: -4, 7: -5}
INCREMENTS = {1: 1, 2: 2, 3: 5}
OTHER_UNITS = {1: "g", 2: "t", 3: "oz", 6: "ton", 7: "N"}


@dataclass(frozen=True, slots=True)
class ScaleFrame:
    weight: float  # signed, in `unit`; the displayed value (net when `net`, else gross)
    tare: float
    unit: str
    net: bool
    motion: bool
    out_of_range: bool  # over or under the indicator's range: the digits are not a weight
    power_up_not_zeroed: bool  # powered up and the zero not yet captured
    increment: int
    decimals: int  # digits after the point (0 for XXXXX0 style)
    checksum: bool  # the frame carried a checksum byte

    def values(self) -> dict[str, float | int | str | bool | None]:
        return {"weight": self.weight, "tare": self.tare, "unit": self.unit, "net": self.net,
                "motion": self.motion, "out_of_range": self.out_of_range,
                "power_up_not_zeroed": self.power_up_not_zeroed}


def checksum(body: bytes) -> int:
    return (-sum(body)) & 0x7F


def _digits(field: bytes) -> int | None:
    text = field.decode("ascii", "replace").strip()
    if not text:
        return 0
    if not text.isdigit() or len(text) != len(text.strip()):
        return None
    return int(text)


def decode(body: bytes, with_checksum: bool) -> ScaleFrame | None:
    """Decode one 17-byte body (STX..CR). None when any field is out of the protocol."""
    if len(body) != BODY or body[0] != STX or body[16] != CR:
        return None
    swa, swb, swc = body[1], body[2], body[3]
    if any(b & 0xE0 != 0x20 for b in (swa, swc)) or swb & 0xA0 != 0x20:  # bit 5 set, bit 7 clear,
        return None  # bit 6 clear except in status B (power-up, not zeroed)
    if any(c not in b" 0123456789" for c in body[4:16]):
        return None
    w, t = _digits(body[4:10]), _digits(body[10:16])
    if w is None or t is None:
        return None
    power = DECIMALS[swa & 0x07]
    inc = INCREMENTS.get((swa >> 3) & 0x03)
    if inc is None:
        return None
    scale = 10.0 ** power
    sign = -1.0 if swb & 0x02 else 1.0
    unit = OTHER_UNITS.get(swc & 0x07) or ("kg" if swb & 0x10 else "lb")
    dec = max(0, -power)
    return ScaleFrame(
        weight=round(sign * w * scale, dec), tare=round(t * scale, dec), unit=unit,
        net=bool(swb & 0x01), motion=bool(swb & 0x08), out_of_range=bool(swb & 0x04),
        power_up_not_zeroed=bool(swb & 0x40), increment=inc, decimals=dec, checksum=with_checksum,
    )


def encode(weight: float, tare: float = 0.0, *, decimals: int = 2, unit: str = "kg", net: bool = False,
           motion: bool = False, out_of_range: bool = False, increment: int = 1,
           with_checksum: bool = True) -> bytes:
    """Build a frame as an indicator sends it (round-trip tests, benches; the simulator has its own)."""
    power = -decimals if decimals > 0 else 0
    swa_dp = {v: k for k, v in DECIMALS.items()}[power]
    swa = 0x20 | swa_dp | ({v: k for k, v in INCREMENTS.items()}[increment] << 3)
    swb = 0x20 | (0x01 if net else 0) | (0x02 if weight < 0 else 0) | (0x04 if out_of_range else 0) \
        | (0x08 if motion else 0) | (0x10 if unit == "kg" else 0)
    other = {v: k for k, v in OTHER_UNITS.items()}
    swc = 0x20 | other.get(unit, 0)
    factor = 10 ** decimals
    wd, td = round(abs(weight) * factor), round(abs(tare) * factor)
    if wd > 999_999 or td > 999_999:
        raise ValueError("weight does not fit in 6 digits at this resolution")
    body = bytes([STX, swa, swb, swc]) + f"{wd:>6d}{td:>6d}".encode() + bytes([CR])
    return body + bytes([checksum(body)]) if with_checksum else body


class ToledoParser:
    """Incremental parser. `mode`: 'auto' detects whether frames carry a checksum byte (by looking at
    the byte after CR and the STX that must follow) and latches after three consistent frames; it
    unlatches after eight corrupt frames in a row, in case the indicator was reconfigured.
    'on'/'off' force the setting (a wrong forced setting shows up as corrupt frames)."""

    LATCH = 3
    UNLATCH = 8

    def __init__(self, mode: Literal["auto", "on", "off"] = "auto", max_buffer: int = 1 << 17) -> None:
        self.auto = mode == "auto"
        self.mode = mode
        self.buf = bytearray()
        self.frames = 0
        self.corrupt = 0
        self.max_buffer = max_buffer
        self._votes = {True: 0, False: 0}
        self._bad_run = 0

    def feed(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.max_buffer:  # a flood with no valid frame: keep only the tail
            self._bad()
            del self.buf[: len(self.buf) - BODY - 2]

    def _bad(self) -> None:
        self.corrupt += 1
        self._bad_run += 1
        if self.auto and self.mode != "auto" and self._bad_run >= self.UNLATCH:
            self.mode, self._votes = "auto", {True: 0, False: 0}

    def next(self) -> ScaleFrame | None:
        buf = self.buf
        while True:
            start = buf.find(STX)
            if start < 0:
                if buf:
                    self._bad()
                    buf.clear()
                return None
            if start:
                self._bad()  # bytes before STX: the tail of a garbled frame
                del buf[:start]
            if len(buf) < BODY:
                return None
            body = bytes(buf[:BODY])
            has_sum: bool | None
            if self.mode == "auto":
                if len(buf) < BODY + 2:
                    return None
                if buf[17] == checksum(body) and buf[18] == STX:
                    has_sum = True
                elif buf[17] == STX:
                    has_sum = False
                else:
                    has_sum = None
            else:
                has_sum = self.mode == "on"
                if has_sum and len(buf) < BODY + 1:
                    return None
            frame = decode(body, bool(has_sum)) if has_sum is not None else None
            if frame is None or (has_sum and buf[17] != checksum(body)):
                self._bad()  # one count per bad frame; resynchronise on the next STX
                nxt = buf.find(STX, 1)
                del buf[: nxt if nxt > 0 else len(buf)]
                continue
            del buf[: BODY + (1 if has_sum else 0)]
            self.frames += 1
            self._bad_run = 0
            if self.mode == "auto":
                self._votes[bool(has_sum)] += 1
                if self._votes[bool(has_sum)] >= self.LATCH and not self._votes[not has_sum]:
                    self.mode = "on" if has_sum else "off"
            return frame


class ToledoConfig(SerialPortConfig):
    driver: Literal["toledo-continuous"] = "toledo-continuous"
    checksum: Literal["auto", "on", "off"] = Field(
        "auto", description="indicator sends a checksum byte after CR; auto detects it")


class ToledoContinuous(StreamSerialDriver):
    """Weighing indicator in continuous-output mode. Yields Weight."""

    Config = ToledoConfig
    PRODUCES = (Weight,)
    config: ToledoConfig
    parser: ToledoParser

    def __init__(self, role: str, config: ToledoConfig) -> None:
        super().__init__(role, config)
        self.parser = ToledoParser(self.config.checksum)  # counters accumulate across reopens

    def _next(self) -> Weight | None:
        frame = self.parser.next()
        self.stats.frames, self.stats.corrupt = self.parser.frames, self.parser.corrupt
        if frame is None:
            return None
        over = frame.out_of_range  # SWB bit 2 is over capacity or under zero: the sign tells which
        return Weight(source=self.role, value=frame.weight, unit=frame.unit, stable=not frame.motion, net=frame.net,
                      tare=frame.tare, overload=over and frame.weight >= 0, underload=over and frame.weight < 0,
                      not_zeroed=frame.power_up_not_zeroed)
