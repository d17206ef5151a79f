"""ModbusRtu against an independent Modbus RTU server: pymodbus's own, with RTU framing, on a
loopback socket (an RTU-over-TCP gateway) and on a pty (a serial line). The register image is
written with pymodbus's own data types, so our decoding is checked against theirs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import select
import socket
import threading
import time
import tty
from collections.abc import Iterator

import pytest
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from customs_edge.core.readings import Registers, SlaveError
from customs_edge.drivers.modbus import ModbusRtu, ModbusRtuConfig


def devices() -> list[SimDevice]:
    weigher = SimDevice(1, simdata=(
        [SimData(0, values=[True, False], datatype=DataType.BITS)],   # coils
        [SimData(0, values=[False, True], datatype=DataType.BITS)],   # discrete inputs
        [SimData(0, values=[3], datatype=DataType.UINT16),            # holding
         SimData(1, values=[-1234], datatype=DataType.INT16)],
        [SimData(0, values=[4012.5], datatype=DataType.FLOAT32),      # input
         SimData(2, values=[123456789], datatype=DataType.UINT32),
         SimData(4, values=[-70000], datatype=DataType.INT32)],
    ))
    moisture = SimDevice(2, simdata=(
        [SimData(0, values=[False], datatype=DataType.BITS)],
        [SimData(0, values=[False], datatype=DataType.BITS)],
        [SimData(0, values=[0], datatype=DataType.UINT16)],
        [SimData(0, values=[812], datatype=DataType.UINT16)],
    ))
    return [weigher, moisture]


SLAVES = [
    {"name": "weigher", "id": 1, "poll_interval_s": 0.01, "points": [
        {"name": "rate_tph", "table": "input", "address": 0, "type": "float32"},
        {"name": "total", "table": "input", "address": 2, "type": "uint32"},
        {"name": "signed32", "table": "input", "address": 4, "type": "int32"},
        {"name": "lot_no", "table": "holding", "address": 0},
        {"name": "offset", "table": "holding", "address": 1, "type": "int16", "scale": 0.1},
        {"name": "cutter", "table": "coil", "address": 0, "type": "bool"},
        {"name": "alarm", "table": "discrete", "address": 1, "type": "bool"}]},
    {"name": "moisture", "id": 2, "poll_interval_s": 0.01, "points": [
        {"name": "moisture_pct", "table": "input", "address": 0, "scale": 0.01}]},
]


class ServerThread:
    """Runs a pymodbus server in its own event loop thread."""

    def __init__(self, make) -> None:
        self.make = make
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = self.make()
            await self.server.serve_forever(background=True)
            self.ready.set()
            await self.server.serving

        with contextlib.suppress(Exception):
            self.loop.run_until_complete(main())

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(5), "pymodbus server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
        self.thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def null_modem() -> Iterator[tuple[str, str]]:
    """Two ptys joined master to master: a serial cable between two slave paths."""
    a_m, a_s = pty.openpty()
    b_m, b_s = pty.openpty()
    for fd in (a_s, b_s):
        tty.setraw(fd)
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            r, _, _ = select.select([a_m, b_m], [], [], 0.05)
            for fd in r:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                os.write(b_m if fd == a_m else a_m, data)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        yield os.ttyname(a_s), os.ttyname(b_s)
    finally:
        stop.set()
        t.join(2)
        for fd in (a_m, a_s, b_m, b_s):
            os.close(fd)


def read_both(d: ModbusRtu) -> dict[str, dict]:
    out: dict[str, dict] = {}
    deadline = time.monotonic() + 10
    while len(out) < 2 and time.monotonic() < deadline:
        r = d.read()
        if r is not None:
            assert isinstance(r, Registers), r
            out[r.slave] = {name: p.value for name, p in r.points.items()}
    return out


def check(values: dict[str, dict]) -> None:
    w = values["weigher"]
    assert w["rate_tph"] == pytest.approx(4012.5)
    assert w["total"] == 123456789
    assert w["signed32"] == -70000
    assert w["lot_no"] == 3
    assert w["offset"] == pytest.approx(-123.4)
    assert w["cutter"] is True and w["alarm"] is True
    assert values["moisture"]["moisture_pct"] == pytest.approx(8.12)


def test_against_pymodbus_rtu_server_over_tcp() -> None:
    port = free_port()
    with ServerThread(lambda: ModbusTcpServer(devices(), framer=FramerType.RTU, address=("127.0.0.1", port))):
        cfg = ModbusRtuConfig(port=f"socket://127.0.0.1:{port}", read_timeout_s=1.0, slaves=SLAVES)
        with ModbusRtu("line", cfg) as d:
            check(read_both(d))
            assert d.stats.corrupt == 0 and d.stats.extra["timeouts"] == 0


def test_exception_from_pymodbus_server_is_reported() -> None:
    port = free_port()
    with ServerThread(lambda: ModbusTcpServer(devices(), framer=FramerType.RTU, address=("127.0.0.1", port))):
        cfg = ModbusRtuConfig(port=f"socket://127.0.0.1:{port}", read_timeout_s=1.0, fail_after=5, slaves=[
            {"name": "weigher", "id": 1, "points": [{"name": "nothing", "table": "holding", "address": 500}]}])
        with ModbusRtu("line", cfg) as d:
            r = d.read() or d.read()
            assert isinstance(r, SlaveError)
            assert "exception 2" in r.error
            assert d.stats.extra["exceptions"] == 1


def test_against_pymodbus_rtu_server_on_a_serial_line() -> None:
    with null_modem() as (server_end, our_end), ServerThread(lambda: ModbusSerialServer(
            devices(), framer=FramerType.RTU, port=server_end, baudrate=9600, parity="N")):
        cfg = ModbusRtuConfig(port=our_end, parity="N", read_timeout_s=1.0, slaves=SLAVES)
        with ModbusRtu("line", cfg) as d:
            check(read_both(d))
