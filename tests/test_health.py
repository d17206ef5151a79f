"""Health telemetry against a real mosquitto and hub: what a unit reports, when (every health_interval_s
and when a driver goes up or down), what the hub keeps, what it ignores, and `hub fleet`."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import customs_edge
from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.health import HealthSampler, Thermal, config_hash, model_versions
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.agent.runtime import Unit
from customs_edge.cli.main import main
from customs_edge.core.errors import ConfigError
from customs_edge.core.records import RecordIn
from customs_edge.core.wire import MAX_HEALTH_BYTES, Health
from customs_edge.hub import store as store_module
from customs_edge.hub.brokers import Mosquitto
from customs_edge.hub.store import SCHEMA, HubStore
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from tests.conftest import unit_dict, wait_for
from tests.fleet import AgentProc, HubThread, subscribed_at_broker
from tests.test_sync import Client

PREFIX = "customs-edge/v1"


def scale_endpoints() -> Endpoints:
    return Endpoints(ScaleSim(ScaleWorld(seed=2, cycle_s=1.0), rate_hz=50))


def history(db: Path, device_id: str) -> list[Health]:
    store = HubStore(db, readonly=True)
    try:
        return [Health.model_validate_json(p) for _, p in store.health_history(device_id)]
    finally:
        store.close()


def health_msg(device_id: str, **over: Any) -> Health:
    fields: dict[str, Any] = {
        "device_id": device_id, "ts": time.time(), "agent_version": "9.9", "uptime_s": 1.0, "cpu_pct": 0.5,
        "rss_bytes": 1, "disk_free_bytes": 1, "soc_temp_c": None, "outbox_pending": 0,
        "oldest_unsent_age_s": None, "config_hash": "0" * 64}
    return Health.model_validate(fields | over)


def statuses(db: Path) -> dict[str, str | None]:
    store = HubStore(db, readonly=True)
    try:
        return {r.device_id: r.status for r in store.fleet()}
    finally:
        store.close()


def fleet_cli(db: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["hub", "fleet", "--db", str(db), *extra])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    return out


# -- the pieces ---------------------------------------------------------------------------------------
def test_config_hash_is_that_of_the_meaning_not_of_the_file(tmp_path: Path) -> None:
    raw = unit_dict(tmp_path, "socket://127.0.0.1:1", 1883)
    shuffled = dict(reversed(list(raw.items())))
    shuffled["sync"] = dict(reversed(list(raw["sync"].items())))
    explicit = {**raw, "health_interval_s": 60, "outbox": {**raw["outbox"], "max_mb": 256}}  # defaults written out
    h = config_hash(parse_unit_config(raw))
    assert re.fullmatch("[0-9a-f]{64}", h)
    assert config_hash(parse_unit_config(shuffled)) == config_hash(parse_unit_config(explicit)) == h
    # a change anywhere, a driver's own key included, is another config
    for changed in ({**raw, "health_interval_s": 30},
                    {**raw, "drivers": {"scale": {**raw["drivers"]["scale"], "silent_after_s": 4}}}):
        assert config_hash(parse_unit_config(changed)) != h


def test_health_interval_must_be_positive(tmp_path: Path) -> None:
    for bad in (0, -1, "often"):
        with pytest.raises(ConfigError, match="health_interval_s"):
            parse_unit_config({**unit_dict(tmp_path, "socket://127.0.0.1:1", 1883), "health_interval_s": bad})
    assert parse_unit_config(unit_dict(tmp_path, "socket://127.0.0.1:1", 1883)).health_interval_s == 60


def test_model_versions_and_the_soc_temperature(tmp_path: Path) -> None:
    class Manifest:
        def __init__(self, name: str, version: str) -> None:
            self.name, self.version = name, version

    class Model:
        def __init__(self, name: str, version: str) -> None:
            self.manifest = Manifest(name, version)

    class App:
        def __init__(self) -> None:
            self.model, self.fever, self.threshold = Model("ore-grade", "1.2.0"), Model("fever", "3"), 5

    assert model_versions(App()) == {"ore-grade": "1.2.0", "fever": "3"}
    for i, text in enumerate(["41250\n", "not a number", "57800\n"]):
        (tmp_path / f"zone{i}").mkdir()
        (tmp_path / f"zone{i}" / "temp").write_text(text)
    assert Thermal(str(tmp_path / "zone*" / "temp")).read() == 57.8  # the hottest readable zone
    assert Thermal(str(tmp_path / "none*" / "temp")).read() is None


def test_a_sample_reports_the_outbox_and_the_drivers(tmp_path: Path) -> None:
    cfg = parse_unit_config(unit_dict(tmp_path, "socket://127.0.0.1:1", 1883))
    outbox = SqliteOutbox(tmp_path / "outbox.db", device_id=cfg.device_id)
    outbox.put([RecordIn(type="t", ts=time.time() - 100 + i) for i in range(5)])
    outbox.reject([(1, 1)], "rejected by the hub")  # a dead letter; seq 2, 98 s old, is now the oldest
    drivers = {"scale": {"up": False, "frames": 7, "corrupt": 2, "faults": 3, "opened": 4, "waiting_for_port": False}}
    h = HealthSampler(cfg, outbox, lambda: drivers, lambda: {"m": "1"}).sample((0.25, 0.01))
    outbox.close()
    assert h.outbox_pending == 4 and h.oldest_unsent_age_s is not None and 98 <= h.oldest_unsent_age_s < 110
    assert sum(h.dead_letters.values()) == 1 and h.dropped == {}
    assert h.drivers["scale"].model_dump() == {"up": False, "frames": 7, "corrupt": 2, "faults": 3}
    assert (h.models, h.clock_offset_s, h.clock_rtt_s) == ({"m": "1"}, 0.25, 0.01)


def test_the_hub_keeps_a_bounded_history_and_upgrades_a_version_2_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    db = sqlite3.connect(tmp_path / "hub.db")
    db.executescript(SCHEMA[0] + ";" + SCHEMA[1] + ";PRAGMA user_version=2;")
    db.execute("INSERT INTO devices (device_id, received, stored, max_seq, status) VALUES ('d1', 2, 2, 2, 'online')")
    db.commit()
    db.close()
    monkeypatch.setattr(store_module, "HEALTH_KEPT", 3)
    st = HubStore(tmp_path / "hub.db")
    sent = [health_msg("d2", outbox_pending=i, ts=1.7e9 + i) for i in range(5)]
    assert st.put_health([("d2", h.ts, h.model_dump_json()) for h in sent], {"d1": 2}) == 5
    assert st.put_health([("d2", sent[-1].ts, sent[-1].model_dump_json())], {}) == 0  # the same, again
    kept = [Health.model_validate_json(p).outbox_pending for _, p in st.health_history("d2")]
    st.set_status("evil\nlevel=error\x1b[2J", "online")
    rows = {r.device_id: r for r in st.fleet()}
    st.close()
    assert kept == [4, 3, 2]  # the latest three, newest first
    assert (rows["d1"].status, rows["d1"].health, rows["d1"].health_refused) == ("online", None, 2)
    lines = fleet_cli(tmp_path / "hub.db", capsys).splitlines()
    assert [line.split()[:2] for line in lines[1:3]] == [["d1", "online"], ["d2", "-"]]
    assert lines[3].startswith("evil\\nlevel=err") and all(c.isprintable() for c in "".join(lines))


# -- against the broker and the hub -----------------------------------------------------------------
@pytest.mark.broker
def test_a_unit_publishes_plausible_health_and_the_hub_keeps_the_latest_and_a_history(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "hub.db"
    with scale_endpoints() as urls:
        cfg = parse_unit_config({**unit_dict(tmp_path, urls["socket"], mosquitto.port), "health_interval_s": 0.5})
        hub = HubThread(mosquitto.port, db).start()
        unit = Unit(cfg)
        unit.start()
        try:
            wait_for(lambda: len(history(db, cfg.device_id)) >= 4 and history(db, cfg.device_id)[0].clock_offset_s
                     is not None and history(db, cfg.device_id)[0].drivers["scale"].up, 30, "health messages")
            late = Client(mosquitto.port)  # subscribes after the fact: the latest is retained
            late.sub(f"{PREFIX}/{cfg.device_id}/health")
            wait_for(lambda: late.got, 10, "the retained health message")
            late.close()
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        finally:
            unit.stop()
            hub.stop()
    assert late.got[0][2], "health is published retained"
    kept = history(db, cfg.device_id)
    h = kept[0]
    assert h.device_id == cfg.device_id and h.agent_version == customs_edge.__version__
    assert h.config_hash == config_hash(cfg)
    assert h.cpu_pct is not None and 0 <= h.cpu_pct <= 100 * (os.cpu_count() or 1)
    # this process, not some other: about its peak so far (the kernel updates the peak lazily)
    assert h.rss_bytes is not None and 10 << 20 < h.rss_bytes <= peak_rss * 1.1
    free = shutil.disk_usage(tmp_path).free
    assert h.disk_free_bytes is not None and abs(h.disk_free_bytes - free) < 256 << 20
    zones = Thermal().read()  # None on a machine without thermal zones, and then so is the report
    assert (h.soc_temp_c is None) == (zones is None) and (zones is None or -40 < (h.soc_temp_c or 0) < 150)
    assert h.outbox_pending >= 0 and (h.oldest_unsent_age_s is None or h.oldest_unsent_age_s >= 0)
    assert h.drivers["scale"].up and h.drivers["scale"].frames > 0
    # same machine, same clock: the offset is within its round trip of 0
    assert h.clock_rtt_s is not None and h.clock_offset_s is not None
    assert abs(h.clock_offset_s) <= h.clock_rtt_s / 2 + 0.05
    uptimes = [k.uptime_s for k in reversed(kept)]
    assert uptimes == sorted(uptimes) and uptimes[0] >= 0
    assert [k.ts for k in kept] == sorted((k.ts for k in kept), reverse=True)


@pytest.mark.broker
def test_a_driver_going_down_is_reported_at_once_not_at_the_next_interval(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "hub.db"
    sim = scale_endpoints()
    urls = sim.start()
    cfg = parse_unit_config({**unit_dict(tmp_path, urls["socket"], mosquitto.port), "health_interval_s": 3600})
    hub = HubThread(mosquitto.port, db).start()
    unit = Unit(cfg)
    unit.start()
    try:
        # at connect, then on the first frame: the interval alone would say nothing for an hour
        wait_for(lambda: any(h.drivers["scale"].up for h in history(db, cfg.device_id)), 30, "the driver up")
        sent = unit.sync.stats.health_sent
        sim.stop()  # the instrument goes away
        down = wait_for(lambda: [h for h in history(db, cfg.device_id) if not h.drivers["scale"].up
                                 and h.drivers["scale"].faults >= 1], 30, "the driver down")
        assert down and unit.sync.stats.health_sent > sent
    finally:
        unit.stop()
        hub.stop()
        sim.stop()


@pytest.mark.broker
def test_hub_fleet_shows_a_running_unit_online_and_a_killed_one_offline(
        tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "hub.db"
    with scale_endpoints() as urls:
        hub = HubThread(mosquitto.port, db).start()
        live = Unit(parse_unit_config(unit_dict(tmp_path / "a", urls["socket"], mosquitto.port, device_id="gate-a")))
        dead = AgentProc(unit_dict(tmp_path / "b", urls["socket"], mosquitto.port,
                                   device_id="scale-b-with-a-long-device-id-that-must-be-cut"), tmp_path)
        live.start()
        dead.start()
        try:
            ids = ("gate-a", dead.cfg["device_id"])
            wait_for(lambda: all(history(db, d) for d in ids), 30, "health from both units")
            dead.kill9()  # no goodbye: the broker publishes its will
            wait_for(lambda: statuses(db) == dict(zip(ids, ("online", "offline"), strict=True)), 30,
                     "the will at the hub")
            table = fleet_cli(db, capsys)
            doc = json.loads(fleet_cli(db, capsys, "--json"))
        finally:
            live.stop()
            hub.stop()
    lines = table.splitlines()
    assert all(len(line) <= 100 for line in lines), [len(line) for line in lines]
    head, rows = lines[0].split(), {line.split()[0]: line.split() for line in lines[1:]}
    assert head[:3] == ["device", "state", "seen"] and len(rows) == 2
    assert rows["gate-a"][1] == "online" and rows[ids[1][:17] + "…"][1] == "offline"
    assert rows["gate-a"][7] == customs_edge.__version__
    devices = doc["devices"]
    assert {d: v["status"] for d, v in devices.items()} == {"gate-a": "online", dead.cfg["device_id"]: "offline"}
    for d, v in devices.items():
        assert v["health"]["device_id"] == d and v["health"]["drivers"]["scale"]["frames"] >= 0
        assert v["last_seen"] <= doc["now"]


@pytest.mark.broker
def test_bad_health_messages_are_counted_and_ignored_and_retained_ones_kept_once(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "hub.db"
    t = f"{PREFIX}/dev-h/health"
    hub = HubThread(mosquitto.port, db).start()
    op = Client(mosquitto.port)
    try:
        subscribed_at_broker(op, [hub])  # else the first message may reach the broker before the subscription
        op.pub(t, b"{not json")
        op.pub(t, json.dumps({**json.loads(health_msg("dev-h").model_dump_json()), "cpu_pct": "lots"}))
        op.pub(t, health_msg("dev-other").model_dump_json())  # another device's health on this topic
        op.pub(t, health_msg("dev-h", models={"m": "x" * MAX_HEALTH_BYTES}).model_dump_json())
        op.c.publish(t, health_msg("dev-h").model_dump_json(), qos=1, retain=True).wait_for_publish(5)
        wait_for(lambda: history(db, "dev-h"), 20, "the good message stored")
        assert hub.hub.health_refused == {"malformed": 2, "device_mismatch": 1, "too_large": 1}
        hub.stop()
        # a restarted hub gets the retained message again: kept once; the next one is kept too
        hub = HubThread(mosquitto.port, db).start()
        subscribed_at_broker(op, [hub])
        op.c.publish(t, health_msg("dev-h").model_dump_json(), qos=1, retain=True).wait_for_publish(5)
        wait_for(lambda: len(history(db, "dev-h")) >= 2, 20, "the next message stored")
    finally:
        op.close()
        hub.stop()
    assert len(history(db, "dev-h")) == 2
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT health_refused FROM devices WHERE device_id='dev-h'").fetchone() == (4,)
    assert not history(db, "dev-other")
