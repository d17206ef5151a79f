"""Radiation portal monitor (ANSI N42.35) reporting occupancies as ANSI N42.42-2012 XML documents.

Namespace http://physics.nist.gov/N42/2011/N42. What is read of a RadInstrumentData document:
  RadInstrumentInformation/RadInstrumentIdentifier     -> `instrument`
  RadDetectorInformation@id, RadDetectorCategoryCode (Gamma, Neutron, ...), RadDetectorName
  RadMeasurement: MeasurementClassCode (Foreground, Background, ...), StartDateTime, RealTimeDuration,
    OccupancyIndicator, @radMeasurementGroupReferences, and GrossCounts@radDetectorInformationReference
    with CountData (summed over its energy windows) and an optional LiveTimeDuration
  RadMeasurementGroup@id (or @radMeasurementGroupUUID): one occupancy of a multi-measurement portal
  AnalysisResults (@radMeasurementGroupReferences / @radMeasurementReferences) / RadAlarm:
    RadAlarmCategoryCode (Gamma, Neutron), RadAlarmDescription
  Characteristic (CharacteristicName containing "alarm threshold", CharacteristicValueUnits cps) of a
    detector or of the instrument: the alarm threshold. N42.42 has no element of its own for it.
One occupancy per RadMeasurementGroup that foreground measurements reference, else one per document
(its foreground measurements with OccupancyIndicator true, or all of them when none says). Counts of
a channel are summed over its detectors; cps is the sum of each detector's counts / its live time
(the GrossCounts' LiveTimeDuration, else the measurement's RealTimeDuration). A document with only
background (a portal's periodic background report) updates the background used for occupancies whose
document carries none, and yields nothing.

Transport (N42.42 defines the document, not how it travels), by the URL in `port`:
  socket://host:port  the portal (or its N42 server) pushes documents over TCP, one after the other,
                      each a complete XML instance. Framing is the document itself: a document ends
                      with its root end tag `</RadInstrumentData>` (any namespace prefix), which is how
                      receivers of N42 streams split them; no length prefix (that would be a vendor
                      extension the standard does not define). A document split across reads is
                      joined; bytes before the next document are skipped.
  dir:///path         the portal writes one file per document into a directory. New files (matching
                      `patterns`, unchanged for `settle_s`) are read once; each is remembered by name,
                      size and mtime in `seen_file` (default <dir>/.customs-edge-n42-seen), so a
                      restart never reads one again. A file is remembered once the reading made of it
                      was handed over (at the next read() or close()). drivers/dropdir.py does this.

Parsing uses defusedxml on top of the stdlib ElementTree: a DTD, an entity declaration or an external
reference is refused, so billion-laughs and XXE documents never expand. Anything refused (hostile, not
well-formed, not N42.42, a document larger than `max_document_bytes`, a count that is not a finite
number >= 0) is counted in stats.corrupt and skipped; read() never raises for a document's content.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import defusedxml
import defusedxml.ElementTree as SafeET
from pydantic import Field, field_validator

from customs_edge.core import readings as rd
from customs_edge.drivers.base import SerialPortConfig, StreamSerialDriver
from customs_edge.drivers.dropdir import DropDir, drop_path

NS = "http://physics.nist.gov/N42/2011/N42"
_END_TAG = re.compile(rb"</(?:[A-Za-z_][\w.-]*:)?RadInstrumentData\s*>")
_START_TAG = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?RadInstrumentData[\s>]")
_DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$")
CHANNELS = ("Gamma", "Neutron")


class N42Error(ValueError):
    """A document that cannot be read as an N42.42 portal report; the message says why."""


def _q(tag: str) -> str:
    return f"{{{NS}}}{tag}"


def _text(el: ET.Element | None, tag: str) -> str | None:
    child = None if el is None else el.find(_q(tag))
    return None if child is None or child.text is None else child.text.strip()


def duration_s(text: str) -> float:
    """An xsd:duration of days, hours, minutes and seconds (PT2.5S, PT1M30S) in seconds."""
    m = _DURATION.match(text.strip())
    if m is None or not any(m.groups()):
        raise N42Error(f"duration {text!r} is not an xsd:duration like PT2.5S")
    d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


def utc_s(text: str) -> float:
    """An xsd:dateTime with Z or an offset (fractional seconds allowed) as UTC unix seconds."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise N42Error(f"date-time {text!r}: {exc}") from exc
    if t.tzinfo is None:
        raise N42Error(f"date-time {text!r} has no time zone; N42.42 portals report Z or an offset")
    try:
        return t.astimezone(UTC).timestamp()
    except OverflowError as exc:  # year 1 with a positive offset
        raise N42Error(f"date-time {text!r}: {exc}") from exc


def _number(text: str | None, what: str) -> float:
    try:
        x = float(text or "")
    except ValueError as exc:
        raise N42Error(f"{what}: {text!r} is not a number") from exc
    if not (x >= 0 and x != float("inf")):
        raise N42Error(f"{what}: {text!r} must be a finite number >= 0")
    return x


@dataclass
class _Measurement:
    mid: str
    klass: str
    start: float
    real_s: float
    occupied: bool | None
    groups: list[str]
    counts: list[tuple[str, float, float]]  # detector id, counts, live seconds


@dataclass
class _Rate:
    """Counts and seconds per detector of one channel: cps is the sum of the detectors' rates."""

    counts: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, det: str, counts: float, seconds: float) -> None:
        self.counts[det] = self.counts.get(det, 0.0) + counts
        self.seconds[det] = self.seconds.get(det, 0.0) + seconds

    def total(self) -> float | None:
        return sum(self.counts.values()) if self.counts else None

    def cps(self) -> float | None:
        rates = [c / self.seconds[d] for d, c in self.counts.items() if self.seconds[d] > 0]
        return sum(rates) if rates else None


class N42Reader:
    """Turns N42.42 documents into PortalOccupancy readings; keeps the last background it saw."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.background: dict[str, float | None] = {c: None for c in CHANNELS}

    def parse(self, data: bytes) -> list[rd.PortalOccupancy]:
        try:
            root = SafeET.fromstring(data, forbid_dtd=True)
        except (ET.ParseError, defusedxml.DefusedXmlException, ValueError) as exc:
            raise N42Error(f"refused: {type(exc).__name__}: {exc}") from exc
        if root.tag != _q("RadInstrumentData"):
            raise N42Error(f"root element {root.tag!r} is not RadInstrumentData in {NS}")
        try:
            return self._occupancies(root)
        except (rd.ReadingError, OverflowError) as exc:  # e.g. counts that sum to inf
            raise N42Error(str(exc)) from exc

    def _occupancies(self, root: ET.Element) -> list[rd.PortalOccupancy]:
        instrument = _text(root.find(_q("RadInstrumentInformation")), "RadInstrumentIdentifier") or ""
        detectors: dict[str, tuple[str, str]] = {}  # id -> (category, name)
        for det in root.iter(_q("RadDetectorInformation")):
            did = det.get("id")
            if did:
                detectors[did] = (_text(det, "RadDetectorCategoryCode") or "", _text(det, "RadDetectorName") or did)
        thresholds = self._thresholds(root, detectors)
        meas = [self._measurement(m) for m in root.iter(_q("RadMeasurement"))]
        background = {c: _Rate() for c in CHANNELS}
        for m in meas:
            if m.klass == "Background":
                self._add(background, m, detectors)
        for c in CHANNELS:
            cps = background[c].cps()
            if cps is not None:
                self.background[c] = cps
        fg = [m for m in meas if m.klass == "Foreground"]
        if any(m.occupied is not None for m in fg):
            fg = [m for m in fg if m.occupied]
        if not fg:
            return []
        doc_id = root.get("n42DocUUID")
        group_ids = {g.get("id"): g.get("radMeasurementGroupUUID") for g in root.iter(_q("RadMeasurementGroup"))}
        occupancies: dict[str, list[_Measurement]] = {}
        for m in fg:
            gs = [g for g in m.groups if g in group_ids]
            for g in gs or [""]:
                occupancies.setdefault(g, []).append(m)
        alarms = list(self._alarms(root))
        out = []
        for g, ms in occupancies.items():
            oid = group_ids.get(g) or (f"{doc_id}/{g}" if doc_id and g else g or doc_id)
            if not oid:
                oid = f"{instrument or self.source}@{min(m.start for m in ms):.3f}"
            ids = {m.mid for m in ms}
            mine = [a for a in alarms if (not a[0] and not a[1]) or g in a[0] or ids & a[1]]
            out.append(self._reading(oid, ms, detectors, thresholds, mine, instrument))
        return out

    @staticmethod
    def _measurement(m: ET.Element) -> _Measurement:
        mid = m.get("id", "")
        start = utc_s(_text(m, "StartDateTime") or "")
        real = duration_s(_text(m, "RealTimeDuration") or "")
        occ = _text(m, "OccupancyIndicator")
        if occ not in (None, "true", "false", "1", "0"):
            raise N42Error(f"RadMeasurement {mid}: OccupancyIndicator {occ!r} is not a boolean")
        counts = []
        for gc in m.findall(_q("GrossCounts")):
            data = _text(gc, "CountData")
            if data is None:
                raise N42Error(f"RadMeasurement {mid}: GrossCounts without CountData")
            total = sum(_number(x, f"RadMeasurement {mid} CountData") for x in data.split())
            live = _text(gc, "LiveTimeDuration")
            counts.append((gc.get("radDetectorInformationReference", ""), total,
                           duration_s(live) if live else real))
        return _Measurement(mid, _text(m, "MeasurementClassCode") or "", start, real,
                            None if occ is None else occ in ("true", "1"),
                            (m.get("radMeasurementGroupReferences") or "").split(), counts)

    @staticmethod
    def _add(rates: dict[str, _Rate], m: _Measurement, detectors: dict[str, tuple[str, str]]) -> None:
        for det, counts, seconds in m.counts:
            cat = detectors.get(det, ("", ""))[0]
            if cat in rates:
                rates[cat].add(det, counts, seconds)

    @staticmethod
    def _thresholds(root: ET.Element, detectors: dict[str, tuple[str, str]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for owner in [*root.iter(_q("RadDetectorInformation")), *root.iter(_q("RadInstrumentInformation"))]:
            cat = detectors.get(owner.get("id", ""), ("", ""))[0]
            for ch in owner.iter(_q("Characteristic")):
                name = (_text(ch, "CharacteristicName") or "").lower()
                if "alarm threshold" not in name or (_text(ch, "CharacteristicValueUnits") or "") != "cps":
                    continue
                which = cat if cat in CHANNELS else next((c for c in CHANNELS if c.lower() in name), None)
                if which is not None:
                    x = _number(_text(ch, "CharacteristicValue"), f"{name} CharacteristicValue")
                    out[which] = min(x, out.get(which, x))
        return out

    @staticmethod
    def _alarms(root: ET.Element) -> Iterator[tuple[set[str], set[str], str, str]]:
        """(group refs, measurement refs, category, description) of every RadAlarm."""
        for ar in root.iter(_q("AnalysisResults")):
            groups = set((ar.get("radMeasurementGroupReferences") or "").split())
            meas = set((ar.get("radMeasurementReferences") or "").split())
            for alarm in ar.iter(_q("RadAlarm")):
                cat = _text(alarm, "RadAlarmCategoryCode") or ""
                yield groups, meas, cat, _text(alarm, "RadAlarmDescription") or f"{cat} alarm"

    def _reading(self, oid: str, ms: list[_Measurement], detectors: dict[str, tuple[str, str]],
                 thresholds: dict[str, float], alarms: Iterable[tuple[set[str], set[str], str, str]],
                 instrument: str) -> rd.PortalOccupancy:
        rates = {c: _Rate() for c in CHANNELS}
        for m in ms:
            self._add(rates, m, detectors)
        used = sorted({det for r in rates.values() for det in r.counts})
        cats = [a[2] for a in alarms]
        g, n = rates["Gamma"], rates["Neutron"]
        return rd.PortalOccupancy(
            source=self.source, occupancy_id=oid, start=min(m.start for m in ms),
            end=max(m.start + m.real_s for m in ms), gamma_counts=g.total(), gamma_cps=g.cps(),
            neutron_counts=n.total(), neutron_cps=n.cps(), gamma_background_cps=self.background["Gamma"],
            neutron_background_cps=self.background["Neutron"], gamma_alarm="Gamma" in cats,
            neutron_alarm="Neutron" in cats, gamma_threshold_cps=thresholds.get("Gamma"),
            neutron_threshold_cps=thresholds.get("Neutron"),
            detectors=tuple(detectors[d][1] for d in used), alarms=tuple(a[3] for a in alarms),
            instrument=instrument)


class DocumentSplitter:
    """Splits a TCP byte stream into N42.42 documents at each root end tag. Dropped, and counted in
    `dropped`: a document larger than `max_bytes` (with everything up to its end tag), and a document
    cut short on the line (its end tag never came: the next document's root start tag follows it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.dropped = 0
        self._skipping = False
        self._scanned = 0  # no end tag starts before this offset

    def feed(self, data: bytes) -> None:
        self.buf += data

    def reset(self) -> None:
        """A reconnect: a document cut by it is not continued."""
        self.buf.clear()
        self._scanned, self._skipping = 0, False

    def next(self) -> bytes | None:
        while True:
            m = _END_TAG.search(self.buf, self._scanned)
            if m is None:
                self._scanned = max(0, len(self.buf) - 64)  # an end tag may be cut across reads
                if len(self.buf) > self.max_bytes:
                    if not self._skipping:
                        self.dropped += 1
                    self._skipping = True
                    del self.buf[: -64]
                    self._scanned = 0
                return None
            doc = bytes(self.buf[: m.end()])
            del self.buf[: m.end()]
            self._scanned = 0
            if self._skipping or len(doc) > self.max_bytes:
                if not self._skipping:
                    self.dropped += 1
                self._skipping = False
                continue
            starts = list(_START_TAG.finditer(doc))
            if len(starts) > 1:
                self.dropped += 1  # a document that lost its end: keep the last one
                return doc[starts[-1].start():]
            start = doc.find(b"<")
            return doc[start:] if start >= 0 else doc


class N42Config(SerialPortConfig):
    driver: Literal["n42-portal"] = "n42-portal"
    port: str = Field(min_length=1, description="socket://host:port (documents pushed over TCP) or "
                      "dir:///path (one file per document)")
    read_timeout_s: float = Field(0.5, gt=0, le=10)
    silent_after_s: float = Field(600.0, gt=0, description="TCP: no document for this long is a fault "
                                  "(portals send a background report every few minutes)")
    max_document_bytes: int = Field(4 << 20, ge=1024, le=256 << 20)
    patterns: list[str] = Field(default_factory=lambda: ["*.n42", "*.xml"], min_length=1)
    settle_s: float = Field(1.0, ge=0, description="dir: a file is read once unchanged for this long")
    seen_file: Path | None = Field(None, description="dir: where read files are remembered")

    @field_validator("port")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("socket://") or v.startswith("dir://")):
            raise ValueError("port must be socket://host:port or dir:///path/to/drop/directory")
        return v


class N42Portal(StreamSerialDriver):
    Config = N42Config
    PRODUCES = (rd.PortalOccupancy,)
    config: N42Config
    parser: DocumentSplitter

    def __init__(self, role: str, config: N42Config) -> None:
        super().__init__(role, config)
        self.reader = N42Reader(role)
        self.parser = DocumentSplitter(config.max_document_bytes)
        self.pending: deque[rd.PortalOccupancy] = deque()
        path = drop_path(config.port)
        self.drop = None if path is None else DropDir(
            role, path, self.stats, patterns=config.patterns, settle_s=config.settle_s,
            max_bytes=config.max_document_bytes, seen_file=config.seen_file, seen_name=".customs-edge-n42-seen")
        for k in ("no_occupancy", "dropped"):
            self.stats.extra[k] = 0

    def open(self) -> None:
        self.pending.clear()
        if self.drop is None:
            self.parser.reset()
            super().open()
            return
        self.drop.open()
        self.stats.opened += 1

    def close(self) -> None:
        if self.drop is not None and not self.pending:
            self.drop.release()
        super().close()

    def read(self) -> rd.PortalOccupancy | None:
        if self.drop is None:
            return super().read()  # type: ignore[return-value]
        if not self.pending:
            self.drop.release()
            self._read_dir(self.drop)
        return self.pending.popleft() if self.pending else None

    def _take(self, data: bytes) -> None:
        """Parse one document into `pending` (counted as a frame, or as corrupt when refused)."""
        try:
            found = self.reader.parse(data)
        except N42Error:
            self.stats.corrupt += 1
            return
        self.stats.frames += 1
        if not found:
            self.stats.extra["no_occupancy"] += 1
        self.pending.extend(found)

    # --- TCP stream ------------------------------------------------------------------------------
    def _next(self) -> rd.PortalOccupancy | None:
        while not self.pending:
            doc = self.parser.next()
            self.stats.corrupt += self.parser.dropped - self.stats.extra["dropped"]
            self.stats.extra["dropped"] = self.parser.dropped
            if doc is None:
                return None
            frames = self.stats.frames
            self._take(doc)
            if self.stats.frames > frames:
                self._watch.reset()  # a background report is a sign of life too
        return self.pending.popleft()

    # --- directory drop --------------------------------------------------------------------------
    def _read_dir(self, drop: DropDir) -> None:
        for key, data in drop.new_files():
            self._take(data)
            if self.pending:
                drop.hand(key)
                return
            drop.done(key)  # refused or nothing in it: never read again
        time.sleep(self.config.read_timeout_s)  # nothing new: wait like a read timeout
