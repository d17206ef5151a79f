"""ANSI N42.42-2012 instance documents as a radiation portal monitor writes them, one per occupancy.
Written from the standard's schema (n42.xsd 0.0.54, namespace http://physics.nist.gov/N42/2011/N42),
not from drivers/n42.py. Element order is the schema's sequence:

  RadInstrumentData @n42DocUUID
    RadInstrumentInformation: RadInstrumentManufacturerName, RadInstrumentIdentifier,
      RadInstrumentModelName, RadInstrumentClassCode "Portal Monitor", RadInstrumentVersion,
      RadInstrumentCharacteristics (the alarm thresholds: Characteristic "<Gamma|Neutron> Alarm Threshold", cps)
    RadDetectorInformation @id: RadDetectorName, RadDetectorCategoryCode, RadDetectorKindCode  (per panel)
    RadMeasurement @id: MeasurementClassCode Background, StartDateTime, RealTimeDuration,
      GrossCounts @id @radDetectorInformationReference (LiveTimeDuration, CountData) per detector,
      OccupancyIndicator false
    RadMeasurementGroup @id: RadMeasurementGroupDescription              (the occupancy)
    RadMeasurement @id @radMeasurementGroupReferences: Foreground ..., OccupancyIndicator true  (per time slice)
    AnalysisResults @radMeasurementGroupReferences: RadAlarm @radDetectorInformationReferences
      (RadAlarmDateTime, RadAlarmCategoryCode Gamma|Neutron, RadAlarmDescription)   (only on an alarm)

On a stream the documents follow one another, each complete; the receiver splits at the root end tag.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

NS = "http://physics.nist.gov/N42/2011/N42"
ET.register_namespace("", NS)


@dataclass
class Detector:
    id: str
    name: str
    category: str  # Gamma | Neutron
    kind: str  # PVT, NaI, He3 ...


@dataclass
class Slice:
    """One measurement: its start (UTC unix), real time, and counts per detector id."""

    start: float
    seconds: float
    counts: dict[str, int]


@dataclass
class Alarm:
    category: str  # Gamma | Neutron
    at: float
    description: str
    detectors: list[str] = field(default_factory=list)


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, f"{{{NS}}}{tag}", attrs)
    if text is not None:
        e.text = text
    return e


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration(seconds: float) -> str:
    return f"PT{seconds:.3f}S"


def _measurement(root: ET.Element, mid: str, klass: str, s: Slice, occupied: bool,
                 group: str | None = None) -> None:
    m = _el(root, "RadMeasurement", id=mid, **({"radMeasurementGroupReferences": group} if group else {}))
    _el(m, "MeasurementClassCode", klass)
    _el(m, "StartDateTime", when(s.start))
    _el(m, "RealTimeDuration", duration(s.seconds))
    for det, n in s.counts.items():
        g = _el(m, "GrossCounts", id=f"{mid}-{det}", radDetectorInformationReference=det)
        _el(g, "LiveTimeDuration", duration(s.seconds))
        _el(g, "CountData", str(n))
    _el(m, "OccupancyIndicator", "true" if occupied else "false")


def document(*, uuid: str, instrument: str, detectors: Sequence[Detector], background: Slice,
             occupancy: str, foreground: Sequence[Slice], alarms: Sequence[Alarm] = (),
             thresholds_cps: dict[str, float] | None = None) -> bytes:
    """One occupancy as a complete N42.42 document (UTF-8, with an XML declaration)."""
    root = ET.Element(f"{{{NS}}}RadInstrumentData", n42DocUUID=uuid)
    info = _el(root, "RadInstrumentInformation", id="RadInstrumentInformation-1")
    _el(info, "RadInstrumentManufacturerName", "customs-edge simulator")
    _el(info, "RadInstrumentIdentifier", instrument)
    _el(info, "RadInstrumentModelName", "Belt portal (simulated)")
    _el(info, "RadInstrumentClassCode", "Portal Monitor")
    version = _el(info, "RadInstrumentVersion")
    _el(version, "RadInstrumentComponentName", "Software")
    _el(version, "RadInstrumentComponentVersion", "1")
    if thresholds_cps:
        chars = _el(info, "RadInstrumentCharacteristics")
        for category, cps in thresholds_cps.items():
            c = _el(chars, "Characteristic")
            _el(c, "CharacteristicName", f"{category} Alarm Threshold")
            _el(c, "CharacteristicValue", f"{cps:.3f}")
            _el(c, "CharacteristicValueUnits", "cps")
            _el(c, "CharacteristicValueDataClassCode", "double")
    for d in detectors:
        di = _el(root, "RadDetectorInformation", id=d.id)
        _el(di, "RadDetectorName", d.name)
        _el(di, "RadDetectorCategoryCode", d.category)
        _el(di, "RadDetectorKindCode", d.kind)
    _measurement(root, "Background-1", "Background", background, occupied=False)
    group = _el(root, "RadMeasurementGroup", id=occupancy)
    _el(group, "RadMeasurementGroupDescription", f"belt segment {occupancy}")
    for i, s in enumerate(foreground, 1):
        _measurement(root, f"Foreground-{i}", "Foreground", s, occupied=True, group=occupancy)
    if alarms:
        results = _el(root, "AnalysisResults", radMeasurementGroupReferences=occupancy)
        for a in alarms:
            ra = _el(results, "RadAlarm", radDetectorInformationReferences=" ".join(a.detectors))
            _el(ra, "RadAlarmDateTime", when(a.at))
            _el(ra, "RadAlarmCategoryCode", a.category)
            _el(ra, "RadAlarmDescription", a.description)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return body + b"\n"
