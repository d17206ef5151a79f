"""The runtime under bad inputs and failing parts: records refused where they are made, an app that
raises, a record the outbox refuses, an outbox that fails for a while or at stop, and a reload whose old
driver still holds its serial port. The unit never loops forever, never loses good records silently."""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from customs_edge.agent import runtime
from customs_edge.agent.apps.base import App
from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.agent.runtime import Unit
from customs_edge.core.errors import DriverFault
from customs_edge.core.readings import Reading
from customs_edge.core.records import RecordIn
from customs_edge.drivers.base import SerialDriver, SerialPortConfig, open_serial
from tests.conftest import script_driver, unit_dict, wait_for
from tests.test_runtime_state import stored

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("kw", "where"), [
    ({"ts": NAN}, "ts"),
    ({"ts": INF}, "ts"),
    ({"payload": {"a": {"b": [1, 2.5, NAN]}}}, "payload.a.b[2]"),
    ({"payload": {"weight": -INF}}, "payload.weight"),
    ({"payload": {"cps": np.float32("nan")}}, "payload.cps"),
    ({"payload": {"frame": np.array([[20.0, 21.0], [INF, 22.0]])}}, "payload.frame[2]"),
    ({"payload": {"rows": ({"t": 1.0}, {"t": NAN})}}, "payload.rows[1].t"),
])
def test_a_record_with_a_non_finite_number_is_refused_where_it_is_made(kw: dict[str, Any], where: str) -> None:
    with pytest.raises(ValueError, match="finite") as exc:
        RecordIn(type="x", **kw)
    assert where in str(exc.value)


def test_finite_records_of_every_shape_are_accepted() -> None:
    r = RecordIn(type="x", ts=1.7e9, payload={"a": [1, 2.5, None, "nan", True], "b": {"c": np.float32(1.5)},
                                              "d": np.arange(4), "e": np.zeros(3)})
    assert r.payload["a"][3] == "nan"


@dataclass(frozen=True, slots=True, kw_only=True)
class EchoReading(Reading):
    """A test reading: the record type, a number and a ts (NaN allowed: the app, not the reading, fails)."""

    KIND = "echo"
    type: str
    n: int
    at: float | None = None


class Echo(App):
    """One record per reading: type and ts from the reading's values (a NaN ts makes RecordIn raise)."""

    def __init__(self) -> None:
        super().__init__("rt-1", None)
        self.fed = 0

    def feed(self, reading: Reading) -> list[RecordIn]:
        self.fed += 1
        assert isinstance(reading, EchoReading)
        return [RecordIn(type=reading.type, ts=time.time() if reading.at is None else reading.at,
                         payload={"n": reading.n})]

    def close(self) -> list[RecordIn]:
        return [RecordIn(type="closing")]


def steps(*specs: tuple[str, int, float | None]) -> list[EchoReading]:
    return [EchoReading(source="script", type=t, n=n, at=ts) for t, n, ts in specs]


def echo_unit(tmp_path: Path, specs: list[EchoReading], outbox: SqliteOutbox | None = None) -> tuple[Unit, Echo]:
    cfg = parse_unit_config(unit_dict(tmp_path, "unused", 9))
    app = Echo()
    unit = Unit(cfg, app=app, outbox=outbox, drivers={"script": script_driver("script", specs)})
    unit.start()
    return unit, app


class FailingOutbox(SqliteOutbox):
    """The real outbox, made to fail: always while `down` is set, and for any batch holding a record of
    type 'poison' (a record the store cannot take)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = threading.Event()

    def put(self, records: Any, *args: Any, **kw: Any) -> range:
        if self.down.is_set():
            raise sqlite3.OperationalError("disk I/O error")
        if any(r.type == "poison" for r in records):
            raise sqlite3.IntegrityError("NOT NULL constraint failed: records.ts")
        return super().put(records, *args, **kw)


def test_an_app_error_is_counted_and_reported_once_and_the_unit_goes_on(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    specs = steps(("ok", 0, None), *[("ok", i, NAN) for i in range(1, 51)], *[("ok", i, None) for i in range(51, 55)])
    unit, _ = echo_unit(tmp_path, specs)
    ob = unit.cfg.outbox.path
    try:
        wait_for(lambda: len(stored(ob, "ok")) == 5, 20, "the good records committed")
        wait_for(lambda: stored(ob, "app_error"), 5, "the app_error record")
        assert unit.health()
    finally:
        unit.stop()
    assert [r["n"] for r in stored(ob, "ok")] == [0, 51, 52, 53, 54]
    (error,) = stored(ob, "app_error")  # fifty errors, one record a minute at most
    assert error["where"] == "feed:script/echo" and "ts" in error["error"] and "finite" in error["error"]
    assert unit.counters["app_errors"] == 50
    assert caplog.text.count("app failed on an input") == 1


def test_a_record_the_outbox_refuses_is_set_aside_and_its_neighbours_are_committed(tmp_path: Path) -> None:
    outbox = FailingOutbox(tmp_path / "agent" / "outbox.db")
    specs = steps(*[("ok", i, None) for i in range(10)], ("poison", 10, None),
                  *[("ok", i, None) for i in range(11, 21)])
    unit, _ = echo_unit(tmp_path, specs, outbox)
    ob = unit.cfg.outbox.path
    try:
        wait_for(lambda: len(stored(ob, "ok")) == 20, 20, "every good record committed")
        assert unit.health()
    finally:
        unit.stop()
    assert [r["n"] for r in stored(ob, "ok")] == [*range(10), *range(11, 21)]
    (aside,) = [json.loads(line) for line in Path(f"{ob}.unsent.jsonl").read_text().splitlines()]
    assert (aside["type"], aside["payload"], aside["device_id"]) == ("poison", {"n": 10}, unit.cfg.device_id)
    assert unit.counters["records_unsent"] == 1


def test_while_the_outbox_fails_the_core_goes_on_and_commits_everything_once_it_is_back(tmp_path: Path) -> None:
    outbox = FailingOutbox(tmp_path / "agent" / "outbox.db")
    outbox.down.set()
    unit, app = echo_unit(tmp_path, steps(*[("ok", i, None) for i in range(5)]), outbox)
    ob = unit.cfg.outbox.path
    try:
        wait_for(lambda: app.fed == 5, 10, "every reading fed to the app while the outbox fails")
        beat = unit.heartbeat
        wait_for(lambda: unit.heartbeat > beat, 5, "the core's heartbeat while the outbox fails")
        assert stored(ob, "ok") == [] and unit.counters["commit_failures"] >= 1
        outbox.down.clear()
        wait_for(lambda: len(stored(ob, "ok")) == 5, 15, "the held records committed once the outbox is back")
    finally:
        unit.stop()
    assert [r["n"] for r in stored(ob, "ok")] == list(range(5))
    assert not Path(f"{ob}.unsent.jsonl").exists() and unit.counters["records_unsent"] == 0


def test_a_final_commit_that_fails_at_stop_writes_the_records_to_a_fallback_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox = FailingOutbox(tmp_path / "agent" / "outbox.db")
    outbox.down.set()
    unit, app = echo_unit(tmp_path, steps(*[("ok", i, None) for i in range(5)]), outbox)
    wait_for(lambda: app.fed == 5, 10, "every reading fed to the app")
    t0 = time.monotonic()
    unit.stop()
    assert time.monotonic() - t0 < 10  # bounded attempts, no endless retry
    lines = [json.loads(line) for line in Path(f"{unit.cfg.outbox.path}.unsent.jsonl").read_text().splitlines()]
    assert Counter(x["type"] for x in lines) == {"ok": 5, "closing": 1}
    assert sorted(x["payload"]["n"] for x in lines if x["type"] == "ok") == list(range(5))
    assert unit.counters["records_unsent"] == 6
    assert "records not committed to the outbox; written to the fallback file" in caplog.text
    assert any(r.levelname == "ERROR" and getattr(r, "records", None) == 6 for r in caplog.records)


@pytest.fixture
def pty_path() -> Any:
    master, slave = pty.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_an_outbox_file_deleted_under_the_unit_and_new_dead_letters_raise_alerts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The outbox notices; the runtime must tell the hub: one ALERT per new file problem, and one per batch
    of records newly set aside as dead letters (not for those counted before the unit started)."""
    monkeypatch.setattr(runtime, "WATCH_S", 0.05)
    watches = Counter[str]()
    real_watch = Unit._watch_outbox

    def counted(self: Unit) -> list[RecordIn]:
        watches["n"] += 1
        return real_watch(self)

    monkeypatch.setattr(Unit, "_watch_outbox", counted)
    outbox = SqliteOutbox(tmp_path / "agent" / "outbox.db")
    outbox.put([RecordIn(type="old")])
    outbox.reject([(1, 1)], "before this start")
    unit, _ = echo_unit(tmp_path, steps(*[("ok", i, None) for i in range(3)]), outbox)
    try:
        wait_for(lambda: unit.committed >= 3, 10, "three records committed")
        outbox.reject([(2, 2)], "rejected by the hub")
        Path(tmp_path / "agent" / "outbox.db").unlink()

        def alerts() -> list[tuple[str, dict[str, Any]]]:
            return [(r.type, json.loads(r.payload)) for r in outbox.begin(10_000) if r.priority == 3]

        def both() -> list[tuple[str, dict[str, Any]]]:
            outbox.release()
            got = alerts()
            return got if {t for t, _ in got} == {"outbox_alert", "dead_letters"} else []

        got = dict(wait_for(both, 10, "an outbox_alert and a dead_letters alert"))
        seen = watches["n"]
        wait_for(lambda: watches["n"] >= seen + 5, 10, "five more looks")  # a problem still there: no new alert
        outbox.release()
        assert sorted(t for t, _ in alerts()) == ["dead_letters", "outbox_alert"]
    finally:
        unit.stop()
    assert "deleted" in got["outbox_alert"]["problem"] or "replaced" in got["outbox_alert"]["problem"]
    assert got["dead_letters"]["new"] == {"rejected by the hub": 1}


def test_a_serial_port_is_opened_exclusively(pty_path: str) -> None:
    cfg = SerialPortConfig(driver="x", port=pty_path)
    first = open_serial(cfg)
    try:
        with pytest.raises(DriverFault, match="one master per line"):
            open_serial(cfg)
    finally:
        first.close()
    open_serial(cfg).close()  # free again once closed


class SlowPoll(SerialDriver):
    """A bus master whose poll holds the line until `release` is set (a slave answering slowly)."""

    def __init__(self, role: str, config: SerialPortConfig, release: threading.Event,
                 line: dict[str, int]) -> None:
        super().__init__(role, config)
        self.release, self.line = release, line
        self.polling = threading.Event()

    def open(self) -> None:
        super().open()
        self.line["open"] += 1
        self.line["most"] = max(self.line["most"], self.line["open"])

    def close(self) -> None:
        if self._port is not None:
            self.line["open"] -= 1
        super().close()

    def read(self) -> Reading | None:
        self._require_port()
        self.polling.set()
        self.release.wait(60)
        time.sleep(0.05)
        return None


def test_a_reload_opens_a_port_only_once_the_old_driver_let_go_of_it(tmp_path: Path, pty_path: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from customs_edge.agent.runtime import replace_unit

    raw = unit_dict(tmp_path, pty_path, 9)
    cfg = parse_unit_config(raw)
    line = {"open": 0, "most": 0}
    stuck, free = threading.Event(), threading.Event()
    free.set()
    old_driver = SlowPoll("scale", cfg.drivers["scale"], stuck, line)
    unit = Unit(cfg, drivers={"scale": old_driver})
    unit.start()
    new = None
    try:
        wait_for(old_driver.polling.is_set, 10, "the old driver inside a slow poll")
        raw["drivers"]["scale"]["silent_after_s"] = 4
        new_cfg = parse_unit_config(raw)
        new_driver = SlowPoll("scale", new_cfg.drivers["scale"], free, line)
        new = replace_unit(unit, new_cfg, drivers={"scale": new_driver})
        assert "driver still busy after stop" in caplog.text  # the bounded wait ran out, and said so
        assert new_driver.stats.opened == 0 and new.status_extra()["drivers"]["scale"]["waiting_for_port"]
        stuck.set()  # the slow poll ends: the old thread closes the port and ends
        wait_for(lambda: new_driver.stats.opened == 1, 10, "the new driver to open the port")
        assert not new.status_extra()["drivers"]["scale"]["waiting_for_port"]
    finally:
        stuck.set()
        if new is not None:
            new.stop()
    assert line["most"] == 1  # never two masters on the line
    assert new_driver.stats.faults == 0  # it waited; it did not fail to lock the port
