"""Lane passage sensor: a beam (or door-contact) controller that reports entries and exits as ASCII lines.

Protocol (what a small beam-controller board sends, 9600 8N1, one event per line, CR LF):
  IN,<n>\\r\\n     a traveller broke the entry beam; n = the controller's entry counter (0..999999, wraps)
  OUT,<n>\\r\\n    a traveller broke the exit beam; n = the exit counter
  HB,<in>,<out>\\r\\n   heartbeat once a second with both counters, so an empty lane is not a dead one
The counters let the driver notice lost lines: a jump of k > 1 is reported as `lost` = k - 1 (the
events still happened; the app counts them). Lines that do not parse are counted as corrupt.
Yields Passage(event='entry'|'exit', count=n, lost=k) per event and PassageHeartbeat(entries=in,
exits=out) per heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from customs_edge.core.readings import Passage, PassageHeartbeat
from customs_edge.drivers.base import SerialPortConfig, StreamSerialDriver

WRAP = 1_000_000
MAX_LINE = 64
EVENTS = {"IN": "entry", "OUT": "exit"}


@dataclass(frozen=True, slots=True)
class PassageEvent:
    kind: Literal["entry", "exit", "heartbeat"]
    count: int  # for heartbeats: the entry counter
    exits: int = 0  # heartbeats only
    lost: int = 0  # events the counter says were not received as lines


def encode_event(kind: Literal["entry", "exit"], count: int) -> bytes:
    tag = "IN" if kind == "entry" else "OUT"
    return f"{tag},{count % WRAP}\r\n".encode()


def encode_heartbeat(entries: int, exits: int) -> bytes:
    return f"HB,{entries % WRAP},{exits % WRAP}\r\n".encode()


def decode_line(line: bytes) -> tuple[str, list[int]] | None:
    """('IN'|'OUT'|'HB', numbers) or None when the line is not in the protocol."""
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    tag, _, rest = text.partition(",")
    parts = rest.split(",") if rest else []
    if tag not in ("IN", "OUT", "HB") or len(parts) != (2 if tag == "HB" else 1):
        return None
    if not all(p.isdigit() and len(p) <= 6 for p in parts):
        return None
    return tag, [int(p) for p in parts]


class PassageParser:
    """Incremental line parser with counters: frames (valid lines), corrupt (bad lines), lost (events
    the controller counted that never arrived as lines)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.frames = 0
        self.corrupt = 0
        self.lost = 0
        self._last: dict[str, int | None] = {"IN": None, "OUT": None}

    def feed(self, data: bytes) -> None:
        self.buf += data

    def _gap(self, tag: str, n: int) -> int:
        last = self._last[tag]
        self._last[tag] = n
        if last is None:
            return 0
        step = (n - last) % WRAP
        return step - 1 if 1 < step < 1000 else 0  # a restart (counter reset) is not a loss

    def next(self) -> PassageEvent | None:
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > MAX_LINE:  # no line end in sight: noise
                    self.corrupt += 1
                    self.buf.clear()
                return None
            line = bytes(self.buf[: end + 1])
            del self.buf[: end + 1]
            if not line.strip():
                continue
            parsed = decode_line(line)
            if parsed is None:
                self.corrupt += 1
                continue
            self.frames += 1
            tag, nums = parsed
            if tag == "HB":
                return PassageEvent("heartbeat", nums[0], nums[1])
            lost = self._gap(tag, nums[0])
            self.lost += lost
            return PassageEvent("entry" if tag == "IN" else "exit", nums[0], lost=lost)


class PassageConfig(SerialPortConfig):
    driver: Literal["passage"] = "passage"
    silent_after_s: float = Field(5.0, gt=0, description="no line (not even a heartbeat) for this long is a fault")


class PassageSensor(StreamSerialDriver):
    """Entry/exit beam controller. Yields Passage and PassageHeartbeat."""

    Config = PassageConfig
    PRODUCES = (Passage, PassageHeartbeat)
    config: PassageConfig
    parser: PassageParser

    def __init__(self, role: str, config: PassageConfig) -> None:
        super().__init__(role, config)
        self.parser = PassageParser()  # counters accumulate across reopens

    def _next(self) -> Passage | PassageHeartbeat | None:
        ev = self.parser.next()
        self.stats.frames, self.stats.corrupt = self.parser.frames, self.parser.corrupt
        self.stats.extra["lost"] = self.parser.lost
        if ev is None:
            return None
        if ev.kind == "heartbeat":
            return PassageHeartbeat(source=self.role, entries=ev.count, exits=ev.exits)
        return Passage(source=self.role, event=ev.kind, count=ev.count, lost=ev.lost)
