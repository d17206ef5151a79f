"""The Driver interface, shared config pieces, and the helpers every serial driver needs.

A driver is small: `open()`, `read()` (one decoded Reading, or None when nothing complete arrived
within its read timeout), `close()`, counters in `stats`, and `PRODUCES`: the reading types (see
core/readings.py) read() yields, which the config loader matches against what the app consumes.
It never sleeps to pace itself beyond its own polling interval and never swallows a fault: a silent
or unplugged instrument raises DriverFault, and the runtime reports it and reopens with backoff.
"""

from __future__ import annotations

import termios
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import serial
from pydantic import BaseModel, ConfigDict, Field, field_validator

from customs_edge.core.errors import DriverFault, DriverSilent
from customs_edge.core.readings import Reading


class DriverConfig(BaseModel):
    """Every driver's config has `driver` (its registry name). Subclasses forbid unknown keys."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    driver: str


class SerialPortConfig(DriverConfig):
    """Shared by every serial instrument. `port` is a pyserial URL: /dev/ttyUSB0 in the field,
    /dev/pts/N or socket://127.0.0.1:N from a simulator, spy://... to hex-dump the traffic."""

    port: str = Field(min_length=1, description="device path or pyserial URL")
    baudrate: int = Field(9600, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: float = Field(1, description="1, 1.5 or 2")
    read_timeout_s: float = Field(0.2, gt=0, le=10)

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, v: float) -> float:
        if v not in (1, 1.5, 2):
            raise ValueError("stopbits must be 1, 1.5 or 2")
        return v

    silent_after_s: float = Field(5.0, gt=0, description="no valid frame for this long is a fault")


@dataclass
class DriverStats:
    frames: int = 0  # valid frames decoded
    corrupt: int = 0  # frames dropped for a bad checksum, length or field
    bytes_in: int = 0
    faults: int = 0  # DriverFaults raised (silence, unplugged, refused): each driver counts its own
    opened: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "corrupt": self.corrupt, "bytes_in": self.bytes_in,
                "faults": self.faults, "opened": self.opened, **self.extra}


class Driver(ABC):
    """Subclasses set `Config` to their pydantic config model and `PRODUCES` to the reading types
    read() yields, and implement the three methods."""

    Config: ClassVar[type[DriverConfig]]
    PRODUCES: ClassVar[tuple[type[Reading], ...]] = ()

    @classmethod
    def produces(cls, config: DriverConfig) -> tuple[type[Reading], ...]:
        """The reading types this driver yields with `config`: PRODUCES, unless a setting changes them."""
        return cls.PRODUCES

    def __init__(self, role: str, config: DriverConfig) -> None:
        self.role = role
        self.config = config
        self.stats = DriverStats()

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> Reading | None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Driver:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_serial(cfg: SerialPortConfig) -> serial.SerialBase:
    """Open any pyserial URL with the configured line settings; DriverFault if it cannot be opened.

    Local devices (a path, or spy:// around one) are opened exclusively (flock): a second opener, in
    this process or another, is refused instead of becoming a second master on the line. socket://
    and loop:// ignore the flag."""
    try:
        return serial.serial_for_url(
            cfg.port, baudrate=cfg.baudrate, bytesize=cfg.bytesize, parity=cfg.parity,
            stopbits=cfg.stopbits, timeout=cfg.read_timeout_s, write_timeout=cfg.read_timeout_s,
            exclusive=True,
        )
    except (serial.SerialException, OSError, ValueError, termios.error) as exc:
        # termios.error is not an OSError: a pty refusing a line setting (e.g. parity) raises it
        held = " (another driver or process has the port open: one master per line)" \
            if "exclusively lock" in str(exc) else ""
        raise DriverFault(f"cannot open {cfg.port}: {exc}{held}") from exc


def poll_due(due: float, interval: float, max_wait: float) -> float | None:
    """For drivers that poll on a schedule: sleep toward the poll due at `due` (monotonic) for at most
    `max_wait`, so read() stays bounded. Returns the next due time when the poll is due now, else None."""
    wait = due - time.monotonic()
    if wait > 0:
        time.sleep(min(wait, max_wait))
        if due > time.monotonic():
            return None
    return max(due + interval, time.monotonic())


class SilenceWatch:
    """Raises DriverSilent when no valid frame was seen for `after_s` seconds since open or last frame."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.last = time.monotonic()

    def reset(self) -> None:
        self.last = time.monotonic()

    def check(self, what: str) -> None:
        idle = time.monotonic() - self.last
        if idle > self.after_s:
            self.last = time.monotonic()  # report once per window, not on every read
            raise DriverSilent(f"{what}: no valid frame for {idle:.1f} s")


class SerialDriver(Driver):
    """Base for every instrument on one serial line (any pyserial URL): opens it with the configured
    line settings and drops stale input, closes it, counts faults, and watches for silence."""

    config: SerialPortConfig
    # `customs-edge probe` sees the wire through this: it wraps the port as it opens, so the reset of the
    # input buffer and the start-up commands are shown too (cli/probe.py's Spy)
    spy: Callable[[serial.SerialBase], serial.SerialBase] | None = None

    def __init__(self, role: str, config: DriverConfig) -> None:
        super().__init__(role, config)
        self._port: serial.SerialBase | None = None
        self._socket = False
        self._watch = SilenceWatch(self.config.silent_after_s)

    def _on_open(self, port: serial.SerialBase) -> None:
        """Hook: send start-up commands (e.g. 'start automatic output')."""

    def open(self) -> None:
        try:
            self._port = open_serial(self.config)
            if self.spy is not None:
                self._port = self.spy(self._port)
            self._port.reset_input_buffer()  # stale bytes queued while nobody listened
        except DriverFault:
            self.stats.faults += 1
            raise
        except (serial.SerialException, OSError) as exc:
            self.stats.faults += 1
            raise DriverFault(f"{self.role}: {self.config.port}: {exc}") from exc
        self._socket = self.config.port.startswith("socket://")
        self.stats.opened += 1
        self._watch.reset()
        self._on_open(self._port)

    def close(self) -> None:
        if self._port is not None:
            try:
                self._port.close()
            finally:
                self._port = None

    def _require_port(self) -> serial.SerialBase:
        if self._port is None:
            raise DriverFault(f"{self.role}: port not open")
        return self._port

    def _io_fault(self, exc: BaseException, what: str = "I/O error") -> DriverFault:
        """Count a failed exchange and describe it; the caller raises it `from exc`."""
        self.stats.faults += 1
        return DriverFault(f"{self.role}: {what} on {self.config.port}: {exc}")

    def _check_silence(self) -> None:
        try:
            self._watch.check(f"{self.role} on {self.config.port}")
        except DriverSilent:
            self.stats.faults += 1
            raise


class FrameParser(Protocol):
    """An incremental parser: bytes in with feed(), its pending bytes in `buf`."""

    buf: bytearray

    def feed(self, data: bytes) -> None: ...


class StreamSerialDriver(SerialDriver):
    """Base for instruments that stream frames unasked (Toledo continuous, MLX90640 automatic output,
    analyser result blocks, passage lines, NMEA, barcodes). A subclass creates `self.parser` once in
    __init__ (so its counters accumulate across reopens) and turns what it parsed into Readings in `_next`."""

    parser: FrameParser

    def open(self) -> None:
        self.parser.buf.clear()  # a frame cut by a reconnect is not continued
        super().open()

    def _feed(self, data: bytes) -> None:
        self.parser.feed(data)

    @abstractmethod
    def _next(self) -> Reading | None:
        """The next complete Reading the parser holds, or None."""

    def read(self) -> Reading | None:
        reading = self._next()
        if reading is not None:
            self._watch.reset()
            return reading
        port = self._require_port()
        try:
            data = self._read_chunk(port)
        except (serial.SerialException, OSError) as exc:
            raise self._io_fault(exc, "read failed") from exc
        if data:
            self.stats.bytes_in += len(data)
            self._feed(data)
            reading = self._next()
            if reading is not None:
                self._watch.reset()
                return reading
        self._check_silence()
        return None

    def _read_chunk(self, port: serial.SerialBase) -> bytes:
        """What has arrived, waiting up to read_timeout_s for the first byte."""
        waiting = port.in_waiting
        if waiting > 1:
            return bytes(port.read(waiting))
        data = bytes(port.read(1))
        if data and self._socket:
            # pyserial's socket:// reports in_waiting as 0 or 1: take what is queued without waiting
            port.timeout = 0
            try:
                data += port.read(65536)
            finally:
                port.timeout = self.config.read_timeout_s
        return data
