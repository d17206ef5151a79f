"""An RS-485 Modbus RTU relay module (a stack light and a buzzer on its relays), from the Modbus
specifications ("MODBUS Application Protocol V1.1b3" 6.1 read coils, 6.5 write single coil, 6.11 write
multiple coils; "MODBUS over Serial Line V1.02" for the RTU frame), never from drivers/relay.py.

Function 05: address, FF00 (on) or 0000 (off), any other value is exception 3; the reply echoes the
request. Function 15: address, quantity (1-1968), byte count, bits packed LSB first; the reply is the
address and quantity. Function 01 reads them back. Every write is kept in `history` as (monotonic time,
coil states) for the tests. Faults: `SlaveFaults` of the line (dead: no reply at all; timeout_next:
withhold the next replies, the write is not applied), and `stuck`: coils that read back a fixed value
whatever was written (a welded or open relay contact seen by the module's feedback).
"""

from __future__ import annotations

import argparse
import struct
import threading
import time
from collections.abc import Sequence

from customs_edge.simulators.base import Faults, add_endpoint_args, endpoints_from_args, run_until_signalled
from customs_edge.simulators.ore_devices import ModbusLineSim, SlaveModel, Tables
from customs_edge.simulators.wire import modbus as rtu

WRITE_COIL, WRITE_COILS = 5, 15
ON, OFF = 0xFF00, 0x0000


class RelaySim(ModbusLineSim):
    def __init__(self, slave_id: int = 1, coils: int = 8, faults: Faults | None = None) -> None:
        self.coils = [0] * coils
        self.stuck: dict[int, int] = {}  # coil -> the value it reads back, whatever is written
        self.history: list[tuple[float, tuple[int, ...]]] = []
        self.changed = threading.Condition()
        super().__init__([SlaveModel(slave_id, "relay", self._tables)], faults)
        self.relay = self.slaves[slave_id]

    def coils_now(self) -> tuple[int, ...]:
        with self.changed:
            return tuple(self.coils)

    def _tables(self) -> Tables:
        return {"coil": {i: self.stuck.get(i, v) for i, v in enumerate(self.coils)}}

    def respond(self, frame: bytes) -> bytes | None:
        fc = frame[1]
        if fc not in (WRITE_COIL, WRITE_COILS) or frame[0] != self.relay.id:
            return super().respond(frame)
        f = self.relay.faults
        self.relay.requests += 1
        if f.dead or f.timeout_next > 0:
            f.timeout_next = max(0, f.timeout_next - 1)
            f.withheld += 1
            return None
        address, value = struct.unpack(">HH", frame[2:6])
        if fc == WRITE_COIL:
            if value not in (ON, OFF):
                return rtu.exception_reply(self.relay.id, fc, rtu.ILLEGAL_DATA_VALUE)
            bits = [1 if value == ON else 0]
        else:
            count, nbytes = value, frame[6]
            if not 1 <= count <= 1968 or nbytes != (count + 7) // 8:
                return rtu.exception_reply(self.relay.id, fc, rtu.ILLEGAL_DATA_VALUE)
            bits = [frame[7 + i // 8] >> (i % 8) & 1 for i in range(count)]
        if address + len(bits) > len(self.coils):
            return rtu.exception_reply(self.relay.id, fc, rtu.ILLEGAL_DATA_ADDRESS)
        with self.changed:
            self.coils[address:address + len(bits)] = bits
            self.history.append((time.monotonic(), tuple(self.coils)))
            self.changed.notify_all()
        return rtu.frame(frame[:6])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge simulate relay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slave-id", type=int, default=1, help="the module's address on the line (1-247)")
    p.add_argument("--coils", type=int, default=8, help="relays on the module (coils 0..N-1)")
    add_endpoint_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sim = RelaySim(args.slave_id, args.coils, Faults(args.corrupt_rate, args.seed))
    run_until_signalled({"relay": endpoints_from_args(sim, args)}, args=args)
