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
fe/sio2/al2o3/p/s/h2o plus any other element, and the Spectrum: float32 counts per channel,
live_time_s, kev_per_channel, offset_kev) and AnalyserStatus (state, detector_c).

Result files (port dir:///path): the vendor's software (the analyser's server or PC) writes result
files into a directory, CSV (one result per row under a header row) or XML (one result per element
that carries a time: its attributes and its leaf children are the fields, a child's `name` attribute
naming it when there is one: <Element name="Fe">62.1</Element>). Files are picked up once settled,
read once and remembered across restarts (drivers/dropdir.py, as the N42 portal driver does). A file
the software appends to (a daily export) is read again when it changed: the results handed from it
before (their number is remembered with the file) are skipped, so each result is taken once.
`columns` maps the vendor's names (matched without case, spaces/underscores alike, a unit in brackets
dropped: "Fe (%)" is "fe") to fe, sio2, al2o3, p, s, h2o, timestamp, tonnes, tph (the belt rate:
tonnes = tph x interval when no tonnes column), sample_id, status, interval_s, seq, or "" to ignore a
column; it extends a default that knows the usual names. Any other
column whose name is an element or oxide (Mn, CaO, Fe2O3) and whose value is a number is kept in
Assay.extra. Units in the name: % / wt% as they are, ppm divided by 10,000; kg for the tonnes column.
Strict where it matters: a row without a time or tonnes, a time without a zone (unless `timezone`
names the analyser PC's zone), a cell of an element that is not a number, a status other than
OK/NOLOAD/FAULT, is refused and counted corrupt (`last_error` says why and what to map); a file
that is neither is counted corrupt. Result files carry no spectrum: Analysis.spectrum is None, the ore
app records the analyser's own assay.
"""

from __future__ import annotations

import csv
import math
import re
import time
import xml.etree.ElementTree as ET
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np
from pydantic import Field, field_validator

from customs_edge.core import readings as rd
from customs_edge.core.records import Scalar
from customs_edge.drivers.base import SerialPortConfig, StreamSerialDriver
from customs_edge.drivers.dropdir import DropDir, drop_path

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
_SYMBOLS = ("He Li Be Ne Na Mg Al Si Cl Ar Ca Sc Ti Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb Sr Zr Nb Mo "
            "Tc Ru Rh Pd Ag Cd In Sn Sb Te Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta Re "
            "Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa Np Pu H B C N O F P S K V Y I W U")
# an element or oxide as chemists write it: Mn, CaO, Fe2O3, H2O (not Tph, Load or Ash)
_ELEMENT = re.compile(rf"^(?:(?:{_SYMBOLS.replace(' ', '|')})\d{{0,2}}){{1,6}}$")


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


# --- result files ------------------------------------------------------------------------------
TARGETS = (*ASSAY_KEYS.values(), "timestamp", "tonnes", "tph", "sample_id", "status", "interval_s", "seq")
# the usual names of vendors' exports (see tests/fixtures/analyser/README.txt), normalised
DEFAULT_COLUMNS = {
    **{k.lower(): v for k, v in ASSAY_KEYS.items()}, "moisture": "h2o", "h2o total": "h2o",
    "timestamp": "timestamp", "time": "timestamp", "date time": "timestamp", "datetime": "timestamp",
    "end time": "timestamp", "result time": "timestamp", "tonnes": "tonnes", "tons": "tonnes",
    "mass": "tonnes", "interval tonnes": "tonnes", "tph": "tph", "rate": "tph", "sample id": "sample_id",
    "sampleid": "sample_id", "sample": "sample_id", "result id": "sample_id", "status": "status",
    "interval s": "interval_s", "duration s": "interval_s", "seq": "seq"}
_UNIT = re.compile(r"^(.*?)\s*[(\[]\s*([^)\]]*?)\s*[)\]]\s*$")
_ELEMENT_SCALE = {"": 1.0, "%": 1.0, "wt%": 1.0, "wt %": 1.0, "pct": 1.0, "ppm": 1e-4}
_TONNES_SCALE = {"": 1.0, "t": 1.0, "tonnes": 1.0, "kg": 1e-3}


def split_unit(name: str) -> tuple[str, str]:
    """(the name without a unit in brackets, the unit in lower case): "Fe (%)" -> ("Fe", "%")."""
    m = _UNIT.match(name.strip())
    return (m.group(1), m.group(2).lower()) if m else (name.strip(), "")


def normalise(name: str) -> str:
    """A column name as `columns` matches it: no unit, lower case, spaces and underscores as one space."""
    return " ".join(split_unit(name)[0].replace("_", " ").lower().split())


class ResultFileError(ValueError):
    """A file that cannot be read as a result file; the message says why and what to configure."""


class ResultFileReader:
    """Turns a vendor's result file (CSV or XML) into Analysis readings. A row that cannot be a result
    is refused (`refused` += 1, `last_error` says why); a whole file that cannot be raises ResultFileError."""

    def __init__(self, source: str, columns: Mapping[str, str], *, timezone: str | None = None,
                 time_format: str | None = None, delimiter: str | None = None, decimal_comma: bool = False,
                 interval_s: float = 60.0) -> None:
        self.source = source
        self.columns = {**DEFAULT_COLUMNS, **{normalise(k): v for k, v in columns.items()}}
        self.tz = ZoneInfo(timezone) if timezone else None
        self.time_format, self.delimiter, self.decimal_comma = time_format, delimiter, decimal_comma
        self.interval_s = interval_s
        self.refused = 0
        self.last_error: str | None = None
        self.count = 0  # results read: the seq of a result without one

    def parse(self, name: str, data: bytes) -> list[rd.Analysis]:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("cp1252", "replace")  # the analyser PC's Windows code page
        records = self._xml(data) if text.lstrip().startswith("<") else self._csv(text)
        out = []
        for i, rec in enumerate(records, 1):
            try:
                out.append(self._analysis(rec))
            except (ResultFileError, rd.ReadingError) as exc:
                self.refused += 1
                self.last_error = f"{name} result {i}: {exc}"
        return out

    # --- records: (vendor name, value) pairs of one result --------------------------------------
    def _target(self, name: str) -> str | None:
        return self.columns.get(normalise(name))

    def _csv(self, text: str) -> Iterator[list[tuple[str, str]]]:
        header: list[str] | None = None
        delim, at = self.delimiter, 0
        for line in text.splitlines():
            d = delim or max((",", ";", "\t"), key=line.count)  # before the header: each line's own
            row = next(csv.reader([line], delimiter=d), [])
            if header is None:
                at = next((i for i, c in enumerate(row) if self._target(c) == "timestamp"), -1)
                if at >= 0:  # lines before it: the export's title, site, period
                    header, delim = row, d  # the header's delimiter is the file's (, ; or tab)
                continue
            if len(row) > at and row[at].strip():  # no time: a units, blank or totals line, not a result
                yield list(zip(header, row, strict=False))
        if header is None:
            raise ResultFileError(f"no header row with a time column (map the vendor's time column to "
                                  f"'timestamp' in `columns`; known: {', '.join(sorted(self.columns))})")

    def _xml(self, data: bytes) -> list[list[tuple[str, str]]]:
        try:
            root = SafeET.fromstring(data, forbid_dtd=True)
        except (ET.ParseError, defusedxml.DefusedXmlException, ValueError) as exc:
            raise ResultFileError(f"refused XML: {type(exc).__name__}: {exc}") from exc
        out = []
        for el in root.iter():
            fields = [(_local(k), v) for k, v in el.attrib.items()]
            for child in el:
                if len(child) == 0:
                    key = child.get("name") or child.get("element") or _local(child.tag)
                    unit = child.get("unit") or child.get("units")
                    fields.append((f"{key} ({unit})" if unit else key,
                                   (child.text or child.get("value") or "").strip()))
            if any(self._target(k) == "timestamp" for k, _ in fields):
                out.append(fields)
        if not out:
            raise ResultFileError("no element with a time (map the vendor's time element or attribute to "
                                  "'timestamp' in `columns`)")
        return out

    # --- one result -------------------------------------------------------------------------------
    def _analysis(self, rec: list[tuple[str, str]]) -> rd.Analysis:
        got: dict[str, str] = {}
        assays: dict[str, float] = {}
        tonnes_scale = 1.0
        for name, raw in rec:
            value = raw.strip()
            target = self._target(name)
            base, unit = split_unit(name)
            if target == "tonnes":
                if unit not in _TONNES_SCALE:
                    raise ResultFileError(f"column {name!r}: unit {unit!r} is not t or kg")
                tonnes_scale = _TONNES_SCALE[unit]
            if target in ASSAY_KEYS.values() or (target is None and _ELEMENT.match(base)):
                element = base if target is None else target
                if not value or (target is None and self._number(value) is None):
                    continue  # not reported; an unmapped column that holds no number is not an element
                if unit not in _ELEMENT_SCALE:
                    raise ResultFileError(f"column {name!r}: unit {unit!r} is not %, wt% or ppm")
                x = self._number(value)
                if x is None:
                    raise ResultFileError(f"{name} = {value!r} is not a number")
                assays[element] = x * _ELEMENT_SCALE[unit]
            elif target:
                got[target] = value
        when = got.get("timestamp") or ""
        if not when:
            raise ResultFileError("no time (map the vendor's time column to 'timestamp')")
        interval = self._number(got["interval_s"]) if got.get("interval_s") else self.interval_s
        if interval is None:
            raise ResultFileError(f"interval {got['interval_s']!r} is not a number of seconds")
        tph = self._number(got.get("tph", "")) if "tonnes" not in got else None
        tonnes = tph * interval / 3600 if tph is not None else self._number(got.get("tonnes", ""))
        if tonnes is None:
            raise ResultFileError(f"tonnes {got.get('tonnes')!r} is not a number (map the vendor's interval "
                                  "tonnes column to 'tonnes', or its belt rate to 'tph')")
        status = (got.get("status") or "OK").upper()
        if status not in rd.Analysis.STATUSES:
            raise ResultFileError(f"status {status!r} is not one of {', '.join(rd.Analysis.STATUSES)}")
        analysed_at = self._time(when)
        self.count += 1
        sample = got.get("sample_id") or None
        seq_text = got.get("seq") or (sample if sample and sample.isdigit() and len(sample) < 13 else "")
        seq = int(seq_text) if seq_text.isdigit() and len(seq_text) < 13 else self.count
        fixed = {k: x for k, x in assays.items() if k in ASSAY_KEYS.values()}
        return rd.Analysis(source=self.source, seq=seq, status=status, analysed_at=analysed_at,
                           interval_s=interval, tonnes=tonnes * tonnes_scale, sample_id=sample,
                           assay=rd.Assay(**fixed, extra={k: x for k, x in assays.items() if k not in fixed}))

    def _number(self, text: str) -> float | None:
        t = text.strip()
        if self.decimal_comma:
            t = t.replace(".", "").replace(",", ".")
        if not re.fullmatch(r"[-+]?\d{1,12}(?:\.\d{0,12})?|[-+]?\.\d{1,12}", t):
            return None  # no nan, inf or exponent; bounded
        x = float(t)
        return x if math.isfinite(x) else None

    def _time(self, text: str) -> float:
        if len(text) > 64:
            raise ResultFileError(f"time {text[:64]!r}... is too long")
        try:
            t = (datetime.strptime(text, self.time_format) if self.time_format
                 else datetime.fromisoformat(text.replace("/", "-")))
        except ValueError as exc:
            hint = "set `time_format`" if not self.time_format else "check `time_format`"
            raise ResultFileError(f"time {text!r}: {exc} ({hint})") from exc
        if t.tzinfo is None:
            if self.tz is None:
                raise ResultFileError(f"time {text!r} has no zone: set `timezone` to the analyser PC's "
                                      "zone (e.g. Australia/Perth) or have it export an offset")
            t = t.replace(tzinfo=self.tz)
        try:
            return t.astimezone(UTC).timestamp()
        except OverflowError as exc:
            raise ResultFileError(f"time {text!r}: {exc}") from exc


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class AnalyserConfig(SerialPortConfig):
    driver: Literal["elemental-analyser"] = "elemental-analyser"
    port: str = Field(min_length=1, description="socket://host:port of the analyser's result server, or "
                      "dir:///path where the vendor's software writes result files (CSV or XML)")
    channels: int = Field(1024, gt=0, description="spectrum channels expected; other sizes are refused")
    read_timeout_s: float = Field(0.5, gt=0, le=10)
    silent_after_s: float = Field(30.0, gt=0, description="the analyser sends $STAT every few seconds")
    # result files (dir://)
    patterns: list[str] = Field(default_factory=lambda: ["*.csv", "*.CSV", "*.xml", "*.XML"], min_length=1)
    settle_s: float = Field(2.0, ge=0, description="dir: a file is read once unchanged for this long")
    seen_file: Path | None = Field(None, description="dir: where read files are remembered")
    max_file_bytes: int = Field(16 << 20, ge=1024, le=1 << 30)
    columns: dict[str, str] = Field(default_factory=dict, description="vendor's column name -> one of "
                                    + ", ".join(TARGETS) + " or '' to ignore it (extends the default)")
    timezone: str | None = Field(None, description="IANA zone of times the files write without an offset")
    time_format: str | None = Field(None, description="strptime format when times are not ISO 8601")
    delimiter: str | None = Field(None, max_length=1, description="CSV delimiter; None: , ; or tab, as the header has")
    decimal_comma: bool = False
    interval_s: float = Field(60.0, gt=0, description="result interval when the file does not say")

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {k: t for k, t in v.items() if t not in (*TARGETS, "")}
        if bad:
            raise ValueError(f"columns {bad}: map each vendor name to one of {', '.join(TARGETS)} or ''")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        try:
            return v if v is None else ZoneInfo(v).key
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone {v!r} is not an IANA zone name like Australia/Perth") from exc


class ElementalAnalyser(StreamSerialDriver):
    Config = AnalyserConfig
    PRODUCES = (rd.Analysis, rd.AnalyserStatus)
    config: AnalyserConfig
    parser: AnalyserParser

    def __init__(self, role: str, config: AnalyserConfig) -> None:
        super().__init__(role, config)
        self.parser = AnalyserParser()
        self.stats.extra["wrong_size"] = 0
        path = drop_path(config.port)
        self.files = ResultFileReader(role, config.columns, timezone=config.timezone,
                                      time_format=config.time_format, delimiter=config.delimiter,
                                      decimal_comma=config.decimal_comma, interval_s=config.interval_s)
        self.pending: deque[rd.Analysis] = deque()
        self._rows: dict[str, int] = {}  # file name -> results handed from it (an appended file)
        self._handing: tuple[str, int] | None = None
        self.stats.extra["repeated"] = 0
        self.drop = None if path is None else DropDir(
            role, path, self.stats, patterns=config.patterns, settle_s=config.settle_s,
            max_bytes=config.max_file_bytes, seen_file=config.seen_file, seen_name=".customs-edge-analyser-seen")

    def open(self) -> None:
        self.pending.clear()
        if self.drop is None:
            super().open()
            return
        self.drop.open()
        self._rows = {}
        for line in self.drop.seen:
            kind, _, rest = line.partition("\t")
            name, _, n = rest.rpartition("\t")
            if kind == "rows" and n.isdigit():
                self._rows[name] = int(n)
        self._handing = None
        self.stats.opened += 1

    def close(self) -> None:
        self._release()
        super().close()

    def _release(self) -> None:
        """Once every reading of the last file was taken: remember how many it had, and the file."""
        if self.drop is None or self.pending:
            return
        if self._handing is not None:
            name, n = self._handing
            self._handing, self._rows[name] = None, n
            self.drop.done(f"rows\t{name}\t{n}")
        self.drop.release()

    def read(self) -> rd.Analysis | rd.AnalyserStatus | None:
        if self.drop is None:
            return super().read()  # type: ignore[return-value]
        if not self.pending:
            self._release()
            self._read_dir(self.drop)
        return self.pending.popleft() if self.pending else None

    def _read_dir(self, drop: DropDir) -> None:
        for key, data in drop.new_files():
            name = key.split("\t")[0]
            refused = self.files.refused
            try:
                found = self.files.parse(name, data)
            except ResultFileError as exc:
                self.files.refused += 1
                self.files.last_error = f"{name}: {exc}"
                found = []
            self.stats.corrupt += self.files.refused - refused
            before = self._rows.get(name, 0)
            if before > len(found):
                before = 0  # fewer results than before: a new file under an old name, not an appended one
            self.stats.extra["repeated"] += min(before, len(found))
            self.stats.frames += max(0, len(found) - before)
            self.pending.extend(found[before:])
            if self.pending:
                self._handing = (name, len(found))
                drop.hand(key)
                return
            drop.done(key)  # refused, repeated or nothing in it: never read again
        time.sleep(self.config.read_timeout_s)  # nothing new: wait like a read timeout

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

