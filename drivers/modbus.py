"""Modbus RTU master for instruments on an RS-485 line (belt weigher, microwave moisture analyser,
belt state and radiation portal PLC). Several slaves may share the line; each has its own register
map in the config (table, address, data type, word order, scale, offset, unit) and poll interval.

Wire: [slave id][function][data][CRC-16 low byte first], poly 0xA001, init 0xFFFF. The PDUs are
encoded and decoded by pymodbus (`pymodbus.pdu`), the CRC by pymodbus's RTU framer. The transaction
loop is ours, over `serial.serial_for_url`, so the same code talks to /dev/ttyUSB0, a simulator's
pty or an RTU-over-TCP gateway (socket://), and so a timeout, a CRC error, a reply from the wrong
slave and an exception response are told apart and counted (pymodbus's own client folds them into
one "no response").

Readings (one per slave poll):
  Registers   slave, slave_id, points = {<point name>: Point(scaled value, unit), ...}
  SlaveError  slave, slave_id, error (text), consecutive (failed polls in a row)
A poll retries a timeout or CRC error `retries` times, then reports `slave_error`; an exception
response is not retried (the slave did answer) except 'device busy'. RTU has no transaction id, so a
reply is checked against its request (slave id, function code, byte count), and after any failed
exchange the line is drained: bytes are read and discarded until it has been silent for 3.5
character times, waiting up to `drain_s` for a late reply to begin. A slave that always answers
after the timeout then fails every poll as a timeout instead of handing one register's value to
the next request. When EVERY slave on the line
has failed `fail_after` polls in a row the line is presumed dead (cable, converter, power) and read()
raises DriverFault: the runtime reports it and reopens the port with backoff.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Literal

import serial
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymodbus.framer.rtu import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsRequest, ReadDiscreteInputsRequest
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, ReadInputRegistersRequest

from customs_edge.core.errors import DriverFault
from customs_edge.core.readings import PointValue, Registers, SlaveError
from customs_edge.drivers.base import SerialDriver, SerialPortConfig, poll_due

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["uint16", "int16", "uint32", "int32", "float32", "bool"]

FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
REQUEST: dict[str, type[ModbusPDU]] = {
    "coil": ReadCoilsRequest, "discrete": ReadDiscreteInputsRequest,
    "holding": ReadHoldingRegistersRequest, "input": ReadInputRegistersRequest,
}
WORDS = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2, "bool": 1}
STRUCT = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f"}
MAX_REGISTERS = 125  # per read request (Modbus spec)
MAX_BITS = 2000
EXCEPTIONS = {1: "illegal function", 2: "illegal data address", 3: "illegal data value",
              4: "slave device failure", 5: "acknowledge", 6: "slave device busy",
              8: "memory parity error", 10: "gateway path unavailable", 11: "gateway target failed to respond"}


def crc16(data: bytes) -> bytes:
    """Modbus CRC-16 as it goes on the wire (low byte first)."""
    return FramerRTU.compute_CRC(data).to_bytes(2, "big")


def encode_value(dtype: DataType, value: float | int | bool, word_order: Literal["big", "little"] = "big") -> list[int]:
    """Registers (or one bit as 0/1) holding `value` in `dtype`: the inverse of decode_value."""
    if dtype == "bool":
        return [1 if value else 0]
    raw = struct.pack(STRUCT[dtype], int(value) if dtype != "float32" else float(value))
    words = [int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)]
    return words[::-1] if word_order == "little" else words


def decode_value(dtype: DataType, words: list[int], word_order: Literal["big", "little"] = "big") -> float | int | bool:
    if dtype == "bool":
        return bool(words[0])
    if word_order == "little":
        words = words[::-1]
    value: float | int = struct.unpack(STRUCT[dtype], b"".join(w.to_bytes(2, "big") for w in words))[0]
    return value


class PointConfig(BaseModel):
    """One value in a slave's register map. value = raw * scale + offset (raw as `type` decodes it)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    table: Table = "holding"
    address: int = Field(ge=0, le=65535, description="0-based protocol address (40001 -> 0)")
    type: DataType = "uint16"
    word_order: Literal["big", "little"] = Field("big", description="32-bit values: high word first (big)")
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None

    @model_validator(mode="after")
    def _fits(self) -> PointConfig:
        bit_table = self.table in ("coil", "discrete")
        if bit_table != (self.type == "bool"):
            raise ValueError(f"{self.name}: coils/discrete inputs take type 'bool'; registers take a number type")
        return self


class SlaveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    id: int = Field(ge=1, le=247, description="slave address on the RS-485 line")
    poll_interval_s: float = Field(1.0, gt=0, le=3600)
    points: list[PointConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> SlaveConfig:
        names = [p.name for p in self.points]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"slave {self.name}: point names repeated: {sorted(dup)}")
        return self


class ModbusRtuConfig(SerialPortConfig):
    driver: Literal["modbus-rtu"] = "modbus-rtu"
    parity: Literal["N", "E", "O", "M", "S"] = "E"  # Modbus RTU default is 8E1
    read_timeout_s: float = Field(0.3, gt=0, le=10, description="response timeout per request")
    retries: int = Field(2, ge=0, le=10, description="re-sends after a timeout or CRC error")
    drain_s: float | None = Field(None, gt=0, le=10, description=(
        "after a failed request, wait this long for a late reply to begin and discard it "
        "(default: read_timeout_s)"))
    fail_after: int = Field(3, ge=1, description="failed polls in a row, on every slave, before DriverFault")
    slaves: list[SlaveConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ModbusRtuConfig:
        names = [s.name for s in self.slaves]
        ids = [s.id for s in self.slaves]
        if len(set(names)) != len(names) or len(set(ids)) != len(ids):
            raise ValueError(f"slave names and ids must be unique on a line (names {names}, ids {ids})")
        return self


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


def build_request(slave: int, block: Block) -> bytes:
    pdu = REQUEST[block.table](dev_id=slave, address=block.address, count=block.count)
    body = bytes([slave, pdu.function_code]) + pdu.encode()
    return body + crc16(body)


def expected_length(block: Block) -> int:
    """Total RTU length of a normal reply to a read of `block`: id, fc, byte count, data, CRC."""
    data = (block.count + 7) // 8 if block.table in ("coil", "discrete") else 2 * block.count
    return 5 + data


class SlaveState:
    def __init__(self, cfg: SlaveConfig) -> None:
        self.cfg = cfg
        self.blocks = plan_blocks(cfg.points)
        self.next_due = 0.0
        self.consecutive_failures = 0


class ModbusRtu(SerialDriver):
    """Polls each configured slave at its interval; one Registers or SlaveError per poll."""

    Config = ModbusRtuConfig
    PRODUCES = (Registers, SlaveError)
    config: ModbusRtuConfig

    def __init__(self, role: str, config: ModbusRtuConfig) -> None:
        super().__init__(role, config)
        self._slaves = [SlaveState(s) for s in config.slaves]
        self._decoder = DecodePDU(is_server=False)
        for key in ("timeouts", "crc_errors", "exceptions", "wrong_slave", "wrong_count", "retries",
                    "slave_errors", "drained"):
            self.stats.extra[key] = 0
        # 3.5 character times of line silence separate frames (11 bits per character in RTU)
        self._t35 = max(0.00175, 3.5 * 11 / config.baudrate)
        self._drain_s = config.read_timeout_s if config.drain_s is None else config.drain_s
        self._longest_frame_s = 256 * 11 / config.baudrate

    def open(self) -> None:
        super().open()
        now = time.monotonic()
        for s in self._slaves:
            s.next_due = now
            s.consecutive_failures = 0

    def read(self) -> Registers | SlaveError | None:
        self._require_port()
        slave = min(self._slaves, key=lambda s: s.next_due)
        due = poll_due(slave.next_due, slave.cfg.poll_interval_s, self.config.read_timeout_s)
        if due is None:
            return None
        slave.next_due = due
        return self.poll(slave)

    def poll(self, slave: SlaveState) -> Registers | SlaveError:
        values: dict[str, PointValue] = {}
        try:
            for block in slave.blocks:
                values.update(self._read_block(slave.cfg.id, block))
        except ModbusError as exc:
            slave.consecutive_failures += 1
            self.stats.extra["slave_errors"] += 1
            if all(s.consecutive_failures >= self.config.fail_after for s in self._slaves):
                self.stats.faults += 1
                for s in self._slaves:
                    s.consecutive_failures = 0  # one fault per dead spell; the runtime reopens
                raise DriverFault(f"{self.role} on {self.config.port}: no slave answers (last: slave "
                                  f"{slave.cfg.id} {slave.cfg.name}: {exc})") from exc
            return SlaveError(source=self.role, slave=slave.cfg.name, slave_id=slave.cfg.id,
                              error=f"{exc.kind}: {exc}", consecutive=slave.consecutive_failures)
        slave.consecutive_failures = 0
        self.stats.frames += 1
        return Registers.of(values, units={p.name: p.unit for p in slave.cfg.points}, source=self.role,
                            slave=slave.cfg.name, slave_id=slave.cfg.id)

    def _read_block(self, slave_id: int, block: Block) -> dict[str, PointValue]:
        """One request with retries; decoded, scaled point values."""
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
                time.sleep(self._t35)
                continue
            return self._values(block, pdu)
        raise AssertionError("unreachable")

    def transact(self, slave_id: int, block: Block) -> ModbusPDU:
        """Send one read request, return the decoded response PDU. Raises ModbusError; unless the slave
        gave a well-formed exception reply, the line is drained first, so that nothing of this exchange
        can be read as the reply to the next request."""
        try:
            return self._exchange(slave_id, block)
        except ModbusError as exc:
            if exc.kind != "exception":
                self._drain(self._drain_s)
            raise

    def _exchange(self, slave_id: int, block: Block) -> ModbusPDU:
        port = self._require_port()
        request = build_request(slave_id, block)
        need = 3
        if self._waiting(port):  # bytes nobody asked for: a reply later than even the drain
            self._drain(0.0)
        try:
            port.write(request)
            frame = port.read(3)
            if len(frame) == 3:
                # the length comes from what we asked, not from the reply: a damaged byte count
                # then shows up as a CRC error instead of a wait for bytes that never come
                need = 5 if frame[1] & 0x80 else expected_length(block)
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
        if frame[0] != slave_id or (frame[1] & 0x7F) != FUNCTION[block.table]:
            self.stats.corrupt += 1
            self.stats.extra["wrong_slave"] += 1
            raise ModbusError("wrong_slave", f"asked slave {slave_id} fc {FUNCTION[block.table]}, "
                                             f"got slave {frame[0]} fc {frame[1]}")
        if not frame[1] & 0x80 and frame[2] != need - 5:
            self.stats.corrupt += 1
            self.stats.extra["wrong_count"] += 1
            raise ModbusError("malformed", f"slave {slave_id}: byte count {frame[2]} in a reply to a read of "
                                           f"{block.count} ({need - 5} bytes)")
        pdu = self._decoder.decode(frame[1:-2])
        if pdu is None:
            self.stats.corrupt += 1
            raise ModbusError("malformed", f"slave {slave_id}: undecodable reply {frame.hex(' ')}")
        if isinstance(pdu, ExceptionResponse):
            self.stats.extra["exceptions"] += 1
            code = pdu.exception_code
            raise ModbusError("exception", f"slave {slave_id} exception {code} "
                                           f"({EXCEPTIONS.get(code, 'unknown')})", code)
        return pdu

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

    def _values(self, block: Block, pdu: ModbusPDU) -> dict[str, PointValue]:
        out: dict[str, PointValue] = {}
        if block.table in ("coil", "discrete"):
            bits = list(pdu.bits)
            if len(bits) < block.count:
                self.stats.corrupt += 1
                raise ModbusError("malformed", f"{len(bits)} bits for {block.count}")
            for p in block.points:
                out[p.name] = bool(bits[p.address - block.address])
            return out
        regs = list(pdu.registers)
        if len(regs) != block.count:
            self.stats.corrupt += 1
            raise ModbusError("malformed", f"{len(regs)} registers for {block.count}")
        for p in block.points:
            i = p.address - block.address
            raw = decode_value(p.type, regs[i:i + WORDS[p.type]], p.word_order)
            value = float(raw) * p.scale + p.offset
            out[p.name] = round(value, 6) if p.type == "float32" or p.scale != 1 or p.offset else int(raw)
        return out
