"""Modbus masters for instruments on an RS-485 line (`modbus-rtu`) or on Ethernet (`modbus-tcp`): belt
weigher, microwave moisture analyser, belt state and radiation portal PLC. Several slaves (units) may
share a line or a server; each has its own register map in the config (table, address, data type, byte
order, scale, offset, range, unit) and poll interval. Everything but the transport is shared
(ModbusMaster): polling, retries, the checks of a reply PDU against its request, decoding.

RTU wire: [slave id][function][data][CRC-16 low byte first], poly 0xA001, init 0xFFFF. TCP wire: MBAP
header [transaction id][protocol 0][length][unit id], then the same PDU. The PDUs are encoded and
decoded by pymodbus (`pymodbus.pdu`), the CRC by pymodbus's RTU framer. The transaction loops are ours,
RTU over `serial.serial_for_url` (so the same code talks to /dev/ttyUSB0, a simulator's pty or an
RTU-over-TCP gateway, socket://), TCP over a plain socket, so a timeout, a CRC error, a reply from the
wrong slave or transaction and an exception response are told apart and counted (pymodbus's own client
folds them into one "no response").

Readings (one per slave poll):
  Registers   slave, slave_id, points = {<point name>: Point(scaled value, unit, error), ...}
  SlaveError  slave, slave_id, error (text), consecutive (failed polls in a row)
A value that decodes to NaN or inf, or falls outside the point's declared `range`, is a Point without
a value and with its `error` (counted: `non_finite`, `out_of_range`); the apps' number()/flag() give None.
A poll retries a timeout or CRC error `retries` times, then reports `slave_error`; an exception
response is not retried (the slave did answer) except 'device busy'. RTU has no transaction id, so a
reply is checked against its request (slave id, function code, byte count), and after any failed
exchange the line is drained: bytes are read and discarded until it has been silent for 3.5
character times, waiting up to `drain_s` for a late reply to begin. A slave that always answers
after the timeout then fails every poll as a timeout instead of handing one register's value to
the next request. TCP matches each reply's transaction id to its request's (see ModbusTcp). When EVERY
slave has failed `fail_after` polls in a row the line is presumed dead (cable, converter, power,
server) and read() raises DriverFault: the runtime reports it and reopens the port with backoff.
"""

from __future__ import annotations

import math
import socket
import struct
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import serial
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pymodbus.framer.rtu import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsRequest, ReadDiscreteInputsRequest
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, ReadInputRegistersRequest

from customs_edge.core.errors import DriverFault
from customs_edge.core.readings import Point, Registers, SlaveError
from customs_edge.drivers.base import Driver, DriverConfig, SerialDriver, SerialPortConfig, poll_due

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["uint16", "int16", "uint32", "int32", "float32", "uint64", "int64", "float64", "bool"]

FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
REQUEST: dict[str, type[ModbusPDU]] = {
    "coil": ReadCoilsRequest, "discrete": ReadDiscreteInputsRequest,
    "holding": ReadHoldingRegistersRequest, "input": ReadInputRegistersRequest,
}
WORDS = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2, "uint64": 4, "int64": 4, "float64": 4,
         "bool": 1}
STRUCT = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f",
          "uint64": ">Q", "int64": ">q", "float64": ">d"}
MAX_REGISTERS = 125  # per read request (Modbus spec)
MAX_BITS = 2000
EXCEPTIONS = {1: "illegal function", 2: "illegal data address", 3: "illegal data value",
              4: "slave device failure", 5: "acknowledge", 6: "slave device busy",
              8: "memory parity error", 10: "gateway path unavailable", 11: "gateway target failed to respond"}


def crc16(data: bytes) -> bytes:
    """Modbus CRC-16 as it goes on the wire (low byte first)."""
    return FramerRTU.compute_CRC(data).to_bytes(2, "big")


def orders(nbytes: int) -> dict[str, str]:
    """The byte layouts a value of `nbytes` may have on the wire, by name: letters name the value's bytes
    from the most significant (A) and stand in the order they are sent. Four per width: as is (ABCD),
    words swapped (CDAB), bytes swapped in each word (BADC), both (DCBA); for 64 bits ABCDEFGH,
    GHEFCDAB, BADCFEHG, HGFEDCBA. `big` and `little` are the config's older names for the first two."""
    plain = "ABCDEFGH"[:nbytes]
    words = [plain[i:i + 2] for i in range(0, nbytes, 2)]
    swapped = "".join(w[::-1] for w in words)
    return {plain: plain, "".join(words[::-1]): "".join(words[::-1]), swapped: swapped, plain[::-1]: plain[::-1],
            "big": plain, "little": "".join(words[::-1])}


def layout(dtype: DataType, word_order: str) -> str:
    """The letters for `word_order` on a value of `dtype`; ValueError naming the valid ones."""
    valid = orders(2 * WORDS[dtype])
    if word_order not in valid:
        raise ValueError(f"word_order {word_order!r} does not fit a {dtype}: use one of {', '.join(valid)}")
    return valid[word_order]


def encode_value(dtype: DataType, value: float | int | bool, word_order: str = "big") -> list[int]:
    """Registers (or one bit as 0/1) holding `value` in `dtype`: the inverse of decode_value."""
    if dtype == "bool":
        return [1 if value else 0]
    raw = struct.pack(STRUCT[dtype], float(value) if dtype.startswith("float") else int(value))
    wire = bytes(raw[ord(c) - 65] for c in layout(dtype, word_order))
    return [int.from_bytes(wire[i:i + 2], "big") for i in range(0, len(wire), 2)]


def decode_value(dtype: DataType, words: list[int], word_order: str = "big") -> float | int | bool:
    """The value `words` (as read, each register big-endian as Modbus sends it) hold in `dtype`."""
    if dtype == "bool":
        return bool(words[0])
    wire = b"".join(w.to_bytes(2, "big") for w in words)
    order = layout(dtype, word_order)
    value: float | int = struct.unpack(STRUCT[dtype], bytes(wire[order.index(c)] for c in sorted(order)))[0]
    return value


class PointConfig(BaseModel):
    """One value in a slave's register map. value = raw * scale + offset (raw as `type` decodes it);
    a value outside `range` (or not finite) is flagged on its Point, never taken."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    table: Table = "holding"
    address: int = Field(ge=0, le=65535, description="0-based protocol address (40001 -> 0)")
    type: DataType = "uint16"
    word_order: str = Field("big", description=(
        "byte layout of values wider than 16 bits: ABCD (big, default), CDAB (little: low word first), "
        "BADC, DCBA; for 64 bits ABCDEFGH, GHEFCDAB, BADCFEHG, HGFEDCBA; AB or BA for 16 bits"))
    scale: float = 1.0
    offset: float = 0.0
    range: tuple[float, float] | None = Field(None, description="[min, max] of value after scale and offset")
    unit: str | None = None

    @model_validator(mode="after")
    def _fits(self) -> PointConfig:
        bit_table = self.table in ("coil", "discrete")
        if bit_table != (self.type == "bool"):
            raise ValueError(f"{self.name}: coils/discrete inputs take type 'bool'; registers take a number type")
        if self.type != "bool":
            try:
                layout(self.type, self.word_order)
            except ValueError as exc:
                raise ValueError(f"{self.name}: {exc}") from None
        elif self.range is not None:
            raise ValueError(f"{self.name}: a bool point has no range")
        if self.range is not None and not self.range[0] <= self.range[1]:
            raise ValueError(f"{self.name}: range is [min, max] with min <= max, got {list(self.range)}")
        return self


class SlaveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    id: int = Field(ge=0, le=255, description="slave address on the RS-485 line (1-247), or Modbus TCP unit id")
    poll_interval_s: float = Field(1.0, gt=0, le=3600)
    points: list[PointConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> SlaveConfig:
        names = [p.name for p in self.points]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"slave {self.name}: point names repeated: {sorted(dup)}")
        return self


class ModbusPolling(DriverConfig):
    """What every Modbus master polls, whatever the transport."""

    read_timeout_s: float = Field(0.3, gt=0, le=10, description="response timeout per request")
    retries: int = Field(2, ge=0, le=10, description="re-sends after a timeout or CRC error")
    fail_after: int = Field(3, ge=1, description="failed polls in a row, on every slave, before DriverFault")
    slaves: list[SlaveConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ModbusPolling:
        names = [s.name for s in self.slaves]
        ids = [s.id for s in self.slaves]
        if len(set(names)) != len(names) or len(set(ids)) != len(ids):
            raise ValueError(f"slave names and ids must be unique on a line (names {names}, ids {ids})")
        return self


class ModbusRtuConfig(SerialPortConfig, ModbusPolling):
    driver: Literal["modbus-rtu"] = "modbus-rtu"
    parity: Literal["N", "E", "O", "M", "S"] = "E"  # Modbus RTU default is 8E1
    read_timeout_s: float = Field(0.3, gt=0, le=10, description="response timeout per request")
    drain_s: float | None = Field(None, gt=0, le=10, description=(
        "after a failed request, wait this long for a late reply to begin and discard it "
        "(default: read_timeout_s)"))

    @model_validator(mode="after")
    def _rtu_ids(self) -> ModbusRtuConfig:
        bad = [s.id for s in self.slaves if not 1 <= s.id <= 247]
        if bad:
            raise ValueError(f"slave ids on an RTU line are 1-247, got {bad}")
        return self


class ModbusTcpConfig(ModbusPolling):
    """Modbus TCP: `host` (and `port`, default 502), or `port: tcp://host:port`. Normalised so that
    `port` is always the URL (what the runtime holds exclusively, and what messages name)."""

    driver: Literal["modbus-tcp"] = "modbus-tcp"
    host: str | None = Field(None, min_length=1, description="server host name or address (with `port`)")
    port: str = Field(description="tcp://host:port, or the TCP port number (default 502) with `host`")

    @model_validator(mode="before")
    @classmethod
    def _host_port(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        host, port = data.get("host"), data.get("port")
        if host is None:
            if port is None or isinstance(port, int):
                raise ValueError("modbus-tcp needs `host` (and `port`, default 502) or `port: tcp://host:port`")
            return data
        if isinstance(port, str) and "://" in port:
            raise ValueError("give `host` with a port number, or `port: tcp://host:port` without `host`, not both")
        host = f"[{host}]" if ":" in str(host) else host
        return {**data, "port": f"tcp://{host}:{502 if port is None else port}"}

    @field_validator("port")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            u = urlsplit(v)
            ok = u.scheme == "tcp" and bool(u.hostname) and u.port is not None and u.path in ("", "/")
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"port {v!r} is not tcp://host:port (e.g. tcp://192.168.0.10:502)")
        return v

    @property
    def address(self) -> tuple[str, int]:
        u = urlsplit(self.port)
        assert u.hostname is not None and u.port is not None  # checked by _url
        return u.hostname, u.port


@dataclass(frozen=True)
class Block:
    """One read request: contiguous span of a table covering one or more points."""

    table: Table
    address: int
    count: int
    points: tuple[PointConfig, ...]


def plan_blocks(points: list[PointConfig]) -> list[Block]:
    """Group points into as few read requests as the spec's size limits allow (gaps are read too,
    up to 8 unused registers, which is cheaper than another request on a 9600-baud line)."""
    blocks: list[Block] = []
    tables: tuple[Table, ...] = ("holding", "input", "coil", "discrete")
    for table in tables:
        pts = sorted((p for p in points if p.table == table), key=lambda p: p.address)
        limit = MAX_BITS if table in ("coil", "discrete") else MAX_REGISTERS
        cur: list[PointConfig] = []
        start = end = 0
        for p in pts:
            p_end = p.address + WORDS[p.type]
            if cur and (p.address - end > 8 or p_end - start > limit):
                blocks.append(Block(table, start, end - start, tuple(cur)))
                cur = []
            if not cur:
                start, end = p.address, p_end
            cur.append(p)
            end = max(end, p_end)
        if cur:
            blocks.append(Block(table, start, end - start, tuple(cur)))
    return blocks


class ModbusError(Exception):
    """One failed request. `kind`: timeout, crc, exception, wrong_slave, malformed."""

    def __init__(self, kind: str, detail: str, code: int | None = None) -> None:
        self.kind, self.code = kind, code
        super().__init__(detail)


def request_pdu(block: Block) -> bytes:
    """The read request's PDU (function code and data), encoded by pymodbus: the same on every transport."""
    pdu = REQUEST[block.table](address=block.address, count=block.count)
    return bytes([pdu.function_code]) + pdu.encode()


def build_request(slave: int, block: Block) -> bytes:
    """The RTU frame of a read request: slave id, PDU, CRC."""
    body = bytes([slave]) + request_pdu(block)
    return body + crc16(body)


def data_length(block: Block) -> int:
    """Bytes of data in a normal reply to a read of `block` (the reply's byte count)."""
    return (block.count + 7) // 8 if block.table in ("coil", "discrete") else 2 * block.count


def expected_length(block: Block) -> int:
    """Total RTU length of a normal reply to a read of `block`: id, fc, byte count, data, CRC."""
    return 5 + data_length(block)


class SlaveState:
    def __init__(self, cfg: SlaveConfig) -> None:
        self.cfg = cfg
        self.blocks = plan_blocks(cfg.points)
        self.next_due = 0.0
        self.consecutive_failures = 0


class ModbusMaster(Driver):
    """What every Modbus master does whatever the transport: polls each configured slave at its
    interval (one Registers or SlaveError per poll), retries, checks and decodes reply PDUs, turns
    registers into points. A transport implements `transact` (one request, its reply PDU)."""

    PRODUCES = (Registers, SlaveError)
    config: ModbusPolling
    retry_pause_s = 0.0

    def __init__(self, role: str, config: DriverConfig) -> None:
        super().__init__(role, config)
        self._slaves = [SlaveState(s) for s in self.config.slaves]
        self._decoder = DecodePDU(is_server=False)
        for key in ("timeouts", "exceptions", "wrong_slave", "wrong_count", "retries", "slave_errors",
                    "out_of_range", "non_finite"):
            self.stats.extra[key] = 0

    @abstractmethod
    def transact(self, slave_id: int, block: Block) -> ModbusPDU:
        """Send one read request, return the decoded reply PDU; ModbusError for a failed exchange."""

    @abstractmethod
    def _require_open(self) -> None:
        """DriverFault unless the transport is open."""

    def _restart_schedule(self) -> None:
        now = time.monotonic()
        for s in self._slaves:
            s.next_due = now
            s.consecutive_failures = 0

    def read(self) -> Registers | SlaveError | None:
        self._require_open()
        slave = min(self._slaves, key=lambda s: s.next_due)
        due = poll_due(slave.next_due, slave.cfg.poll_interval_s, self.config.read_timeout_s)
        if due is None:
            return None
        slave.next_due = due
        return self.poll(slave)

    def poll(self, slave: SlaveState) -> Registers | SlaveError:
        points: dict[str, Point] = {}
        try:
            for block in slave.blocks:
                points.update(self._read_block(slave.cfg.id, block))
        except ModbusError as exc:
            slave.consecutive_failures += 1
            self.stats.extra["slave_errors"] += 1
            if all(s.consecutive_failures >= self.config.fail_after for s in self._slaves):
                self.stats.faults += 1
                for s in self._slaves:
                    s.consecutive_failures = 0  # one fault per dead spell; the runtime reopens
                raise DriverFault(f"{self.role} on {self.where}: no slave answers (last: slave "
                                  f"{slave.cfg.id} {slave.cfg.name}: {exc})") from exc
            return SlaveError(source=self.role, slave=slave.cfg.name, slave_id=slave.cfg.id,
                              error=f"{exc.kind}: {exc}", consecutive=slave.consecutive_failures)
        slave.consecutive_failures = 0
        self.stats.frames += 1
        return Registers(points=points, source=self.role, slave=slave.cfg.name, slave_id=slave.cfg.id)

    @property
    def where(self) -> str:
        return str(getattr(self.config, "port", self.role))

    def _read_block(self, slave_id: int, block: Block) -> dict[str, Point]:
        """One request with retries; decoded, scaled, checked points."""
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            if attempt:
                self.stats.extra["retries"] += 1
            try:
                pdu = self.transact(slave_id, block)
            except ModbusError as exc:
                retry = exc.kind in ("timeout", "crc", "wrong_slave", "malformed") or exc.code == 6
                if not retry or attempt == attempts - 1:
                    raise
                time.sleep(self.retry_pause_s)
                continue
            return self._points(block, pdu)
        raise AssertionError("unreachable")

    def _check_pdu(self, slave_id: int, block: Block, pdu: bytes) -> ModbusPDU:
        """The reply PDU (function code onward) to a read of `block`, checked against the request and
        decoded by pymodbus; ModbusError (counted) for another function's reply, a wrong byte count, an
        undecodable PDU or an exception response."""
        fc = FUNCTION[block.table]
        if not pdu or (pdu[0] & 0x7F) != fc:
            self.stats.corrupt += 1
            self.stats.extra["wrong_slave"] += 1
            raise ModbusError("wrong_slave", f"asked slave {slave_id} fc {fc}, got fc {pdu[:1].hex() or 'nothing'}")
        exception = bool(pdu[0] & 0x80)
        need = 2 if exception else 2 + data_length(block)
        if len(pdu) != need or (not exception and pdu[1] != need - 2):
            self.stats.corrupt += 1
            self.stats.extra["wrong_count"] += 1
            raise ModbusError("malformed", f"slave {slave_id}: {len(pdu)}-byte reply (byte count "
                                           f"{pdu[1] if len(pdu) > 1 else '-'}) to a read of {block.count} "
                                           f"({need - 2} bytes of data)")
        decoded = self._decoder.decode(pdu)
        if decoded is None:
            self.stats.corrupt += 1
            raise ModbusError("malformed", f"slave {slave_id}: undecodable reply {pdu.hex(' ')}")
        if isinstance(decoded, ExceptionResponse):
            self.stats.extra["exceptions"] += 1
            code = decoded.exception_code
            raise ModbusError("exception", f"slave {slave_id} exception {code} "
                                           f"({EXCEPTIONS.get(code, 'unknown')})", code)
        return decoded

    def _points(self, block: Block, pdu: ModbusPDU) -> dict[str, Point]:
        out: dict[str, Point] = {}
        if block.table in ("coil", "discrete"):
            bits = list(pdu.bits)
            if len(bits) < block.count:
                self.stats.corrupt += 1
                raise ModbusError("malformed", f"{len(bits)} bits for {block.count}")
            for p in block.points:
                out[p.name] = Point(bool(bits[p.address - block.address]), p.unit)
            return out
        regs = list(pdu.registers)
        if len(regs) != block.count:
            self.stats.corrupt += 1
            raise ModbusError("malformed", f"{len(regs)} registers for {block.count}")
        for p in block.points:
            i = p.address - block.address
            out[p.name] = self._point(p, decode_value(p.type, regs[i:i + WORDS[p.type]], p.word_order))
        return out

    def _point(self, p: PointConfig, raw: float | int | bool) -> Point:
        """value = raw * scale + offset; flagged (no value, counted) when not finite or out of `range`."""
        value = float(raw) * p.scale + p.offset
        if not math.isfinite(value):
            self.stats.extra["non_finite"] += 1
            return Point(None, p.unit, f"not finite ({value})")
        if p.range is not None and not p.range[0] <= value <= p.range[1]:
            self.stats.extra["out_of_range"] += 1
            return Point(None, p.unit, f"out of range {list(p.range)} ({value:g})")
        exact = not p.type.startswith("float") and p.scale == 1 and not p.offset
        return Point(int(raw) if exact else round(value, 6), p.unit)


class ModbusRtu(ModbusMaster, SerialDriver):
    """Modbus RTU on one serial line (any pyserial URL)."""

    Config = ModbusRtuConfig
    config: ModbusRtuConfig

    def __init__(self, role: str, config: ModbusRtuConfig) -> None:
        super().__init__(role, config)
        for key in ("crc_errors", "drained"):
            self.stats.extra[key] = 0
        # 3.5 character times of line silence separate frames (11 bits per character in RTU)
        self._t35 = self.retry_pause_s = max(0.00175, 3.5 * 11 / config.baudrate)
        self._drain_s = config.read_timeout_s if config.drain_s is None else config.drain_s
        self._longest_frame_s = 256 * 11 / config.baudrate

    def open(self) -> None:
        super().open()
        self._restart_schedule()

    def _require_open(self) -> None:
        self._require_port()

    def transact(self, slave_id: int, block: Block) -> ModbusPDU:
        """Unless the slave gave a well-formed exception reply, a failed exchange drains the line first,
        so that nothing of it can be read as the reply to the next request."""
        try:
            return self._exchange(slave_id, block)
        except ModbusError as exc:
            if exc.kind != "exception":
                self._drain(self._drain_s)
            raise

    def _exchange(self, slave_id: int, block: Block) -> ModbusPDU:
        frame = self.roundtrip(slave_id, build_request(slave_id, block), expected_length(block))
        return self._check_pdu(slave_id, block, frame[1:-2])

    def roundtrip(self, slave_id: int, request: bytes, reply_length: int) -> bytes:
        """Send one RTU frame; the reply frame (`reply_length` bytes when normal, 5 for an exception),
        its CRC and slave id checked; ModbusError (counted) otherwise. The caller checks the PDU."""
        port = self._require_port()
        need = 3
        if self._waiting(port):  # bytes nobody asked for: a reply later than even the drain
            self._drain(0.0)
        try:
            port.write(request)
            frame = port.read(3)
            if len(frame) == 3:
                # the length comes from what we asked, not from the reply: a damaged byte count
                # then shows up as a CRC error instead of a wait for bytes that never come
                need = 5 if frame[1] & 0x80 else reply_length
                frame += port.read(need - 3)
        except (serial.SerialException, OSError) as exc:
            raise self._io_fault(exc) from exc
        self.stats.bytes_in += len(frame)
        if len(frame) < 3 or len(frame) < need:
            self.stats.extra["timeouts"] += 1
            raise ModbusError("timeout", f"slave {slave_id}: {len(frame)} bytes of the reply within "
                                         f"{self.config.read_timeout_s} s")
        if crc16(frame[:-2]) != frame[-2:]:
            self.stats.corrupt += 1
            self.stats.extra["crc_errors"] += 1
            raise ModbusError("crc", f"slave {slave_id}: CRC mismatch in {frame.hex(' ')}")
        if frame[0] != slave_id:
            self.stats.corrupt += 1
            self.stats.extra["wrong_slave"] += 1
            raise ModbusError("wrong_slave", f"asked slave {slave_id}, got slave {frame[0]} fc {frame[1]}")
        return frame

    def _waiting(self, port: serial.SerialBase) -> int:
        try:
            return int(port.in_waiting)
        except (serial.SerialException, OSError) as exc:
            raise self._io_fault(exc) from exc

    def _drain(self, wait: float) -> None:
        """Read and discard until the line has been silent for 3.5 character times (RTU's gap between
        frames), waiting up to `wait` for a late reply to begin; never longer than `wait` plus two of
        the longest frames in all (a line that never falls silent is left to the next exchange)."""
        port = self._require_port()
        start = last = time.monotonic()
        dropped = 0
        while True:
            waiting = self._waiting(port)
            if waiting:
                try:
                    dropped += len(port.read(waiting))
                except (serial.SerialException, OSError) as exc:
                    raise self._io_fault(exc) from exc
                last = time.monotonic()
            now = time.monotonic()
            if not waiting and now - last >= (self._t35 if dropped else max(wait, self._t35)):
                break
            if now - start >= wait + 2 * self._longest_frame_s:
                break
            if not waiting:
                time.sleep(self._t35 / 2)
        self.stats.bytes_in += dropped
        self.stats.extra["drained"] += dropped


MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit id + PDU), unit id


class ModbusTcp(ModbusMaster):
    """Modbus TCP client (MODBUS Messaging on TCP/IP Implementation Guide V1.0b): each request carries
    an MBAP header with a transaction id of its own; a reply is taken only when its transaction id is
    the request's. A reply that arrives after its request timed out is read later, found to carry an
    older id, discarded and counted (`wrong_tid`), so it can never stand for the next request's reply.
    Bytes are kept across requests, so a reply cut by a timeout is completed and discarded, not read
    out of step. A dropped or refused connection, or a stream whose framing is lost, is a DriverFault:
    the runtime reopens (reconnects) with backoff."""

    Config = ModbusTcpConfig
    config: ModbusTcpConfig
    spy: Callable[[socket.socket], socket.socket] | None = None  # as SerialDriver.spy: the probe's view

    def __init__(self, role: str, config: ModbusTcpConfig) -> None:
        super().__init__(role, config)
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._tid = 0
        self.stats.extra["wrong_tid"] = 0

    def open(self) -> None:
        try:
            self._sock = socket.create_connection(self.config.address, timeout=self.config.read_timeout_s)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.spy is not None:
                self._sock = self.spy(self._sock)
        except OSError as exc:
            self.stats.faults += 1
            raise DriverFault(f"{self.role}: cannot connect to {self.config.port}: {exc} "
                              f"(is the server up, and host and port right?)") from exc
        self._buf.clear()
        self.stats.opened += 1
        self._restart_schedule()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _require_open(self) -> None:
        self._connected()

    def _connected(self) -> socket.socket:
        if self._sock is None:
            raise DriverFault(f"{self.role}: not connected to {self.config.port}")
        return self._sock

    def _fault(self, what: str) -> DriverFault:
        """Count a broken connection and close it (the runtime reconnects); the caller raises it."""
        self.stats.faults += 1
        self.close()
        return DriverFault(f"{self.role}: {what} on {self.config.port}")

    def transact(self, slave_id: int, block: Block) -> ModbusPDU:
        sock = self._connected()
        self._tid = self._tid % 0xFFFF + 1  # 1..65535, never 0
        pdu = request_pdu(block)
        try:
            sock.sendall(MBAP.pack(self._tid, 0, len(pdu) + 1, slave_id) + pdu)
        except OSError as exc:
            raise self._fault(f"send failed: {exc}") from exc
        deadline = time.monotonic() + self.config.read_timeout_s
        while (frame := self._next_frame(deadline)) is not None:
            tid, unit, reply = frame
            if tid != self._tid:
                self.stats.extra["wrong_tid"] += 1  # a late reply to an earlier request: not ours
                continue
            if unit != slave_id:
                self.stats.corrupt += 1
                self.stats.extra["wrong_slave"] += 1
                raise ModbusError("wrong_slave", f"asked unit {slave_id}, got unit {unit} (transaction {tid})")
            return self._check_pdu(slave_id, block, reply)
        self.stats.extra["timeouts"] += 1
        raise ModbusError("timeout", f"unit {slave_id}: no reply to transaction {self._tid} within "
                                     f"{self.config.read_timeout_s} s")

    def _next_frame(self, deadline: float) -> tuple[int, int, bytes] | None:
        """The next whole MBAP frame as (transaction id, unit id, PDU), or None at the deadline."""
        sock = self._connected()
        while True:
            if len(self._buf) >= MBAP.size:
                tid, proto, length, unit = MBAP.unpack_from(self._buf)
                if proto != 0 or not 2 <= length <= 254:
                    self.stats.corrupt += 1
                    raise self._fault(f"MBAP framing lost (protocol {proto}, length {length} in "
                                      f"{bytes(self._buf[:MBAP.size]).hex(' ')}); reconnecting")
                if len(self._buf) >= 6 + length:
                    reply = bytes(self._buf[MBAP.size:6 + length])
                    del self._buf[:6 + length]
                    return tid, unit, reply
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                sock.settimeout(left)
                data = sock.recv(4096)
            except TimeoutError:
                return None
            except OSError as exc:
                raise self._fault(f"receive failed: {exc}") from exc
            if not data:
                raise self._fault("connection closed by the server")
            self.stats.bytes_in += len(data)
            self._buf += data
