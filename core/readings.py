"""Typed readings: what a driver hands the app, one immutable type per kind of measurement.

Every reading carries `source` (the driver's role in the unit config), `ts` (UTC unix seconds) and
`mono` (monotonic seconds), and is checked when it is made: a value that cannot be what its field says
(NaN or inf where a number is meant, a 3-D array for a thermal frame) raises ReadingError naming the
type and the field. Apps dispatch on the type (isinstance / match), never on a string; a driver
declares the types it yields in `PRODUCES` and an app the types it takes per role in `CONSUMES`, and
the config loader refuses an instrument that does not fit, by type.

Frozen dataclasses with slots, about as cheap to make as the pydantic model they replace (bench/gate.py
times a ThermalFrame per frame). Arrays are handed over as read-only views.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import date
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import numpy as np

from customs_edge.core.errors import CustomsEdgeError

PointValue = float | int | bool


class ReadingError(CustomsEdgeError, ValueError):
    """A reading was made with a value its type does not allow: a driver's bug, never the instrument's."""


def _bad(obj: object, name: str, why: str, value: object) -> ReadingError:
    return ReadingError(f"{type(obj).__name__}.{name}: {why} (got {value!r:.80})")


def _number(obj: object, name: str, x: Any, optional: bool = False) -> None:
    if type(x) is float:  # the common case, checked first: NaN - NaN and inf - inf are NaN
        if x - x == 0:
            return
    elif isinstance(x, int | np.integer | np.floating) and not isinstance(x, bool):
        if math.isfinite(x):
            return
    elif x is None and optional:
        return
    raise _bad(obj, name, "must be a finite number" + (" or None" if optional else ""), x)


def _count(obj: object, name: str, x: object) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise _bad(obj, name, "must be an integer >= 0", x)


def _frozen_array(obj: object, name: str, a: object, dtype: type[np.generic], ndims: tuple[int, ...],
                  check_finite: bool) -> np.ndarray:
    """`a` as a read-only view of `dtype` (no copy when it already is one), checked for shape and values."""
    if not isinstance(a, np.ndarray):
        raise _bad(obj, name, "must be a numpy array", type(a).__name__)
    arr = a if a.dtype == dtype else a.astype(dtype)
    if arr.ndim not in ndims or not arr.size:
        raise _bad(obj, name, f"must be a non-empty array of {' or '.join(map(str, ndims))} dimensions",
                   arr.shape)
    if check_finite:
        flat = arr.ravel()
        # one BLAS call: NaN and inf make the sum of squares non-finite (so would values beyond ~1e17,
        # which no temperature or count is); np.isfinite(a).all() costs three times as much per frame
        if not math.isfinite(flat.dot(flat)):
            raise _bad(obj, name, "must hold finite values only", "NaN or inf")
    view = arr.view()
    view.setflags(write=False)
    object.__setattr__(obj, name, view)
    return view


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """The base of every reading. `KIND` names the type in logs and `probe` output."""

    KIND: ClassVar[str] = "reading"
    source: str  # the driver's role name in the unit config, e.g. "scale"
    ts: float = field(default_factory=time.time)  # UTC unix seconds
    mono: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise _bad(self, "source", "must be the driver's role name", self.source)
        _number(self, "ts", self.ts)
        _number(self, "mono", self.mono)
        self._check()

    def _check(self) -> None:
        """Subclasses check their own fields here (the base checks source, ts and mono)."""

    def summary(self) -> dict[str, Any]:
        """The reading's own fields as JSON-able values (arrays as shape and dtype): for probe and logs."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in ("source", "ts", "mono")}


def _plain(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return {"shape": list(x.shape), "dtype": str(x.dtype)}
    if is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


# --- weighing --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Weight(Reading):
    """One weight from a weighing indicator or balance, with its status as the instrument reports it.

    `value` is the displayed weight in `unit` (net when `net`), None when the instrument gave none
    (MT-SICS 'I': busy or no stable value in time; '+'/'-': overload/underload). `overload`/`underload`:
    outside the weighing range (Toledo SWB bit 2, above capacity or below zero as the sign says).
    `not_zeroed`: the power-up zero was not captured (Toledo SWB bit 6)."""

    KIND: ClassVar[str] = "weight"
    value: float | None
    unit: str = ""
    stable: bool = False  # no motion
    net: bool | None = None  # None: the instrument does not say
    tare: float | None = None
    overload: bool = False
    underload: bool = False
    not_zeroed: bool = False

    def _check(self) -> None:
        _number(self, "value", self.value, optional=True)
        _number(self, "tare", self.tare, optional=True)
        if not isinstance(self.unit, str):
            raise _bad(self, "unit", "must be a string", self.unit)

    @property
    def in_range(self) -> bool:
        """A weight the instrument stands behind: there is a value, and it is inside the weighing range."""
        return self.value is not None and not (self.overload or self.underload)

    @property
    def gross(self) -> float | None:
        """The gross weight when the reading says enough to know it."""
        if self.value is None or self.net is None:
            return None
        if not self.net:
            return self.value
        return None if self.tare is None else self.value + self.tare


# --- thermal and camera images ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class ThermalFrame(Reading):
    """A thermal image: float32 (H, W) in °C, any H x W, every pixel finite (dead pixels already
    replaced by the driver and counted in `dead_pixels`). `ambient_c`: the sensor's own ambient or die
    temperature when it reports one."""

    KIND: ClassVar[str] = "thermal_frame"
    pixels: np.ndarray
    ambient_c: float | None = None
    dead_pixels: int = 0

    def _check(self) -> None:
        _frozen_array(self, "pixels", self.pixels, np.float32, (2,), check_finite=True)
        _number(self, "ambient_c", self.ambient_c, optional=True)
        _count(self, "dead_pixels", self.dead_pixels)


@dataclass(frozen=True, slots=True, kw_only=True)
class Image(Reading):
    """A camera image: uint8 (H, W) grayscale or (H, W, 3) BGR. `frame_no` counts frames received
    from the source since the driver was made."""

    KIND: ClassVar[str] = "image"
    pixels: np.ndarray
    frame_no: int = 0

    def _check(self) -> None:
        px = _frozen_array(self, "pixels", self.pixels, np.uint8, (2, 3), check_finite=False)
        if px.ndim == 3 and px.shape[2] != 3:
            raise _bad(self, "pixels", "a colour image has 3 channels (BGR)", px.shape)
        _count(self, "frame_no", self.frame_no)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


# --- Modbus registers ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Point:
    """One named value of a register map. `error` says why there is no value (or none to trust):
    'not finite' for a float register that decoded to NaN or inf; other checks may add reasons."""

    value: PointValue | None
    unit: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.value is None:
            if self.error is None:
                raise _bad(self, "error", "a point without a value must say why", None)
        elif not isinstance(self.value, bool):
            _number(self, "value", self.value)

    @classmethod
    def of(cls, value: PointValue, unit: str | None = None) -> Point:
        """A decoded value as a point: a non-finite float becomes an error-flagged point without a value."""
        if isinstance(value, float) and not math.isfinite(value):
            return cls(None, unit, f"not finite ({value})")
        return cls(value, unit)


@dataclass(frozen=True, slots=True, kw_only=True)
class Registers(Reading):
    """One poll of one Modbus slave: its points by name (as in the register map of the config)."""

    KIND: ClassVar[str] = "registers"
    slave: str
    slave_id: int
    points: Mapping[str, Point]

    def _check(self) -> None:
        _count(self, "slave_id", self.slave_id)
        if not all(isinstance(p, Point) for p in self.points.values()):
            raise _bad(self, "points", "must map names to Point", self.points)
        object.__setattr__(self, "points", MappingProxyType(dict(self.points)))

    @classmethod
    def of(cls, values: Mapping[str, PointValue], *, units: Mapping[str, str | None] | None = None,
           **kw: Any) -> Registers:
        """Registers from decoded values (non-finite floats flagged, see Point.of)."""
        u = units or {}
        return cls(points={k: Point.of(v, u.get(k)) for k, v in values.items()}, **kw)

    def number(self, name: str) -> float | None:
        """The point's value as a float; None when the point is absent or flagged."""
        p = self.points.get(name)
        return None if p is None or p.value is None else float(p.value)

    def flag(self, name: str) -> bool | None:
        """The point's value as a bool (a coil, an alarm bit); None when the point is absent or flagged."""
        p = self.points.get(name)
        return None if p is None or p.value is None else bool(p.value)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlaveError(Reading):
    """A poll of one Modbus slave failed after its retries. `consecutive`: failed polls in a row."""

    KIND: ClassVar[str] = "slave_error"
    slave: str
    slave_id: int
    error: str
    consecutive: int = 1

    def _check(self) -> None:
        _count(self, "slave_id", self.slave_id)
        _count(self, "consecutive", self.consecutive)


# --- elemental analyser ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Spectrum:
    """Counts per channel (float32, read-only) and the energy calibration they were taken with."""

    counts: np.ndarray
    live_time_s: float
    kev_per_channel: float
    offset_kev: float = 0.0

    def __post_init__(self) -> None:
        _frozen_array(self, "counts", self.counts, np.float32, (1,), check_finite=True)
        for name in ("live_time_s", "kev_per_channel", "offset_kev"):
            _number(self, name, getattr(self, name))


@dataclass(frozen=True, slots=True)
class Assay:
    """An analyser's own assay, % by mass; None for an element it did not report. `extra`: any other
    element or oxide the analyser reported, by the name it gave (Mn, CaO), finite, read-only."""

    fe: float | None = None
    sio2: float | None = None
    al2o3: float | None = None
    p: float | None = None
    s: float | None = None
    h2o: float | None = None
    extra: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        named = [f.name for f in fields(self) if f.name != "extra"]
        for name in named:
            _number(self, name, getattr(self, name), optional=True)
        for k, x in self.extra.items():
            if not isinstance(k, str) or not k or k in named:
                raise _bad(self, "extra", f"keys must be element names other than {', '.join(named)}", k)
            _number(self, f"extra[{k}]", x)
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def as_dict(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return out | dict(self.extra)


@dataclass(frozen=True, slots=True, kw_only=True)
class Analysis(Reading):
    """One analysis interval of a cross-belt analyser: its assay and the spectrum behind it (None when
    the result came without one: a vendor's result file). `status`: OK, NOLOAD (empty belt: no assay)
    or FAULT; `analysed_at`: the analyser's own UTC time; `sample_id`: the vendor's id of the result."""

    KIND: ClassVar[str] = "analysis"
    STATUSES: ClassVar[tuple[str, ...]] = ("OK", "NOLOAD", "FAULT")
    seq: int
    status: str
    analysed_at: float
    interval_s: float
    tonnes: float
    assay: Assay
    spectrum: Spectrum | None = None
    sample_id: str | None = None

    def _check(self) -> None:
        _count(self, "seq", self.seq)
        if self.status not in self.STATUSES:
            raise _bad(self, "status", f"must be one of {', '.join(self.STATUSES)}", self.status)
        for name in ("analysed_at", "interval_s", "tonnes"):
            _number(self, name, getattr(self, name))


@dataclass(frozen=True, slots=True, kw_only=True)
class AnalyserStatus(Reading):
    """The analyser's periodic status line: its state word and detector temperature."""

    KIND: ClassVar[str] = "analyser_status"
    state: str
    detector_c: float

    def _check(self) -> None:
        _number(self, "detector_c", self.detector_c)


# --- lane passage ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Passage(Reading):
    """A traveller broke the entry or exit beam. `count`: the controller's counter; `lost`: events
    the counter says happened before this one but never arrived as lines."""

    KIND: ClassVar[str] = "passage"
    event: Literal["entry", "exit"]
    count: int
    lost: int = 0

    def _check(self) -> None:
        if self.event not in ("entry", "exit"):
            raise _bad(self, "event", "must be 'entry' or 'exit'", self.event)
        _count(self, "count", self.count)
        _count(self, "lost", self.lost)


@dataclass(frozen=True, slots=True, kw_only=True)
class PassageHeartbeat(Reading):
    """The passage controller's heartbeat: both counters, so an empty lane is not a dead one."""

    KIND: ClassVar[str] = "passage_heartbeat"
    entries: int
    exits: int

    def _check(self) -> None:
        _count(self, "entries", self.entries)
        _count(self, "exits", self.exits)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ambient(Reading):
    """The air where a measurement is taken, from an environment sensor: temperature (°C) and relative
    humidity (%, None when the sensor has no humidity channel)."""

    KIND: ClassVar[str] = "ambient"
    temperature_c: float
    humidity_pct: float | None = None

    def _check(self) -> None:
        _number(self, "temperature_c", self.temperature_c)
        _number(self, "humidity_pct", self.humidity_pct, optional=True)


# --- handheld: position and code scans ----------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Position(Reading):
    """One GNSS epoch (the GGA, RMC and GSA sentences of one fix time, merged).

    `valid`: the receiver says it has a measured fix (GGA quality 1-5 and RMC status A, for those it sent);
    a valid position always has lat and lon. An invalid one reports a lost fix: do not place an event with
    its coordinates (a receiver may still send a dead-reckoned or stale one; quality 6 says so).
    `quality`: GGA fix quality (0 none, 1 GPS, 2 DGPS, 3 PPS, 4 RTK fixed, 5 RTK float, 6 estimated,
    7 manual, 8 simulator; None: no GGA); `fix_mode`: GSA 1 no fix, 2 2-D, 3 3-D (None: no GSA). `fix_time`: the
    receiver's UTC time of the fix as unix seconds (None until a date is known from RMC)."""

    KIND: ClassVar[str] = "position"
    valid: bool
    lat: float | None = None  # degrees, north positive (WGS 84)
    lon: float | None = None  # degrees, east positive
    alt_m: float | None = None  # above mean sea level
    quality: int | None = None
    fix_mode: int | None = None
    satellites: int | None = None  # in use
    hdop: float | None = None
    speed_mps: float | None = None  # over ground
    course_deg: float | None = None  # true
    fix_time: float | None = None

    def _check(self) -> None:
        if not isinstance(self.valid, bool):
            raise _bad(self, "valid", "must be a bool", self.valid)
        for name in ("lat", "lon", "alt_m", "hdop", "speed_mps", "course_deg", "fix_time"):
            _number(self, name, getattr(self, name), optional=True)
        for name, lo, hi in (("lat", -90, 90), ("lon", -180, 180), ("course_deg", 0, 360)):
            v = getattr(self, name)
            if v is not None and not lo <= v <= hi:
                raise _bad(self, name, f"must be within [{lo}, {hi}]", v)
        for name in ("hdop", "speed_mps"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise _bad(self, name, "must be >= 0", v)
        if self.quality not in (None, *range(9)):
            raise _bad(self, "quality", "must be a GGA fix quality 0-8 or None", self.quality)
        if self.fix_mode not in (None, 1, 2, 3):
            raise _bad(self, "fix_mode", "must be a GSA fix mode 1-3 or None", self.fix_mode)
        if self.satellites is not None:
            _count(self, "satellites", self.satellites)
        if self.valid and (self.lat is None or self.lon is None):
            raise _bad(self, "lat", "a valid position has lat and lon", (self.lat, self.lon))


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeScan(Reading):
    """One read of a barcode or 2-D code. `text`: the payload as scanned (without the AIM symbology
    identifier and the line end; GS1 separators kept as GS, 0x1D); `symbology`: the AIM identifier
    (']C1', ']E0', ']Q1', ...; '' when the scanner sent none) and `symbology_name` its name.

    `gs1`: the content is GS1 (element strings, a GTIN, or a GS1 Digital Link URI); then `ais` maps every
    Application Identifier to its value as scanned, and `gtin` (14 digits, check digit valid), `batch`
    (AI 10), `serial` (AI 21) and `expiry` (AI 17, ISO date; day 00 means the month's last day) are
    taken out. Anything else (a URL, a plain traceability code) is kept as `text`. `valid` False: a
    damaged read (a bad check digit, an AI whose value breaks its format, a bad date) that the
    scanner still passed on; `error` says what is wrong, and nothing in it is to be trusted but `text`."""

    KIND: ClassVar[str] = "code_scan"
    text: str
    symbology: str = ""
    symbology_name: str = "unknown"
    gs1: bool = False
    ais: Mapping[str, str] = field(default_factory=dict)
    gtin: str | None = None
    batch: str | None = None
    serial: str | None = None
    expiry: str | None = None
    valid: bool = True
    error: str | None = None

    def _check(self) -> None:
        for name in ("text", "symbology", "symbology_name"):
            if not isinstance(getattr(self, name), str):
                raise _bad(self, name, "must be a string", getattr(self, name))
        if self.symbology and not (len(self.symbology) >= 3 and self.symbology[0] == "]"):
            raise _bad(self, "symbology", "must be an AIM identifier like ']C1' or ''", self.symbology)
        if not isinstance(self.valid, bool) or self.valid == (self.error is not None):
            raise _bad(self, "error", "an invalid scan says why, a valid one has no error", self.error)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.ais.items()):
            raise _bad(self, "ais", "must map AI strings to value strings", self.ais)
        object.__setattr__(self, "ais", MappingProxyType(dict(self.ais)))
        from biip.checksums import gs1_standard_check_digit  # here: importing biip costs ~0.1 s, paid by scanners only

        if self.gtin is not None and (len(self.gtin) != 14 or not self.gtin.isdigit()
                                      or int(self.gtin[-1]) != gs1_standard_check_digit(self.gtin[:-1])):
            raise _bad(self, "gtin", "must be 14 digits with a valid check digit", self.gtin)
        if self.expiry is not None:
            try:
                date.fromisoformat(self.expiry)
            except (TypeError, ValueError):
                raise _bad(self, "expiry", "must be an ISO date YYYY-MM-DD", self.expiry) from None
        if (self.ais or self.gtin) and not self.gs1:
            raise _bad(self, "gs1", "a scan with GS1 data is a GS1 scan", self.gs1)

    @property
    def raw(self) -> str:
        """The line as the scanner sent it, without its CR / CR LF."""
        return self.symbology + self.text

    def expires(self) -> date | None:
        return None if self.expiry is None else date.fromisoformat(self.expiry)


def fits(produced: tuple[type[Reading], ...], wanted: tuple[type[Reading], ...]) -> bool:
    """True when a driver producing `produced` yields something of `wanted` (a subclass counts)."""
    return any(issubclass(p, w) for p in produced for w in wanted)


def type_names(types: tuple[type[Reading], ...], sep: str = ", ") -> str:
    """'Weight, Registers' for messages; 'nothing declared' for an empty tuple."""
    return sep.join(t.__name__ for t in types) or "nothing declared"


# --- radiation portal monitor ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class PortalOccupancy(Reading):
    """One occupancy of a radiation portal monitor (ANSI N42.35: a truck, a wagon or a belt segment in
    the portal), as an ANSI N42.42 document reports it. Counts are summed over the channel's detectors
    during the occupancy (`start`..`end`, UTC unix seconds); `*_cps` is the sum of the detectors' count
    rates, `*_background_cps` the same over the background measurement. A channel the portal does not
    have (or did not report) is None. `*_threshold_cps`: the alarm threshold when the document gives
    one. `detectors`: the names of the detectors whose counts are included; `alarms`: the portal's
    own alarm descriptions (RadAlarmDescription), in document order."""

    KIND: ClassVar[str] = "portal_occupancy"
    occupancy_id: str
    start: float
    end: float
    gamma_counts: float | None = None
    gamma_cps: float | None = None
    neutron_counts: float | None = None
    neutron_cps: float | None = None
    gamma_background_cps: float | None = None
    neutron_background_cps: float | None = None
    gamma_alarm: bool = False
    neutron_alarm: bool = False
    gamma_threshold_cps: float | None = None
    neutron_threshold_cps: float | None = None
    detectors: tuple[str, ...] = ()
    alarms: tuple[str, ...] = ()
    instrument: str = ""

    def _check(self) -> None:
        if not isinstance(self.occupancy_id, str) or not self.occupancy_id:
            raise _bad(self, "occupancy_id", "must be a non-empty string", self.occupancy_id)
        _number(self, "start", self.start)
        _number(self, "end", self.end)
        if self.end < self.start:
            raise _bad(self, "end", "must not be before start", (self.start, self.end))
        for name in ("gamma_counts", "gamma_cps", "neutron_counts", "neutron_cps", "gamma_background_cps",
                     "neutron_background_cps", "gamma_threshold_cps", "neutron_threshold_cps"):
            x = getattr(self, name)
            _number(self, name, x, optional=True)
            if x is not None and x < 0:
                raise _bad(self, name, "must be >= 0", x)
        for name in ("gamma_alarm", "neutron_alarm"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(self, name, "must be a bool", getattr(self, name))
        for name in ("detectors", "alarms"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(s, str) for s in v):
                raise _bad(self, name, "must be a tuple of strings", v)
        if not isinstance(self.instrument, str):
            raise _bad(self, "instrument", "must be a string", self.instrument)

    @property
    def alarm(self) -> bool:
        return self.gamma_alarm or self.neutron_alarm

    def evidence(self) -> dict[str, Any]:
        """What an alarm record carries: the occupancy, its counts, background and thresholds."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.name not in ("ts", "mono")}
