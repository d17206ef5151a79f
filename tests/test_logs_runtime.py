"""Logs to commission with: alerts at WARNING with their type and payload, every record at DEBUG, one
summary line per interval per unit, and the reopen attempts of a driver that stays down with the next
retry time (each at first, then at most one an interval)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from customs_edge.agent import runtime
from customs_edge.agent.apps.base import App
from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.runtime import Unit
from customs_edge.core.mqtt import Backoff
from customs_edge.core.readings import Reading
from customs_edge.core.records import Priority, RecordIn
from tests.conftest import script_driver, unit_dict, wait_for
from tests.test_logs import parse
from tests.test_modbus_pymodbus_server import free_port

LOGGER = "customs_edge.agent.runtime"


@dataclass(frozen=True, slots=True, kw_only=True)
class Made(Reading):
    """A test reading naming the record the app makes of it."""

    KIND = "made"
    type: str
    priority: int


class Maker(App):
    def __init__(self) -> None:
        super().__init__("logs-1", None)

    def feed(self, reading: Reading) -> list[RecordIn]:
        assert isinstance(reading, Made)
        return [RecordIn(type=reading.type, priority=Priority(reading.priority), payload={"cps": 412.5})]


def maker_unit(tmp_path: Path, made: list[tuple[str, Priority]]) -> Unit:
    cfg = parse_unit_config(unit_dict(tmp_path, "unused", 9))
    steps = [Made(source="script", type=t, priority=int(p)) for t, p in made]
    return Unit(cfg, app=Maker(), drivers={"script": script_driver("script", steps)})


def records_named(caplog: pytest.LogCaptureFixture, msg: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.getMessage() == msg]


def test_an_alert_is_logged_at_warning_and_every_record_at_debug(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    unit = maker_unit(tmp_path, [("weighing", Priority.EVENT), ("radiation_alarm", Priority.ALERT),
                                 ("weighing", Priority.EVENT)])
    unit.start()
    try:
        wait_for(lambda: records_named(caplog, "alert"), 20, "the alert's log line")
        wait_for(lambda: len(records_named(caplog, "record")) >= 2, 20, "the other records at DEBUG")
    finally:
        unit.stop()
    (alert,) = records_named(caplog, "alert")
    assert alert.levelno == logging.WARNING
    assert alert.__dict__["type"] == "radiation_alarm" and '"cps":412.5' in alert.__dict__["payload"]
    debug = records_named(caplog, "record")
    assert {r.levelno for r in debug} == {logging.DEBUG}
    assert [r.__dict__["type"] for r in debug if r.__dict__["type"] == "weighing"] == ["weighing", "weighing"]


def test_a_long_payload_is_cut_in_the_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    unit = maker_unit(tmp_path, [])
    unit._log_records([RecordIn(type="frame_alert", priority=Priority.ALERT, payload={"px": list(range(1000))})])
    unit.outbox.close()
    (alert,) = records_named(caplog, "alert")
    assert len(alert.__dict__["payload"]) == runtime.PAYLOAD_LOG_CHARS + 3
    assert alert.__dict__["payload"].endswith("...")


def test_a_summary_line_counts_records_by_type_with_backlog_link_and_drivers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(runtime, "SUMMARY_S", 0.3)
    unit = maker_unit(tmp_path, [("weighing", Priority.EVENT)] * 3 + [("radiation_alarm", Priority.ALERT)])
    unit.start()
    try:
        line = wait_for(lambda: [r for r in records_named(caplog, "summary") if r.__dict__["records"]], 20,
                        "a summary line counting the records")
        wait_for(lambda: len(records_named(caplog, "summary")) >= 3, 20, "one summary line per interval")
    finally:
        unit.stop()
    counted = [r.__dict__ for r in records_named(caplog, "summary")]
    assert sum(s["records"] for s in counted) == 4  # each record counted once, in the minute it was made
    by_type = Counter[str]()
    for s in counted:
        for item in filter(None, s["by_type"].strip("-").split(",")):
            kind, n = item.split(":")
            by_type[kind] += int(n)
    assert by_type == {"weighing": 3, "radiation_alarm": 1}
    first = line[0].__dict__
    assert first["device_id"] == unit.cfg.device_id and first["link"] == "down"  # no broker on port 9
    assert first["drivers_up"] == "script" and first["drivers_down"] == "-"
    assert isinstance(first["backlog"], int) and first["backlog"] >= 1
    assert all(r.levelno == logging.INFO for r in records_named(caplog, "summary"))


def test_a_driver_that_stays_down_logs_its_reopen_attempts_with_the_next_retry_rate_limited(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(runtime, "Backoff", lambda lo, hi: Backoff(0.02, 0.05))
    monkeypatch.setattr(runtime, "REOPEN_LOG_FIRST", 3)
    monkeypatch.setattr(runtime, "REOPEN_LOG_S", 0.5)
    cfg = parse_unit_config(unit_dict(tmp_path, "socket://127.0.0.1:1", 9))  # nothing listens on port 1
    unit = Unit(cfg)
    unit.start()
    try:
        (thread,) = unit._driver_threads
        wait_for(lambda: thread.reopen_attempts >= 40, 60, "forty failed reopens")
        wait_for(lambda: [r for r in records_named(caplog, "driver still down; reopen failed")
                          if r.__dict__["attempt"] > 3], 30, "a reopen line after the first ones")
    finally:
        unit.stop()
    (fault,) = records_named(caplog, "driver fault")
    assert fault.__dict__["driver"] == "scale" and "next_retry" in fault.__dict__
    reopens = [r.__dict__ for r in records_named(caplog, "driver still down; reopen failed")]
    assert [r["attempt"] for r in reopens[:3]] == [1, 2, 3]  # each attempt at first
    later = [r["attempt"] for r in reopens[3:]]
    assert later and len(later) < thread.reopen_attempts - 3  # then not every attempt
    for r in reopens:
        assert r["driver"] == "scale" and "cannot open socket://127.0.0.1:1" in r["error"]
        assert 0 < r["retry_in_s"] <= 0.05 + 0.05
        retry = time.strptime(r["next_retry"], "%Y-%m-%dT%H:%M:%SZ")
        assert abs(time.mktime(retry) - time.mktime(time.gmtime())) < 3600


def test_a_running_agent_logs_the_dead_ports_reopen_attempts_on_stderr(tmp_path: Path) -> None:
    """The same through `customs-edge run`: logfmt lines a technician reads in the journal."""
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, "socket://127.0.0.1:1", free_port())))
    agent = subprocess.Popen([sys.executable, "-m", "customs_edge", "run", "--config", str(cfg)],
                             stderr=subprocess.PIPE, text=True)
    lines: list[dict[str, str]] = []

    def collect() -> None:
        assert agent.stderr is not None
        for ln in agent.stderr:
            lines.append(parse(ln.rstrip("\n")))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        wait_for(lambda: [x for x in lines if x["event"] == "driver still down; reopen failed"
                          and x["attempt"] == "2"], 60, "the second failed reopen on stderr")
    finally:
        agent.terminate()
        agent.wait(30)
        reader.join(10)
    fault = next(x for x in lines if x["event"] == "driver fault")
    reopens = [x for x in lines if x["event"] == "driver still down; reopen failed"]
    assert fault["level"] == "warning" and fault["driver"] == "scale"
    for x in [fault, *reopens]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", x["next_retry"]) and float(x["retry_in_s"]) > 0
    assert [x["attempt"] for x in reopens[:2]] == ["1", "2"]
    assert all("cannot open socket://127.0.0.1:1" in x["error"] for x in reopens)
