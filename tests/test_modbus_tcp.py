"""ModbusTcp against an independent Modbus TCP server: pymodbus's own (MBAP framing, its own transaction
handling), in-process on a free loopback port. Reads of every table, exception replies, a reply held
back until the request timed out (the transaction id keeps it from being taken for the next request's),
and a server restart (the runtime's driver thread reconnects with backoff)."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from customs_edge.agent import registry
from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.runtime import DriverThread
from customs_edge.core.errors import DriverFault
from customs_edge.core.readings import Registers, SlaveError
from customs_edge.drivers.modbus import ModbusRtu, ModbusTcp, ModbusTcpConfig
from tests.conftest import wait_for
from tests.test_modbus_pymodbus_server import SLAVES, ServerThread, check, devices, free_port

REPO = Path(__file__).resolve().parent.parent


def tcp_server(port: int, devs: list[SimDevice] | None = None, **kw: Any) -> ServerThread:
    return ServerThread(lambda: ModbusTcpServer(devs or devices(), address=("127.0.0.1", port), **kw))


def read_until(d: ModbusTcp, n: int, timeout: float = 10.0) -> list[Registers | SlaveError]:
    out: list[Registers | SlaveError] = []
    wait_for(lambda: (r := d.read()) is not None and out.append(r) is None and len(out) >= n, timeout,
             f"{n} readings")
    return out


def test_reads_every_table_from_two_units() -> None:
    port = free_port()
    with tcp_server(port):
        cfg = ModbusTcpConfig(host="127.0.0.1", port=port, read_timeout_s=2.0, slaves=SLAVES)
        with ModbusTcp("line", cfg) as d:
            readings = read_until(d, 2)
            assert {type(r) for r in readings} == {Registers}
            check({r.slave: {k: p.value for k, p in r.points.items()} for r in readings if isinstance(r, Registers)})
            assert d.stats.corrupt == 0 and d.stats.extra["timeouts"] == 0 and d.stats.extra["wrong_tid"] == 0


def test_exception_reply_is_decoded_as_for_rtu() -> None:
    port = free_port()
    with tcp_server(port):
        cfg = ModbusTcpConfig(port=f"tcp://127.0.0.1:{port}", read_timeout_s=2.0, retries=3, fail_after=5, slaves=[
            {"name": "weigher", "id": 1, "points": [{"name": "nothing", "table": "holding", "address": 500}]}])
        with ModbusTcp("line", cfg) as d:
            (r,) = read_until(d, 1)
    assert isinstance(r, SlaveError) and "exception 2" in r.error and "illegal data address" in r.error
    assert d.stats.extra["exceptions"] == 1 and d.stats.extra["retries"] == 0  # the unit answered: no retry


SPLIT_DEVICE = [SimDevice(1, simdata=(
    [SimData(0, values=[False], datatype=DataType.BITS)], [SimData(0, values=[False], datatype=DataType.BITS)],
    [SimData(0, values=[111], datatype=DataType.UINT16), SimData(100, values=[222], datatype=DataType.UINT16)],
    [SimData(0, values=[0], datatype=DataType.UINT16)]))]
SPLIT = [{"name": "weigher", "id": 1, "poll_interval_s": 0.01, "points": [
    {"name": "a", "table": "holding", "address": 0}, {"name": "b", "table": "holding", "address": 100}]}]


def test_a_reply_later_than_the_timeout_is_never_taken_for_the_next_request() -> None:
    """The server holds its first reply (a = 111) until the driver's request timed out, then sends it.
    Requests for a and b have the same shape, so without the transaction-id check the late reply is
    read as the reply to the next request: b would read 111 (checked: it does, with the check removed)."""
    released, held = threading.Event(), threading.Event()

    def hold_first_reply(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending and not held.is_set():
            held.set()
            released.wait(20)  # the server's loop stands still: its reply leaves only when released
        return pdu

    port = free_port()
    with tcp_server(port, SPLIT_DEVICE, trace_pdu=hold_first_reply):
        cfg = ModbusTcpConfig(host="127.0.0.1", port=port, read_timeout_s=0.5, retries=0, fail_after=100,
                              slaves=SPLIT)
        with ModbusTcp("belt_weigher", cfg) as d:
            (first,) = read_until(d, 1)
            assert isinstance(first, SlaveError) and "timeout" in first.error and held.is_set()
            released.set()
            later = read_until(d, 4)
    values = [(r.number("a"), r.number("b")) for r in later if isinstance(r, Registers)]
    assert len(values) == 4 and set(values) == {(111, 222)}
    assert d.stats.extra["wrong_tid"] == 1  # the held reply arrived, and was discarded


def test_server_restart_the_driver_thread_reconnects() -> None:
    port = free_port()
    cfg = ModbusTcpConfig(host="127.0.0.1", port=port, read_timeout_s=1.0, retries=0, fail_after=2, slaves=SLAVES)
    d = ModbusTcp("belt_weigher", cfg)
    out: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    t = DriverThread(d, out, stop)

    def registers_seen() -> bool:
        while not out.empty():
            if isinstance(out.get(), Registers):
                return True
        return False

    try:
        with tcp_server(port):
            t.start()
            wait_for(registers_seen, 10, "readings from the first server")
        # the server is gone: the dropped connection is a fault, reconnecting is refused until it is back
        wait_for(lambda: t.down_since is not None, 10, "the driver thread to see the fault")
        wait_for(lambda: d.stats.faults >= 2, 10, "a refused reconnect while the server is down")
        while not out.empty():
            out.get()
        with tcp_server(port):
            wait_for(lambda: t.down_since is None, 20, "the driver thread to recover")  # a reading after the fault
            wait_for(registers_seen, 10, "readings after the server came back")
        assert d.stats.opened == 2  # one connection per server: the refused attempts were retried with backoff
    finally:
        stop.set()
        t.join(10)


def test_a_dropped_connection_is_a_driver_fault_and_close_is_clean() -> None:
    port = free_port()
    cfg = ModbusTcpConfig(host="127.0.0.1", port=port, read_timeout_s=1.0, slaves=SLAVES)
    d = ModbusTcp("line", cfg)
    with tcp_server(port):
        d.open()
        read_until(d, 1)
    with pytest.raises(DriverFault, match=r"connection closed|receive failed|send failed"):
        for _ in range(10):
            d.read()
    d.close()
    with pytest.raises(DriverFault, match=r"cannot connect to tcp://127\.0\.0\.1"):
        d.open()


# --- config ----------------------------------------------------------------------------------

def test_host_and_port_or_a_url() -> None:
    pts = [{"name": "w", "id": 1, "points": [{"name": "x", "address": 0}]}]
    assert ModbusTcpConfig(host="10.0.0.5", slaves=pts).address == ("10.0.0.5", 502)
    assert ModbusTcpConfig(host="10.0.0.5", port=1502, slaves=pts).port == "tcp://10.0.0.5:1502"
    assert ModbusTcpConfig(port="tcp://plc.local:5020", slaves=pts).address == ("plc.local", 5020)
    assert ModbusTcpConfig(host="::1", port=502, slaves=pts).address == ("::1", 502)
    assert ModbusTcpConfig(host="h", slaves=[{"name": "w", "id": 255, "points": [{"name": "x", "address": 0}]}])
    for bad, msg in [({}, "needs `host`"), ({"port": 502}, "needs `host`"),
                     ({"host": "h", "port": "tcp://h:1"}, "not both"),
                     ({"port": "socket://h:502"}, "tcp://host:port"), ({"port": "tcp://h"}, "tcp://host:port")]:
        with pytest.raises(ValidationError, match=msg):
            ModbusTcpConfig.model_validate({**bad, "slaves": pts})


def test_registered_with_the_same_reading_types_and_accepted_by_the_ore_station() -> None:
    assert registry.lookup("driver", "modbus-tcp") is ModbusTcp
    assert ModbusTcp.PRODUCES == ModbusRtu.PRODUCES
    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    rtu = raw["drivers"]["belt_weigher"]
    raw["drivers"]["belt_weigher"] = {"driver": "modbus-tcp", "host": "192.0.2.10", "slaves": rtu["slaves"]}
    cfg = parse_unit_config(raw, "ore.yaml")
    assert isinstance(cfg.drivers["belt_weigher"], ModbusTcpConfig)
