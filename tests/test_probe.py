"""`customs-edge probe` against the simulators on ptys: the wire both ways, one block per frame, with the
control calls and an ASCII column; Modbus RTU frames decoded; a thermal frame's min/max and heat map;
the baud rate / parity scan against a line that only speaks at one setting."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from customs_edge.cli.probe import RAMP, heat_map
from customs_edge.cli.probe_decode import Mlx90640Decoder, ModbusRtuDecoder
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.gate import GateSim
from customs_edge.simulators.ore_station import OreStation
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from customs_edge.simulators.wire import gymcu90640 as gy
from customs_edge.simulators.wire import modbus as rtu
from customs_edge.simulators.wire import toledo
from tests.conftest import unit_dict

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^([<>!#]) (\d{6}\.\d{3}) (\S+) +(.*)$")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", *args], capture_output=True, text=True, timeout=120)


def blocks(stderr: str) -> list[tuple[str, bytes | str]]:
    """The dump as (sign, what): a read or written block's bytes (its rows joined), a control call's or a
    decoded frame's text. Every line of the dump must have the documented shape."""
    out: list[tuple[str, bytes | str]] = []
    for ln in stderr.splitlines():
        if ln.startswith("{"):  # the closing summary
            continue
        m = LINE.match(ln)
        assert m, f"not a dump line: {ln!r}"
        sign, _, label, rest = m.groups()
        if sign in "<>":
            offset, hexpart = rest[:4], rest[6:6 + 49]
            ascii_col = rest[6 + 50:]  # after the hex part and one space
            data = bytes.fromhex(hexpart)
            assert ascii_col == "".join(chr(b) if 32 <= b < 127 else "." for b in data).rstrip()
            if offset == "0000":
                out.append((sign, data))
            else:
                prev_sign, prev = out[-1]
                assert prev_sign == sign and isinstance(prev, bytes) and int(offset, 16) == len(prev)
                out[-1] = (sign, prev + data)
        else:
            out.append((sign, f"{label} {rest}"))
    return out


def write_unit(tmp_path: Path, raw: dict[str, Any]) -> Path:
    raw["outbox"] = {"path": str(tmp_path / "agent" / "outbox.db")}
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_a_stream_instrument_is_dumped_one_frame_a_block_after_the_input_reset(tmp_path: Path) -> None:
    with Endpoints(ScaleSim(ScaleWorld(seed=1), rate_hz=50), use_pty=True, tcp_port=None) as urls:
        cfg = tmp_path / "unit.yaml"
        cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, urls["pty"], 1883)))
        res = cli("probe", "--config", str(cfg), "scale", "--count", "4", "--hexdump")
    assert res.returncode == 0, res.stderr
    dump = blocks(res.stderr)
    assert dump[0] == ("!", "Q-RX reset_input_buffer")
    frames = [b for sign, b in dump if sign == "<" and isinstance(b, bytes) and b.startswith(b"\x02")]
    assert len(frames) >= 4
    for f in frames[:4]:  # each block one whole frame: STX ... CR and its checksum byte, nothing more
        assert f.index(b"\r") == len(f) - 2 and f.count(b"\x02") == 1
    assert json.loads(res.stderr.splitlines()[-1])["readings"] == 4


def test_modbus_requests_and_replies_are_shown_and_decoded(tmp_path: Path) -> None:
    station = OreStation()
    with station.endpoints()["belt_weigher"] as urls:
        raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
        raw["drivers"]["belt_weigher"]["port"] = urls["pty"]
        res = cli("probe", "--config", str(write_unit(tmp_path, raw)), "belt_weigher", "--count", "2", "--hexdump")
    assert res.returncode == 0, res.stderr
    dump = blocks(res.stderr)
    request = next(i for i, (sign, _) in enumerate(dump) if sign == ">")
    (_, sent), (_, said), (_, got), (_, told) = dump[request:request + 4]
    assert isinstance(sent, bytes) and sent[:6] == bytes([1, 4, 0, 0, 0, 6])  # what the config asks: input 0..5
    assert said == "FRM modbus request: slave 1 read input (function 4) address 0 count 6, crc ok"
    assert isinstance(got, bytes) and got[:3] == bytes([1, 4, 12]) and len(got) == 17
    words = [int.from_bytes(got[3 + 2 * i:5 + 2 * i], "big") for i in range(6)]
    assert told == f"FRM modbus reply: slave 1 input (function 4) address 0 count 6 values {words}, crc ok"
    first = json.loads(res.stdout.splitlines()[0].split(" ", 1)[1])["points"]
    assert first["weigher_status"]["value"] == words[5]  # the decoded words are what the driver read
    assert first["speed_mps"]["value"] == pytest.approx(words[2] * 0.001)


def test_the_decoder_names_exceptions_bad_crcs_and_bits() -> None:
    d = ModbusRtuDecoder()
    assert d("TX", rtu.frame(bytes([3, 2, 0, 0, 0, 3]))) == \
        "modbus request: slave 3 read discrete (function 2) address 0 count 3, crc ok"
    assert d("RX", rtu.read_reply(3, 2, [1, 0, 1])).startswith("modbus reply: slave 3 discrete (function 2) "
                                                              "address 0 count 3 values [1, 0, 1], crc ok")
    assert d("RX", rtu.exception_reply(3, 2, rtu.ILLEGAL_DATA_ADDRESS)) == \
        "modbus reply: slave 3 function 2 EXCEPTION 2 (illegal data address), crc ok"
    bad = bytearray(rtu.read_reply(3, 4, [7]))
    bad[4] ^= 0x01
    assert "CRC MISMATCH" in d("RX", bytes(bad))
    assert "too short" in d("RX", b"\x03\x04")


@pytest.mark.parametrize("line", [ln for ln in (REPO / "tests" / "fixtures" / "gate" / "commands.txt")
                                  .read_text().splitlines() if ln and not ln.startswith("#")])
def test_every_module_command_of_the_manual_is_named(line: str) -> None:
    raw, setting, value = line.split("\t")
    words = {"rate_hz": f"refresh rate {value} Hz", "output": "output mode " + {
        "query": "query one frame", "automatic": "automatic output"}.get(value, "?"), "baudrate": f"baud rate {value}"}
    assert Mlx90640Decoder()("TX", bytes.fromhex(raw)) == f"mlx90640 command: {words[setting]}, sum ok"


def test_thermal_blocks_are_told_apart_frame_by_frame() -> None:
    px = np.full((24, 32), 25.0)
    good, bad = gy.frame(px, 24.0), gy.frame(px, 24.0, good_checksum=False)
    d = Mlx90640Decoder()
    assert d("RX", good) == "mlx90640: a 24x32 frame, checksum ok"
    assert d("RX", b"\x01\x02\x03" + bad + good[:100]) == (
        "mlx90640: 3 bytes that are no frame (a frame cut by the start, or noise); a 24x32 frame, checksum "
        "MISMATCH; 100 bytes of a frame not yet whole")


def test_a_heat_map_puts_the_hot_spot_where_it_is() -> None:
    px = np.full((24, 32), 20.0, dtype=np.float32)
    px[20, 29] = 36.5  # bottom right: row block 5 of 6, column block 7 of 8
    rows = heat_map(px, 8, 6)
    assert len(rows) == 6 and all(len(r) == 8 for r in rows)
    assert rows[5][7] == RAMP[-1]
    assert sum(r.count(RAMP[0]) for r in rows) == 47


def test_a_thermal_probe_shows_the_start_up_commands_min_max_and_a_heat_map(tmp_path: Path) -> None:
    sim = GateSim(3)
    with Endpoints(sim.thermal, use_pty=True, tcp_port=None) as urls:
        raw = yaml.safe_load((REPO / "configs" / "gate.yaml").read_text())
        raw["drivers"]["thermal"]["port"] = urls["pty"]
        res = cli("probe", "--config", str(write_unit(tmp_path, raw)), "thermal", "--count", "1", "--hexdump",
                  "--map", "16x12")
    assert res.returncode == 0, res.stderr
    dump = blocks(res.stderr)
    sent = [(b, dump[i + 1][1]) for i, (sign, b) in enumerate(dump) if sign == ">"]
    assert sent == [(bytes.fromhex("a5 25 04 ce"), "FRM mlx90640 command: refresh rate 8 Hz, sum ok"),  # rate_hz 8
                    (bytes.fromhex("a5 35 02 dc"), "FRM mlx90640 command: output mode automatic output, sum ok")]
    assert ("!", "Q-TX flush") in dump
    i, frame = next((i, b) for i, (sign, b) in enumerate(dump) if sign == "<" and isinstance(b, bytes))
    assert len(frame) == 1544 and frame.startswith(b"ZZ")  # one whole GY-MCU90640 frame in one block
    assert dump[i + 1] == ("#", "FRM mlx90640: a 24x32 frame, checksum ok")
    out = res.stdout.splitlines()
    m = re.match(r"  min (-?[\d.]+) °C  max (-?[\d.]+) °C at row (\d+) col (\d+)", out[1])
    assert m and float(m[1]) < float(m[2])
    grid = [ln for ln in out if ln.startswith("  |")]
    assert len(grid) == 12 and all(len(ln) == 16 + 4 for ln in grid)
    assert "".join(grid).count(RAMP[-1]) >= 1


B19200 = termios.B19200


@pytest.fixture
def picky_line() -> Iterator[str]:
    """A pty whose instrument speaks only at 19200 baud, 8N1 (checked on the line's own settings): at any
    other speed it sends junk, as a mismatched UART reads a real one."""
    master, slave = pty.openpty()
    stop = threading.Event()
    rng = random.Random(5)

    def serve() -> None:
        while not stop.wait(0.02):
            attrs = termios.tcgetattr(master)
            # a pty refuses even parity and keeps odd parity as PARODD alone: no parity is neither flag
            right = attrs[4] == B19200 and not attrs[2] & (termios.PARENB | termios.PARODD)
            data = toledo.frame(12.5) if right else bytes(rng.randrange(0x80, 0x100) for _ in range(18))
            try:
                os.write(master, data)
            except OSError:
                return

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield os.ttyname(slave)
    finally:
        stop.set()
        t.join(2)
        os.close(master)
        os.close(slave)


def test_the_scan_finds_the_one_baud_rate_that_gives_valid_frames(tmp_path: Path, picky_line: str) -> None:
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, picky_line, 1883)))
    res = cli("probe", "--config", str(cfg), "scale", "--scan", "--scan-seconds", "0.5")
    assert res.returncode == 0, res.stderr + res.stdout
    lines = res.stdout.splitlines()
    valid = [ln.split()[:2] for ln in lines if ln.endswith("<- valid frames")]
    assert valid == [["19200", "8N1"]]
    junk = next(ln for ln in lines if ln.split()[:2] == ["9600", "8N1"])
    assert " 0 valid" in junk and not junk.endswith("bytes")
    assert lines[-1].startswith("valid frames with: baudrate 19200 parity N; set these under drivers.scale")


def test_the_scan_is_refused_on_a_network_port(tmp_path: Path) -> None:
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, "socket://127.0.0.1:1", 1883)))
    res = cli("probe", "--config", str(cfg), "scale", "--scan")
    assert res.returncode == 1 and "needs a serial port" in res.stderr


def test_modbus_tcp_frames_are_shown_and_decoded_with_their_transaction(tmp_path: Path) -> None:
    from tests.test_modbus_pymodbus_server import free_port
    from tests.test_modbus_tcp import tcp_server

    port = free_port()
    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    slaves = raw["drivers"]["belt_weigher"]["slaves"]
    raw["drivers"]["belt_weigher"] = {"driver": "modbus-tcp", "host": "127.0.0.1", "port": port, "slaves": slaves}
    with tcp_server(port):  # pymodbus's own server: input registers 0-5 of unit 1 hold 4012.5 (float32), ...
        res = cli("probe", "--config", str(write_unit(tmp_path, raw)), "belt_weigher", "--count", "1", "--hexdump")
    assert res.returncode == 0, res.stderr
    dump = blocks(res.stderr)
    request = next(i for i, (sign, _) in enumerate(dump) if sign == ">")
    (_, sent), (_, said), (_, got), (_, told) = dump[request:request + 4]
    assert isinstance(sent, bytes) and sent[2:] == bytes([0, 0, 0, 6, 1, 4, 0, 0, 0, 6])  # MBAP, then the PDU
    tid = int.from_bytes(sent[:2], "big")
    assert said == f"FRM modbus tcp transaction {tid} request: slave 1 read input (function 4) address 0 count 6"
    assert isinstance(got, bytes) and got[:2] == sent[:2]
    words = [int.from_bytes(got[9 + 2 * i:11 + 2 * i], "big") for i in range(6)]
    assert struct.unpack(">f", struct.pack(">HH", *words[:2]))[0] == 4012.5
    assert told == (f"FRM modbus tcp transaction {tid} reply: slave 1 input (function 4) address 0 count 6 "
                    f"values {words}")


def test_probe_warns_when_a_running_unit_holds_the_outbox_and_the_port(tmp_path: Path) -> None:
    """Before: the probe opened the port beside the running unit and each read half the bytes."""
    import serial

    from customs_edge.agent.outbox import SqliteOutbox

    master, slave = pty.openpty()
    line = os.ttyname(slave)
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, line, 1883)))
    held = serial.Serial(line, exclusive=True)  # this process holds the port as a running unit does
    outbox = SqliteOutbox(tmp_path / "agent" / "outbox.db")  # and its outbox, locked as the agent locks it
    try:
        res = cli("probe", "--config", str(cfg), "scale", "--count", "1", "--seconds", "0.5")
    finally:
        outbox.close()
        held.close()
        os.close(master)
        os.close(slave)
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 2, res.stderr
    assert warnings[0].startswith(f"warning: a running agent (pid {os.getpid()}) holds {tmp_path}/agent/outbox.db")
    assert warnings[1].startswith(f"warning: {line} is held by pid {os.getpid()} (")
    assert all("stop it first" in w for w in warnings)


def test_probe_does_not_warn_about_a_port_another_process_has_open_without_the_lock(tmp_path: Path) -> None:
    """A simulator's pty (or a terminal) is open elsewhere but not locked: no running unit there."""
    master, slave = pty.openpty()
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, os.ttyname(slave), 1883)))
    try:
        res = cli("probe", "--config", str(cfg), "scale", "--count", "1", "--seconds", "0.5")
    finally:
        os.close(master)
        os.close(slave)
    assert "warning" not in res.stderr, res.stderr


def test_probe_does_not_warn_when_nothing_holds_the_outbox_or_the_port(tmp_path: Path) -> None:
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, "socket://127.0.0.1:1", 1883)))
    res = cli("probe", "--config", str(cfg), "scale", "--count", "1", "--seconds", "0.5")
    assert "warning" not in res.stderr, res.stderr
