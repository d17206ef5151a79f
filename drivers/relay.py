"""RS-485 Modbus RTU relay module (`modbus-relay`): a stack light (green / amber / red) and a buzzer.

Each output is one coil of the module (config `coils`: name -> 0-based coil address). A command
(core/outputs.SetOutputs) is written with function 15 (write multiple coils) when the configured coils
are contiguous, else with function 05 (write single coil) per coil, and then read back with function 01
(read coils). The module acknowledges a write by echoing its address and quantity (05: the whole
request); the read-back is what proves the relays are set. A missing or damaged reply (after `retries`),
an exception reply, or a read-back other than what was written is a DriverFault, never a silent miss:
the runtime reports it to the app (driver_fault) and reopens the port, and the driver writes the last
command again once it is open. While idle the coils are read back every `check_interval_s`, so a module
that lost power (its relays fall off) or a second master is found before the next traveller.

Framing, CRC, timeouts, draining a late reply and the read-back's checks are drivers/modbus.py's
(ModbusRtu). The driver's thread does the writes: `submit` (called from the app's thread) only queues.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from customs_edge.core.errors import DriverFault
from customs_edge.core.outputs import OutputsSet, SetOutputs
from customs_edge.drivers.modbus import ModbusError, ModbusRtu, ModbusRtuConfig, SlaveConfig, crc16

WRITE_COIL, WRITE_COILS = 5, 15


class RelayConfig(ModbusRtuConfig):
    driver: Literal["modbus-relay"] = "modbus-relay"  # type: ignore[assignment]
    parity: Literal["N", "E", "O", "M", "S"] = "N"  # relay modules ship at 9600 8N1
    slave_id: int = Field(1, ge=1, le=247, description="the module's address on the RS-485 line")
    coils: dict[str, int] = Field(description="output name -> 0-based coil address, e.g. {green: 0, amber: 1, "
                                              "red: 2, buzzer: 3}")
    check_interval_s: float = Field(2.0, gt=0, le=3600, description="idle read-back of the coils")
    slaves: list[SlaveConfig] = Field(default_factory=list, description="built from the keys above: do not set")

    @model_validator(mode="before")
    @classmethod
    def _slave(cls, data: Any) -> Any:
        """The module is one slave whose points are its coils (ModbusRtu's read-back reads them)."""
        if not isinstance(data, dict):
            return data
        if "slaves" in data:
            raise ValueError("modbus-relay takes `slave_id` and `coils`, not `slaves`")
        coils = data.get("coils")
        if not isinstance(coils, dict) or not coils:
            raise ValueError("coils: give at least one output, name -> coil address, e.g. {red: 2}")
        points = [{"name": n, "table": "coil", "address": a, "type": "bool"} for n, a in coils.items()]
        return {**data, "slaves": [{"name": "relay", "id": data.get("slave_id", 1), "points": points}]}

    @model_validator(mode="after")
    def _distinct(self) -> RelayConfig:
        if len(set(self.coils.values())) != len(self.coils):
            raise ValueError(f"coils: two outputs on one coil: {self.coils}")
        return self


class ModbusRelay(ModbusRtu):
    Config = RelayConfig  # type: ignore[assignment]  # a ModbusRtuConfig built from slave_id and coils
    PRODUCES = (OutputsSet,)  # type: ignore[assignment]  # not ModbusMaster's Registers: it sets, not polls
    config: RelayConfig

    def __init__(self, role: str, config: RelayConfig) -> None:
        super().__init__(role, config)
        self._queue: queue.SimpleQueue[SetOutputs] = queue.SimpleQueue()
        self._set: dict[str, bool] = dict.fromkeys(config.coils, False)  # what the coils should hold
        self._confirmed = False  # the coils were read back as `_set` since the port opened
        self._unwritten: SetOutputs | None = None  # the last command, until its read-back confirmed it
        self._next_check = 0.0
        for key in ("writes", "mismatches", "superseded"):
            self.stats.extra[key] = 0
        addresses = sorted(config.coils.values())
        self._contiguous = addresses[-1] - addresses[0] + 1 == len(addresses)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.config.coils)

    def submit(self, command: SetOutputs) -> None:
        unknown = set(command.values) - set(self.config.coils)
        if unknown:
            raise ValueError(f"{self.role}: no coil configured for {sorted(unknown)} (coils: {self.config.coils})")
        self._queue.put(command)

    def open(self) -> None:
        super().open()
        self._confirmed = False
        self._next_check = time.monotonic()

    def read(self) -> OutputsSet | None:  # type: ignore[override]
        self._require_open()
        wait = max(0.0, min(self.config.read_timeout_s, self._next_check - time.monotonic()))
        command, skipped = self._newest(wait)
        command = command or self._unwritten
        if command is not None:
            self._unwritten = command
            values = {**self._set, **command.values}
            self._write(values)
            self._set = values
            self._verify()
            self._unwritten = None
            self.stats.frames += 1
            return OutputsSet(source=self.role, values=dict(values), ref=command.ref,
                              issued_mono=command.issued_mono, superseded=skipped)
        if time.monotonic() >= self._next_check:
            if not self._confirmed:  # just opened: the module's state is unknown until written
                self._unwritten = SetOutputs(values=self._set, ref="open")
                return None
            self._verify()
        return None

    def _newest(self, wait: float) -> tuple[SetOutputs | None, int]:
        """The newest queued command (waiting up to `wait` for one) and how many older ones it replaces."""
        try:
            command = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None, 0
        skipped = 0
        while True:
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                break
            skipped += 1
        self.stats.extra["superseded"] += skipped
        return command, skipped

    def _write(self, values: dict[str, bool]) -> None:
        coils = self.config.coils
        if self._contiguous:
            start = min(coils.values())
            bits = [False] * len(coils)
            for name, on in values.items():
                bits[coils[name] - start] = on
            data = bytearray((len(bits) + 7) // 8)
            for i, on in enumerate(bits):
                data[i // 8] |= on << (i % 8)
            head = bytes([WRITE_COILS]) + start.to_bytes(2, "big") + len(bits).to_bytes(2, "big")
            self._transact_write(head + bytes([len(data)]) + bytes(data), head)
        else:
            for name, on in values.items():
                pdu = bytes([WRITE_COIL]) + coils[name].to_bytes(2, "big") + (b"\xff\x00" if on else b"\x00\x00")
                self._transact_write(pdu, pdu)

    def _transact_write(self, pdu: bytes, echo: bytes) -> None:
        """One write with retries (setting coils is idempotent); the reply must echo `echo`."""
        slave = self.config.slave_id
        body = bytes([slave]) + pdu
        for attempt in range(self.config.retries + 1):
            try:
                reply = self.roundtrip(slave, body + crc16(body), 3 + len(echo))
            except ModbusError as exc:
                self._drain(self._drain_s)
                if attempt == self.config.retries:
                    raise self._fault(f"write fc {pdu[0]} to slave {slave}: {exc.kind}: {exc}") from exc
                self.stats.extra["retries"] += 1
                continue
            if reply[1:-2] != echo:
                self.stats.corrupt += 1
                self._drain(self._drain_s)
                what = "exception " + str(reply[2]) if reply[1] & 0x80 else "reply " + reply.hex(" ")
                raise self._fault(f"write fc {pdu[0]} to slave {slave}: {what}, expected the echo {echo.hex(' ')}")
            self.stats.extra["writes"] += 1
            return

    def _verify(self) -> None:
        """Read the coils back (function 01); DriverFault unless they hold what was set."""
        slave = self._slaves[0]
        try:
            back: dict[str, bool | None] = {}
            for block in slave.blocks:
                back.update({n: None if p.value is None else bool(p.value)
                             for n, p in self._read_block(slave.cfg.id, block).items()})
        except ModbusError as exc:
            raise self._fault(f"read-back of the coils from slave {slave.cfg.id}: {exc.kind}: {exc}") from exc
        self._next_check = time.monotonic() + self.config.check_interval_s
        if back != self._set:
            self.stats.extra["mismatches"] += 1
            self._unwritten = self._unwritten or SetOutputs(values=self._set, ref="restore")
            raise self._fault(f"coils read back {_show(back)}, set {_show(self._set)} (module reset, a relay "
                              f"stuck, or another master on the line?)")
        self._confirmed = True

    def _fault(self, what: str) -> DriverFault:
        self.stats.faults += 1
        return DriverFault(f"{self.role} on {self.config.port}: {what}")


def _show(values: dict[str, Any]) -> str:
    return ", ".join(f"{n}={'on' if v else 'off' if v is not None else '?'}" for n, v in values.items())
