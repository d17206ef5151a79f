"""`customs-edge check`: every check line in its passing and its failing state, against simulators,
a real mosquitto and real files; and the command's output, exit codes and JSON."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from customs_edge.agent.config import parse_unit_config
from customs_edge.cli import check
from customs_edge.hub.brokers import Mosquitto, free_port
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from tests.conftest import unit_dict

REPO = Path(__file__).resolve().parent.parent


def unit(tmp_path: Path, port: str, broker_port: int, **over: Any) -> Any:
    return parse_unit_config(unit_dict(tmp_path, port, broker_port, **over))


def write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    f = tmp_path / "unit.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


@pytest.fixture
def scale_socket() -> Iterator[str]:
    with Endpoints(ScaleSim(ScaleWorld(seed=1), rate_hz=50), use_pty=False) as urls:
        yield urls["socket"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", *args], capture_output=True, text=True, timeout=120)


# --- the whole command ------------------------------------------------------------------------------

def history(path: Path, records: int = 361, span_s: float = 3600, payload_chars: int = 1000) -> None:
    """An outbox that has run: `records` records evenly over `span_s` seconds, as the agent stores them."""
    from customs_edge.agent.outbox import SqliteOutbox
    from customs_edge.core.records import RecordIn

    t0 = time.time() - span_s
    o = SqliteOutbox(path)
    try:
        o.put([RecordIn(type="t", ts=t0 + i * span_s / max(1, records - 1), payload={"x": "a" * payload_chars})
               for i in range(records)])
    finally:
        o.close()


def test_a_healthy_unit_passes_every_check(tmp_path: Path, scale_socket: str, mosquitto: Mosquitto) -> None:
    from tests.fleet import HubThread

    raw = unit_dict(tmp_path, scale_socket, mosquitto.port)
    f = write(tmp_path, raw)
    history(Path(raw["outbox"]["path"]))
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()  # answers the round trip
    try:
        res = cli("check", "--config", str(f))
        assert res.returncode == 0, res.stdout + res.stderr
        lines = res.stdout.splitlines()
        assert [ln.split(":")[0] for ln in lines] == ["✓ config", "✓ cross-references", "✓ models", "✓ port scale",
                                                      "✓ outbox", "✓ outage headroom (8 h)", "✓ broker", "✓ hub",
                                                      "✓ clock"]
        assert res.stderr == ""
        js = cli("check", "--config", str(f), "--json")
        doc = json.loads(js.stdout)
        assert js.returncode == 0 and doc["result"] == "ok" and len(doc["checks"]) == 9
    finally:
        hub.stop()


def test_a_broken_unit_fails_with_a_fix_per_failure(tmp_path: Path) -> None:
    raw = unit_dict(tmp_path, str(tmp_path / "ttyUSB9"), free_port())
    raw["sync"]["connect_timeout_s"] = 1
    f = write(tmp_path, raw)
    res = cli("check", "--config", str(f), "--json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    states = {c["check"]: c["state"] for c in doc["checks"]}
    assert states == {"config": "ok", "cross-references": "ok", "models": "ok", "port scale": "fail",
                      "outbox": "ok", "outage headroom (8 h)": "warn", "broker": "fail", "hub": "fail",
                      "clock": "ok"}
    assert all(c["fix"] for c in doc["checks"] if c["state"] != "ok")
    text = cli("check", "--config", str(f)).stdout
    assert "✗ port scale:" in text and "✗ broker:" in text and text.count("    fix: ") == 4


def test_only_warnings_exit_3(tmp_path: Path, scale_socket: str, mosquitto: Mosquitto) -> None:
    raw = unit_dict(tmp_path, scale_socket, mosquitto.port)
    raw["drivers"]["scale"]["baudrate"] = 9600  # ignored on a socket:// port
    from tests.fleet import HubThread

    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    try:
        res = cli("check", "--config", str(write(tmp_path, raw)))
    finally:
        hub.stop()
    assert res.returncode == 3, res.stdout
    assert "! cross-references: drivers.scale.baudrate: has no effect on a socket:// port" in res.stdout


def test_an_invalid_config_stops_there(tmp_path: Path) -> None:
    raw = unit_dict(tmp_path, "/dev/ttyUSB0", 1883)
    raw["sync"]["prot"] = 1
    res = cli("check", "--config", str(write(tmp_path, raw)))
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert lines[0].startswith("✗ config:") and "sync.prot: unknown key (did you mean 'port'?)" in lines[0]
    assert lines[1].startswith("    fix: edit the keys named") and lines[2].startswith("✓ clock")


# --- models -------------------------------------------------------------------------------------------

def ore_unit(tmp_path: Path, manifest: Path | None = None) -> Any:
    raw = yaml.safe_load((REPO / "configs" / "ore-station.yaml").read_text())
    if manifest:
        raw["app"]["model_manifest"] = str(manifest)
    return parse_unit_config(raw)


def test_models_present_and_matching(tmp_path: Path) -> None:
    assert check.check_models(ore_unit(tmp_path)).state == check.OK


def test_a_model_file_changed_since_its_manifest_fails(tmp_path: Path) -> None:
    shutil.copytree(REPO / "models" / "ore_grade", tmp_path / "m")
    onnx = tmp_path / "m" / "ore_grade.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    r = check.check_models(ore_unit(tmp_path, tmp_path / "m" / "manifest.json"))
    assert r.state == check.FAIL and "reinstall the package" in r.fix


def test_a_missing_model_file_fails(tmp_path: Path) -> None:
    shutil.copytree(REPO / "models" / "ore_grade", tmp_path / "m")
    (tmp_path / "m" / "ore_grade.onnx").unlink()
    r = check.check_models(ore_unit(tmp_path, tmp_path / "m" / "manifest.json"))
    assert r.state == check.FAIL


# --- ports --------------------------------------------------------------------------------------------

def port_result(tmp_path: Path, port: str, timeout: float = 5.0, **driver: Any) -> check.Result:
    cfg = unit(tmp_path, port, 1883, drivers={"scale": {"driver": "toledo-continuous", "port": port, **driver}})
    return check.check_port("scale", cfg.drivers["scale"], timeout)


def test_a_port_with_valid_frames_passes(tmp_path: Path, scale_socket: str) -> None:
    r = port_result(tmp_path, scale_socket)
    assert r.state == check.OK and "a valid weight frame" in r.detail


def test_a_missing_port_lists_the_ports_present(tmp_path: Path) -> None:
    r = port_result(tmp_path, str(tmp_path / "ttyUSB7"))
    assert r.state == check.FAIL and r.detail.endswith("ttyUSB7 does not exist")
    assert r.fix.startswith("serial ports present: ") and "/dev/serial/by-id" in r.fix


def test_a_port_held_by_another_process_names_it(tmp_path: Path) -> None:
    with Endpoints(ScaleSim(ScaleWorld(seed=1), rate_hz=50), tcp_port=None) as urls:
        pty = urls["pty"]
        # the holder keeps the port until it is terminated below; its sleep only bounds an orphan's life
        holder = subprocess.Popen([sys.executable, "-c", "import serial, sys, time\n"
                                   f"s = serial.Serial({pty!r}, exclusive=True)\nprint('held', flush=True)\n"
                                   "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            r = port_result(tmp_path, pty)
            assert r.state == check.FAIL and f"is held by pid {holder.pid} (" in r.detail
            assert "stop that process" in r.fix
        finally:
            holder.terminate()
            holder.wait(10)
        assert port_result(tmp_path, pty).state == check.OK


def test_corrupt_frames_point_at_the_line_settings(tmp_path: Path) -> None:
    with Endpoints(ScaleSim(ScaleWorld(seed=1), rate_hz=50, with_checksum=False), use_pty=False) as urls:
        r = port_result(tmp_path, urls["socket"], timeout=2.0, checksum="on")
    assert r.state == check.FAIL and "corrupt frames and no valid one" in r.detail
    assert "baudrate, parity, bytesize" in r.fix and "--hexdump" in r.fix


def test_a_silent_port_says_nothing_arrived(tmp_path: Path) -> None:
    lst = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []
    t = threading.Thread(target=lambda: conns.append(lst.accept()[0]), daemon=True)
    t.start()
    try:
        r = port_result(tmp_path, f"socket://127.0.0.1:{lst.getsockname()[1]}", timeout=1.0)
    finally:
        t.join(5)
        for c in conns:
            c.close()
        lst.close()
    assert r.state == check.FAIL and "nothing arrived in 1 s" in r.detail and "wiring" in r.fix


def test_a_port_that_does_not_open_fails(tmp_path: Path) -> None:
    r = port_result(tmp_path, f"socket://127.0.0.1:{free_port()}")
    assert r.state == check.FAIL and r.detail.startswith("cannot open socket://127.0.0.1:")


# --- outbox -------------------------------------------------------------------------------------------

def test_outbox_directory_writable_passes_and_creates_nothing(tmp_path: Path) -> None:
    cfg = unit(tmp_path, "/dev/null", 1883)
    r = check.check_outbox(cfg)
    assert r.state == check.OK and "(the agent creates" in r.detail
    assert not cfg.outbox.path.parent.exists()


def test_outbox_under_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    cfg = unit(tmp_path, "/dev/null", 1883, outbox={"path": str(tmp_path / "plain" / "sub" / "outbox.db")})
    r = check.check_outbox(cfg)
    assert r.state == check.FAIL and "is a file" in r.detail


def test_outbox_cap_beyond_the_free_space_warns(tmp_path: Path) -> None:
    cfg = unit(tmp_path, "/dev/null", 1883, outbox={"max_mb": 1e12})
    r = check.check_outbox(cfg)
    assert r.state == check.WARN and "less than outbox.max_mb" in r.detail and "lower outbox.max_mb" in r.fix


def test_outbox_held_by_a_running_agent_warns_with_its_pid(tmp_path: Path) -> None:
    from customs_edge.agent.outbox import SqliteOutbox

    cfg = unit(tmp_path, "/dev/null", 1883)
    # the agent stand-in keeps its outbox open until it is terminated below; its sleep only bounds an orphan's life
    code = ("import sys, time\nfrom customs_edge.agent.outbox import SqliteOutbox\n"
            f"o = SqliteOutbox({str(cfg.outbox.path)!r})\nprint('open', flush=True)\ntime.sleep(120)")
    SqliteOutbox(cfg.outbox.path).close()
    agent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "open"
        r = check.check_outbox(cfg)
        assert r.state == check.WARN and f"(pid {agent.pid})" in r.detail
    finally:
        agent.terminate()
        agent.wait(10)
    assert check.check_outbox(cfg).state == check.OK


def test_outage_headroom_without_history_says_the_rate_is_unknown(tmp_path: Path) -> None:
    cfg = unit(tmp_path, "/dev/null", 1883)
    r = check.check_headroom(cfg, 8)
    assert r.state == check.WARN and r.detail.startswith("the record rate is unknown: ")
    assert "no outbox file there" in r.detail and "run the unit for an hour and check again" in r.fix
    assert not cfg.outbox.path.parent.exists()  # read-only: nothing created
    history(cfg.outbox.path, records=1)
    r = check.check_headroom(cfg, 8)
    assert r.state == check.WARN and "holds 1 record: no history" in r.detail


def test_outage_headroom_compares_rate_times_hours_with_the_cap(tmp_path: Path) -> None:
    # 0.1 records/s of ~1,070 B (1,000 chars of payload and its JSON, + 64): ~2.9 MiB in 8 h, ~0.4 MiB in 1 h
    small = unit(tmp_path, "/dev/null", 1883, outbox={"max_mb": 2})
    history(small.outbox.path)
    r = check.check_headroom(small, 8)
    assert r.state == check.WARN and r.detail.startswith("0.1 records/s of 10")
    assert "more than outbox.max_mb (2 MiB)" in r.detail and r.fix == "raise outbox.max_mb to 3 or more"
    assert check.check_headroom(small, 1).state == check.OK
    big = unit(tmp_path, "/dev/null", 1883, outbox={"max_mb": 4})
    assert check.check_headroom(big, 8).state == check.OK


def test_outage_hours_option_reaches_the_check(tmp_path: Path) -> None:
    raw = unit_dict(tmp_path, str(tmp_path / "ttyUSB9"), free_port(), outbox={"max_mb": 2})
    raw["sync"]["connect_timeout_s"] = 1
    history(Path(raw["outbox"]["path"]))
    f = write(tmp_path, raw)
    states = {c["check"]: c["state"] for c in json.loads(cli("check", "--config", str(f), "--json",
                                                             "--outage-hours", "1").stdout)["checks"]}
    assert states["outage headroom (1 h)"] == "ok"


# --- broker -------------------------------------------------------------------------------------------

def test_broker_accepting_passes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    r = check.check_broker(unit(tmp_path, "/dev/null", mosquitto.port))
    assert r.state == check.OK and "accepted the connection" in r.detail


def test_broker_refusing_the_password_says_so(tmp_path: Path, mosquitto_with_password: Mosquitto) -> None:
    cfg = unit(tmp_path, "/dev/null", mosquitto_with_password.port, sync={"username": "unit", "password": "wrong"})
    r = check.check_broker(cfg)
    assert r.state == check.FAIL and "CONNACK refused: not authorised" in r.detail
    assert r.fix == "check sync.username, sync.password and the broker's ACL"
    ok = unit(tmp_path, "/dev/null", mosquitto_with_password.port, sync={"username": "unit", "password": "right"})
    assert check.check_broker(ok).state == check.OK


def test_broker_unreachable_fails(tmp_path: Path) -> None:
    r = check.check_broker(unit(tmp_path, "/dev/null", free_port()))
    assert r.state == check.FAIL and "Connection refused" in r.detail and "sync.host and sync.port" in r.fix


# --- clock --------------------------------------------------------------------------------------------

def test_clock_after_the_build_passes() -> None:
    assert check.check_clock().state == check.OK


def test_clock_before_the_build_fails() -> None:
    r = check.check_clock(now=0.0)
    assert r.state == check.FAIL and "reads 1970-01-01" in r.detail and "NTP" in r.fix


