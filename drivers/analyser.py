"""Cross-belt elemental analyser (PGNAA / XRF) result stream over TCP.

The analyser is a TCP server; it pushes one result block per analysis interval (one minute) and a
status line every few seconds. The format (ASCII, lines end CR LF) is documented in
docs/ore-station.md; in short:

  $RESULT,<seq>,<ISO 8601 time with Z or an offset>,<interval_s>,<tonnes>,<status OK|NOLOAD|FAULT>
  $ASSAY,Fe=62.31,SiO2=4.12,Al2O3=2.05,P=0.071,S=0.012,H2O=7.90[,<other element or oxide>=<%>...]
  $SPEC,<channels>,<live_time_s>,<kev_per_channel>,<offset_kev>
  $CH,<first channel>,<count>,...            (64 counts per line, channels/64 lines)
  $END,<CRC-32 of every byte from '$RESULT' to the LF before '$END', 8 hex digits, either case>
  $STAT,<ISO 8601 time>,<state>,<detector temperature °C>

Lenient where the format allows: an element beyond the six is kept (Assay.extra, by its name), a time
may carry an offset (+08:00) and fractional seconds (converted to UTC), the CRC may be lower-case hex.
Strict where it matters: everything between $RESULT and $END is one block, and any line out of place,
a missing field, a time without a zone, an element twice, a count that is not an integer, a missing
channel or a CRC mismatch drops the whole block (stats.corrupt += 1) and the parser waits for the next
$RESULT. The driver opens the analyser with serial_for_url('socket://host:port').

Readings: Analysis (seq, status, analysed_at, interval_s, tonnes, the analyser's own Assay as
fe/sio2/al2o3/p/s/h2o, and the Spectrum: float32 counts per channel, live_time_s, kev_per_channel,
offset_kev) and AnalyserStatus (state, detector_c).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import numpy as np
from pydantic import Field

from customs_edge.core import readings as rd
from customs_edge.core.records import Scalar
from customs_edge.drivers.base import SerialPortConfig, StreamSerialDriver

EOL = b"\r\n"
PER_LINE = 64
ASSAY_KEYS = {"Fe": "fe", "SiO2": "sio2", "Al2O3": "al2o3", "P": "p", "S": "s", "H2O": "h2o"}
STATES = ("OK", "NOLOAD", "FAULT")
# Field widths are bounded: a well-formed block (its CRC-32 guards transmission, not intent) with a
# 5,000-digit number must be refused as corrupt, not raise inside int() or float().
_NUM = r"-?\d{1,9}(?:\.\d{1,9})?"
_COUNT = re.compile(r"^\d{1,9}$")
# ISO 8601 as the stream writes it: date T time, optional fraction, Z or an offset (a zone is required)
_ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)"
_RESULT = re.compile(rf"^\$RESULT,(\d{{1,12}}),({_ISO}),({_NUM}),({_NUM}),(OK|NOLOAD|FAULT)$")
_SPEC = re.compile(rf"^\$SPEC,(\d{{1,6}}),({_NUM}),({_NUM}),({_NUM})$")
_END = re.compile(r"^\$END,([0-9A-Fa-f]{8})$")
_STAT = re.compile(rf"^\$STAT,({_ISO}),([A-Z]+),({_NUM})$")
_ELEMENT = re.compile(r"^[A-Z][A-Za-z0-9]{0,15}$")  # an element or oxide: Mn, CaO, Fe2O3


@dataclass
class AnalyserResult:
    seq: int
    ts: float  # the analyser's own UTC timestamp
    interval_s: float
    tonnes: float
    status: str
    assays: dict[str, float]  # by the analyser's names: Fe, SiO2, ... and any other element it sent
    live_time_s: float
    kev_per_channel: float
    offset_kev: float
    counts: np.ndarray  # float32 [channels]

    def values(self) -> dict[str, Scalar]:
        v: dict[str, Scalar] = {"seq": self.seq, "status": self.status, "interval_s": self.interval_s,
                                "tonnes": self.tonnes, "live_time_s": self.live_time_s,
                                "kev_per_channel": self.kev_per_channel, "offset_kev": self.offset_kev,
                                "analyser_ts": self.ts}
        v.update({ASSAY_KEYS.get(k, k): x for k, x in self.assays.items()})
        return v

    def reading(self, source: str) -> rd.Analysis:
        return rd.Analysis(
            source=source, seq=self.seq, status=self.status, analysed_at=self.ts, interval_s=self.interval_s,
            tonnes=self.tonnes, assay=assay_of(self.assays),
            spectrum=rd.Spectrum(self.counts, self.live_time_s, self.kev_per_channel, self.offset_kev))


def assay_of(assays: dict[str, float]) -> rd.Assay:
    """The six named fields by the analyser's names (Fe, SiO2, ...), every other element in `extra`."""
    return rd.Assay(**{ASSAY_KEYS[k]: x for k, x in assays.items() if k in ASSAY_KEYS},
                    extra={k: x for k, x in assays.items() if k not in ASSAY_KEYS})


@dataclass
class AnalyserStatus:
    ts: float
    state: str
    detector_c: float


def _utc(text: str) -> float | None:
    """An ISO 8601 time with Z or an offset (fractional seconds allowed) in UTC unix seconds; None
    when it is not one or has no zone."""
    try:
        t = datetime.fromisoformat(text)
        return t.astimezone(UTC).timestamp() if t.tzinfo is not None else None
    except (ValueError, OverflowError):
        return None


def encode_result(r: AnalyserResult) -> bytes:
    """The block as the analyser sends it (the driver's round-trip tests; the simulator has its own)."""
    when = datetime.fromtimestamp(r.ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"$RESULT,{r.seq},{when},{r.interval_s:.1f},{r.tonnes:.2f},{r.status}",
             "$ASSAY," + ",".join(f"{k}={r.assays[k]:.3f}" for k in sorted(r.assays, key=_order)),
             f"$SPEC,{len(r.counts)},{r.live_time_s:.2f},{r.kev_per_channel:.5f},{r.offset_kev:.3f}"]
    counts = np.asarray(r.counts).astype(np.int64)
    for start in range(0, len(counts), PER_LINE):
        lines.append(f"$CH,{start}," + ",".join(map(str, counts[start:start + PER_LINE].tolist())))
    body = "".join(line + "\r\n" for line in lines).encode("ascii")
    return body + f"$END,{zlib.crc32(body):08X}".encode() + EOL


def _order(name: str) -> tuple[int, str]:
    """The six in the documented order, then other elements by name."""
    return (list(ASSAY_KEYS).index(name), "") if name in ASSAY_KEYS else (len(ASSAY_KEYS), name)


def encode_status(ts: float, state: str, detector_c: float) -> bytes:
    when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"$STAT,{when},{state},{detector_c:.1f}".encode() + EOL


@dataclass
class AnalyserParser:
    """Incremental line parser; `next()` returns the next complete AnalyserResult or AnalyserStatus."""

    max_line: int = 4096
    frames: int = 0
    corrupt: int = 0
    buf: bytearray = field(default_factory=bytearray)
    _block: list[bytes] | None = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.max_line and EOL not in self.buf[-self.max_line - 2:]:
            self._bad()  # a flood without line ends: drop it
            self.buf.clear()

    def _bad(self) -> None:
        self.corrupt += 1
        self._block = None

    def next(self) -> AnalyserResult | AnalyserStatus | None:
        while True:
            end = self.buf.find(EOL)
            if end < 0:
                return None
            raw = bytes(self.buf[: end + 2])
            del self.buf[: end + 2]
            line = raw[:-2]
            cut = line.rfind(b"$")
            if cut > 0:  # a line that lost its end ran into the next one: keep the last part
                self._bad()
                line, raw = line[cut:], raw[cut:]
            if line.startswith(b"$RESULT,"):
                if self._block is not None:
                    self._bad()  # the previous block never ended
                self._block = [raw]
                continue
            if line.startswith(b"$STAT,"):
                status = self._status(line)
                if status is not None:
                    self.frames += 1
                    return status
                self.corrupt += 1
                continue
            if self._block is None:
                if line:
                    self.corrupt += 1  # the tail of a damaged block, or noise
                continue
            if line.startswith(b"$END,"):
                block, self._block = self._block, None
                result = self._result(block, line)
                if result is None:
                    self.corrupt += 1
                    continue
                self.frames += 1
                return result
            self._block.append(raw)
            if len(self._block) > 4 + 65536 // PER_LINE:
                self._bad()

    @staticmethod
    def _status(line: bytes) -> AnalyserStatus | None:
        m = _STAT.match(line.decode("ascii", "replace"))
        ts = _utc(m.group(1)) if m else None
        if m is None or ts is None:
            return None
        return AnalyserStatus(ts, m.group(2), float(m.group(3)))

    @staticmethod
    def _result(block: list[bytes], end: bytes) -> AnalyserResult | None:
        m_end = _END.match(end.decode("ascii", "replace"))
        if m_end is None or int(m_end.group(1), 16) != zlib.crc32(b"".join(block)):
            return None
        try:
            text = [b.decode("ascii")[:-2] for b in block]
        except UnicodeDecodeError:
            return None
        if len(text) < 3:
            return None
        m = _RESULT.match(text[0])
        spec = _SPEC.match(text[2])
        ts = _utc(m.group(2)) if m else None
        if m is None or spec is None or ts is None or not text[1].startswith("$ASSAY,"):
            return None
        assays: dict[str, float] = {}
        listed = text[1][7:]
        for item in listed.split(",") if listed else []:  # NOLOAD results carry no assays
            key, _, val = item.partition("=")
            if not _ELEMENT.match(key) or key in assays:
                return None
            if not re.fullmatch(_NUM, val):  # no nan, inf or exponent: an assay is a plain percentage
                return None
            assays[key] = float(val)
        channels = int(spec.group(1))
        lines = text[3:]
        if channels <= 0 or len(lines) != (channels + PER_LINE - 1) // PER_LINE:
            return None
        counts = np.empty(channels, dtype=np.float32)
        for i, ln in enumerate(lines):
            parts = ln.split(",")
            start = i * PER_LINE
            n = min(PER_LINE, channels - start)
            if parts[0] != "$CH" or len(parts) != n + 2 or parts[1] != str(start):
                return None
            if not all(_COUNT.match(p) for p in parts[2:]):
                return None
            counts[start:start + n] = [int(p) for p in parts[2:]]
        return AnalyserResult(seq=int(m.group(1)), ts=ts, interval_s=float(m.group(3)),
                              tonnes=float(m.group(4)), status=m.group(5), assays=assays,
                              live_time_s=float(spec.group(2)), kev_per_channel=float(spec.group(3)),
                              offset_kev=float(spec.group(4)), counts=counts)


class AnalyserConfig(SerialPortConfig):
    driver: Literal["elemental-analyser"] = "elemental-analyser"
    port: str = Field(min_length=1, description="socket://host:port of the analyser's result server")
    channels: int = Field(1024, gt=0, description="spectrum channels expected; other sizes are refused")
    read_timeout_s: float = Field(0.5, gt=0, le=10)
    silent_after_s: float = Field(30.0, gt=0, description="the analyser sends $STAT every few seconds")


class ElementalAnalyser(StreamSerialDriver):
    Config = AnalyserConfig
    PRODUCES = (rd.Analysis, rd.AnalyserStatus)
    config: AnalyserConfig
    parser: AnalyserParser

    def __init__(self, role: str, config: AnalyserConfig) -> None:
        super().__init__(role, config)
        self.parser = AnalyserParser()
        self.stats.extra["wrong_size"] = 0

    def _next(self) -> rd.Analysis | rd.AnalyserStatus | None:
        while True:
            item = self.parser.next()
            self.stats.frames, self.stats.corrupt = self.parser.frames, self.parser.corrupt
            if item is None:
                return None
            self._watch.reset()
            if isinstance(item, AnalyserStatus):
                return rd.AnalyserStatus(source=self.role, state=item.state, detector_c=item.detector_c)
            if len(item.counts) != self.config.channels:
                self.stats.extra["wrong_size"] += 1
                continue
            return item.reading(self.role)

