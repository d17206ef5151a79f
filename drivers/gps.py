"""GNSS receiver speaking NMEA 0183 (u-blox NEO-6M/M8 and alike: 9600 8N1, one burst of sentences a second).

Wire: `$TTSSS,field,...*hh` CR LF, at most 82 characters; hh = XOR of the characters between `$` and `*`
(../shared/PROTOCOLS.md). Sentences are parsed by pynmea2 with strict checksums: a bad or missing
checksum, a line that is not NMEA, or a sentence whose fields do not decode is counted corrupt and
skipped. Sentences of other types (GSV, VTG, GLL, TXT, ZDA, proprietary) are valid frames, counted as
`other`, and not used.

An epoch is the GGA, RMC and GSA sentences of one fix time. It is yielded as one Position when the
next epoch starts (a GGA or RMC with another time, or a second GGA or RMC) or when the line falls idle
for a read timeout after the burst, whichever comes first. A receiver without a fix keeps sending
sentences with empty fields: each such epoch is a Position with valid=False, so the app sees the fix
lost as it happens and its age grow; `fix_lost` and `fix_regained` count the transitions. A receiver
that stops sending altogether is a DriverSilent after `silent_after_s`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import pynmea2
import serial
from pydantic import Field

from customs_edge.core.readings import Position, Reading, ReadingError
from customs_edge.drivers.base import SerialPortConfig, StreamSerialDriver

MAX_SENTENCE = 82  # NMEA 0183: '$' to LF inclusive
KNOT_MPS = 1852 / 3600
VALID_QUALITY = range(1, 6)  # GPS, DGPS, PPS, RTK fixed, RTK float: measured fixes


def _num(x: Any) -> float | None:
    return float(x) if x not in (None, "") else None


def _times_read(msg: pynmea2.NMEASentence) -> bool:
    """False when a time or date field does not decode (pynmea2 then hands back its text)."""
    if isinstance(msg, pynmea2.GGA | pynmea2.RMC) and not isinstance(msg.timestamp, dt.time | None):
        return False
    return not isinstance(msg, pynmea2.RMC) or isinstance(msg.datestamp, dt.date | None)


class NmeaParser:
    """Incremental line parser: complete sentences out of bytes, checksum-checked by pynmea2.
    Counters: frames (good sentences of any type), corrupt, other (good but not GGA/RMC/GSA)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.frames = 0
        self.corrupt = 0
        self.other = 0

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> pynmea2.NMEASentence | None:
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > 4 * MAX_SENTENCE:  # no line end in sight: noise, keep the tail
                    self.corrupt += 1
                    start = self.buf.rfind(b"$")
                    del self.buf[: start if start > 0 else len(self.buf)]
                return None
            line = bytes(self.buf[: end + 1])
            del self.buf[: end + 1]
            start = line.rfind(b"$")  # a sentence cut by line noise: resynchronise on the last '$'
            if (line if start < 0 else line[:start]).strip():
                self.corrupt += 1
            if start < 0:
                continue
            line = line[start:]
            if len(line) > MAX_SENTENCE:
                self.corrupt += 1
                continue
            try:
                msg = pynmea2.parse(line.decode("ascii").strip(), check=True)
            except pynmea2.SentenceTypeError:
                self.frames += 1  # a good sentence of a type pynmea2 does not know (proprietary)
                self.other += 1
                continue
            except (pynmea2.ParseError, UnicodeDecodeError):
                self.corrupt += 1
                continue
            if not _times_read(msg):
                self.corrupt += 1
                continue
            self.frames += 1
            if isinstance(msg, pynmea2.GGA | pynmea2.RMC | pynmea2.GSA):
                return msg
            self.other += 1


class Epoch:
    """The sentences of one fix time, collected until the next epoch starts."""

    def __init__(self) -> None:
        self.time: dt.time | None = None
        self.gga: pynmea2.GGA | None = None
        self.rmc: pynmea2.RMC | None = None
        self.gsa: pynmea2.GSA | None = None

    @property
    def empty(self) -> bool:
        return self.gga is None and self.rmc is None

    def takes(self, msg: pynmea2.NMEASentence) -> bool:
        """False when `msg` belongs to the next epoch."""
        if isinstance(msg, pynmea2.GSA):
            return True
        if (self.gga if isinstance(msg, pynmea2.GGA) else self.rmc) is not None:
            return False  # a second GGA (or RMC): a new epoch, even when neither has a time
        return self.empty or msg.timestamp == self.time

    def add(self, msg: pynmea2.NMEASentence) -> None:
        if isinstance(msg, pynmea2.GSA):
            self.gsa = self.gsa or msg  # several (one per constellation) share the fix mode and DOPs
            return
        if isinstance(msg, pynmea2.GGA):
            self.gga = msg
        else:
            self.rmc = msg
        self.time = msg.timestamp

    def position(self, role: str, date: dt.date | None) -> Position:
        """The merged Position; ValueError or ReadingError when a field does not decode to what it means."""
        gga, rmc, gsa = self.gga, self.rmc, self.gsa
        quality = int(gga.gps_qual or 0) if gga is not None else None
        valid = (quality is None or quality in VALID_QUALITY) and (rmc is None or rmc.status == "A")
        has = gga if gga is not None and gga.lat and gga.lon else rmc if rmc is not None and rmc.lat else None
        lat, lon = (float(has.latitude), float(has.longitude)) if has is not None else (None, None)
        fix_time = None
        if self.time is not None and date is not None:
            fix_time = dt.datetime.combine(date, self.time.replace(tzinfo=dt.UTC)).timestamp()
        speed = _num(rmc.spd_over_grnd) if rmc is not None else None
        return Position(
            source=role, valid=valid and lat is not None, lat=lat, lon=lon,
            alt_m=_num(gga.altitude) if gga is not None else None,
            quality=quality,
            fix_mode=int(gsa.mode_fix_type) if gsa is not None and gsa.mode_fix_type else None,
            satellites=int(gga.num_sats) if gga is not None and gga.num_sats else None,
            hdop=_num(gga.horizontal_dil) if gga is not None else _num(gsa.hdop) if gsa is not None else None,
            speed_mps=None if speed is None else speed * KNOT_MPS,
            course_deg=_num(rmc.true_course) if rmc is not None else None,
            fix_time=fix_time,
        )


class NmeaGpsConfig(SerialPortConfig):
    driver: Literal["nmea-gps"] = "nmea-gps"
    baudrate: int = Field(9600, gt=0, description="NMEA 0183 receivers default to 9600 (some 4800 or 38400)")
    silent_after_s: float = Field(5.0, gt=0, description="no valid sentence for this long is a fault")


class NmeaGps(StreamSerialDriver):
    """GNSS receiver, NMEA 0183. Yields one Position per epoch (valid=False while there is no fix)."""

    Config = NmeaGpsConfig
    PRODUCES = (Position,)
    config: NmeaGpsConfig
    parser: NmeaParser

    def __init__(self, role: str, config: NmeaGpsConfig) -> None:
        super().__init__(role, config)
        self.parser = NmeaParser()  # counters accumulate across reopens
        self._epoch = Epoch()
        self._date: dt.date | None = None  # from the last RMC: GGA carries only the time of day
        self._had_fix: bool | None = None
        self._idle = False
        for key in ("other", "fix_lost", "fix_regained"):
            self.stats.extra[key] = 0

    def open(self) -> None:
        self._epoch = Epoch()  # an epoch cut by a reconnect is not continued
        super().open()

    def _finish(self) -> Position | None:
        epoch, self._epoch = self._epoch, Epoch()
        if epoch.empty:
            return None
        if epoch.rmc is not None and epoch.rmc.datestamp is not None:
            self._date = epoch.rmc.datestamp
        try:
            pos = epoch.position(self.role, self._date)
        except (ValueError, TypeError, ReadingError):
            self.parser.corrupt += 1  # sentences with good checksums whose fields are not what they say
            self.stats.corrupt = self.parser.corrupt
            return None
        if self._had_fix is not None and pos.valid != self._had_fix:
            self.stats.extra["fix_regained" if pos.valid else "fix_lost"] += 1
        self._had_fix = pos.valid
        return pos

    def _next(self) -> Position | None:
        while True:
            msg = self.parser.next()
            self.stats.frames, self.stats.corrupt = self.parser.frames, self.parser.corrupt
            self.stats.extra["other"] = self.parser.other
            if msg is None:
                return None
            done = None if self._epoch.takes(msg) else self._finish()
            self._epoch.add(msg)
            if done is not None:
                return done

    def _read_chunk(self, port: serial.SerialBase) -> bytes:
        data = super()._read_chunk(port)
        self._idle = not data
        return data

    def read(self) -> Reading | None:
        reading = super().read()
        if reading is None and self._idle:  # the burst is over: the epoch is complete
            reading = self._finish()
            if reading is not None:
                self._watch.reset()
        return reading
