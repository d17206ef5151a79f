"""Sync and hub against a real mosquitto: records leave the outbox only on the hub's ack; acks,
commands, status and malformed input behave as documented."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.runtime import Unit
from customs_edge.hub.brokers import Mosquitto
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from tests.conftest import unit_dict, wait_for
from tests.fleet import HubThread, hub_seqs, outbox_state

pytestmark = pytest.mark.broker


@pytest.fixture
def scale_urls() -> dict[str, str]:
    with Endpoints(ScaleSim(ScaleWorld(seed=2, cycle_s=1.0), rate_hz=50)) as urls:
        yield urls


class Client:
    """A plain paho client for poking at topics from the test."""

    def __init__(self, port: int) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.got: list[tuple[str, bytes, bool]] = []
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload), bool(m.retain)))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def sub(self, topic: str) -> None:
        self.c.subscribe(topic, 1)
        time.sleep(0.2)

    def pub(self, topic: str, payload: bytes | str) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_records_leave_the_outbox_only_once_the_hub_stored_them(tmp_path: Path, mosquitto: Mosquitto,
                                                                 scale_urls: dict[str, str]) -> None:
    cfg = parse_unit_config(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port))
    unit = Unit(cfg)
    unit.start()
    try:
        time.sleep(2.0)  # no hub yet: the broker PUBACKs, but nothing may leave the outbox
        last, pending = outbox_state(cfg.outbox.path)
        assert last >= 20 and len(pending) == last
        hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
        try:
            wait_for(lambda: len(outbox_state(cfg.outbox.path)[1]) < 5 and unit.sync.stats.records_acked > 20,
                     10, "the hub's acks to empty the outbox")
            last, pending = outbox_state(cfg.outbox.path)
            seqs, _ = hub_seqs(tmp_path / "hub.db", cfg.device_id)
            # every seq is in exactly one place: still pending, or stored at the hub
            assert set(range(1, last + 1)) - pending <= set(seqs)
        finally:
            hub.stop()
    finally:
        unit.stop()


def test_broker_ack_mode_deletes_on_puback_without_a_hub(tmp_path: Path, mosquitto: Mosquitto,
                                                         scale_urls: dict[str, str]) -> None:
    cfg = parse_unit_config(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port, sync={"ack_mode": "broker"}))
    unit = Unit(cfg)
    unit.start()
    try:
        wait_for(lambda: unit.sync.stats.records_acked >= 20, 10, "PUBACKs to delete records")
    finally:
        unit.stop()
    last, pending = outbox_state(cfg.outbox.path)
    assert last - len(pending) >= 20


def test_status_is_retained_and_the_will_says_offline_on_a_crash(tmp_path: Path, mosquitto: Mosquitto,
                                                                 scale_urls: dict[str, str]) -> None:
    cfg = parse_unit_config(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port))
    unit = Unit(cfg)
    unit.start()
    t_status = f"customs-edge/v1/{cfg.device_id}/status"
    try:
        wait_for(lambda: unit.sync.link.connected, 5, "agent connection")
        late = Client(mosquitto.port)  # subscribes after the fact: sees the retained status
        late.sub(t_status)
        wait_for(lambda: late.got, 5, "retained status")
        _, payload, retained = late.got[0]
        status = json.loads(payload)
        assert retained and status["state"] == "online" and "outbox" in status and "scale" in status["drivers"]
        unit.sync.link.abort()  # the process dies without a DISCONNECT: the broker publishes the will
        wait_for(lambda: any(json.loads(p)["state"] == "offline" for _, p, _ in late.got[1:]), 10, "the will")
        late.close()
    finally:
        unit.stop()


def test_commands_good_and_bad_are_answered_never_crash(tmp_path: Path, mosquitto: Mosquitto,
                                                        scale_urls: dict[str, str]) -> None:
    cfg = parse_unit_config(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port))
    unit = Unit(cfg)
    unit.start()
    t_cmd = f"customs-edge/v1/{cfg.device_id}/cmd"
    op = Client(mosquitto.port)
    try:
        wait_for(lambda: unit.sync.link.connected, 5, "agent connection")
        op.sub(t_cmd + "/reply")
        for payload in (b"not json", b'{"id": "1", "cmd": "reboot"}', b'{"id": "2", "cmd": "ping", "x": 1}',
                        b'{"id": "3", "cmd": "ping"}', b'{"id": "4", "cmd": "status"}'):
            op.pub(t_cmd, payload)
        wait_for(lambda: len(op.got) >= 5, 10, "five replies")
        replies = [json.loads(p) for _, p, _ in op.got]
        bad, good = [r for r in replies if not r["ok"]], [r for r in replies if r["ok"]]
        assert len(bad) == 3 and all(r["error"].startswith("bad command") for r in bad)
        assert any("cmd" in r["error"] for r in bad)
        assert {r["id"] for r in good} == {"3", "4"}
        status = next(r for r in good if r["id"] == "4")["result"]
        assert status["device_id"] == cfg.device_id and status["outbox"]["last_seq"] >= 0
        assert unit.health()
    finally:
        op.close()
        unit.stop()


def wire_batch(device_id: str, batch: str, seqs: list[int], **record: object) -> str:
    """A records message as an agent sends it, for poking the hub directly."""
    recs = [{"seq": s, "ts": 1.0, "boot": "b", "mono": 1.0, "type": "t", "prio": 1, "payload": {}, **record}
            for s in seqs]
    return json.dumps({"v": 1, "device_id": device_id, "batch": batch, "records": recs})


def test_hub_drops_redeliveries_and_rejects_malformed_messages(tmp_path: Path, mosquitto: Mosquitto) -> None:
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    c = Client(mosquitto.port)
    try:
        c.sub("customs-edge/v1/dev-x/ack")
        c.pub("customs-edge/v1/dev-x/records", b"{broken")
        c.pub("customs-edge/v1/dev-x/records", wire_batch("someone-else", "b-0", [1, 2]))
        c.pub("customs-edge/v1/dev-x/records", wire_batch("dev-x", "b-1", [1, 2], payload={"a": 1}))
        c.pub("customs-edge/v1/dev-x/records", wire_batch("dev-x", "b-2", [1, 2], payload={"a": 1}))  # a resend
        wait_for(lambda: len(c.got) >= 2, 10, "two acks")
        acks = [json.loads(p) for _, p, _ in c.got]
        assert acks[0] == {"v": 1, "batch": "b-1", "ranges": [[1, 2]], "stored": 2, "duplicates": 0}
        assert acks[1] == {"v": 1, "batch": "b-2", "ranges": [[1, 2]], "stored": 0, "duplicates": 2}
        assert hub.hub.rejected == 2
        (st,) = hub.hub.store.stats()
        assert (st.received, st.stored, st.duplicates, st.gaps) == (4, 2, 2, 0)
    finally:
        c.close()
        hub.stop()


def test_hub_reports_gaps(tmp_path: Path, mosquitto: Mosquitto) -> None:
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    c = Client(mosquitto.port)
    try:
        c.sub("customs-edge/v1/dev-g/ack")
        c.pub("customs-edge/v1/dev-g/records", wire_batch("dev-g", "x", [1, 2, 5, 9]))
        wait_for(lambda: c.got, 10, "ack")
        (st,) = hub.hub.store.stats()
        assert st.gaps == 5 and hub.hub.store.gap_ranges("dev-g") == [(3, 4), (6, 8)]
    finally:
        c.close()
        hub.stop()
    cli = [sys.executable, "-m", "customs_edge", "hub", "stats", "--db", str(tmp_path / "hub.db")]
    out = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, check=True).stdout)
    assert out["devices"]["dev-g"] | {"last_seen": None} == {
        "device_id": "dev-g", "received": 4, "duplicates": 0, "conflicts": 0, "stored": 4, "max_seq": 9, "gaps": 5,
        "last_seen": None, "status": None}
    table = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert "missing seq ranges: [(3, 4), (6, 8)]" in table


def test_two_hubs_share_the_load_through_a_shared_subscription(tmp_path: Path, mosquitto: Mosquitto,
                                                               scale_urls: dict[str, str]) -> None:
    hubs = [HubThread(mosquitto.port, tmp_path / f"hub{i}.db", client_id=f"hub-{i}").start() for i in range(2)]
    cfg = parse_unit_config(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port,
                                      sync={"batch_max_records": 5}))
    unit = Unit(cfg)
    unit.start()
    try:
        wait_for(lambda: all(h.hub.batches >= 3 for h in hubs), 15, "both hubs to receive batches")
    finally:
        unit.stop()
        for h in hubs:
            h.stop()
    a, _ = hub_seqs(tmp_path / "hub0.db", cfg.device_id)
    b, _ = hub_seqs(tmp_path / "hub1.db", cfg.device_id)
    assert a and b and not set(a) & set(b)


def test_sigterm_stops_the_agent_cleanly_within_5_s(tmp_path: Path, mosquitto: Mosquitto,
                                                    scale_urls: dict[str, str]) -> None:
    from tests.fleet import AgentProc

    agent = AgentProc(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port), tmp_path).start()
    wait_for(lambda: outbox_state(Path(agent.cfg["outbox"]["path"]))[0] > 10, 10, "records")
    took = agent.terminate()
    assert took < 5.0 and agent.proc is not None and agent.proc.returncode == 0
    log = agent.log_text()
    assert 'event="unit stopped"' in log
    assert "Traceback" not in log


def test_reload_with_a_bad_config_keeps_the_old_one_running(tmp_path: Path, mosquitto: Mosquitto,
                                                            scale_urls: dict[str, str]) -> None:
    from tests.fleet import AgentProc, assert_reload_refused

    agent = AgentProc(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port), tmp_path).start()
    ob = Path(agent.cfg["outbox"]["path"])
    wait_for(lambda: outbox_state(ob)[0] > 5, 10, "records")
    assert_reload_refused(agent, agent.path.read_text().replace("summary_interval_s", "summary_intervl_s"),
                          "app.summary_intervl_s: unknown key (did you mean 'summary_interval_s'?)")
    agent.terminate()




def test_stray_and_malformed_acks_delete_nothing(tmp_path: Path, mosquitto: Mosquitto,
                                                 scale_urls: dict[str, str]) -> None:
    cfg = parse_unit_config(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port))
    unit = Unit(cfg)
    unit.start()
    c = Client(mosquitto.port)
    t_ack = f"customs-edge/v1/{cfg.device_id}/ack"
    try:
        wait_for(lambda: unit.sync.stats.records_sent >= 5, 10, "records in flight (no hub runs)")
        c.pub(t_ack, json.dumps({"v": 1, "batch": "not-ours", "ranges": [[1, 10**9]]}))
        c.pub(t_ack, json.dumps({"v": 1, "batch": "x", "ranges": [[1, 2**63]]}))  # beyond SQLite INTEGER
        c.pub(t_ack, b"\xff\xfe")
        wait_for(lambda: unit.sync.stats.stale_acks >= 1 and unit.sync.stats.bad_messages >= 2, 10, "acks seen")
        assert unit.sync.stats.records_acked == 0
        last, pending = outbox_state(cfg.outbox.path)
        assert len(pending) == last  # nothing deleted without the hub
        assert unit.health()  # the sync thread is alive
    finally:
        c.close()
        unit.stop()


def test_hub_survives_hostile_messages_including_retained_ones(tmp_path: Path, mosquitto: Mosquitto) -> None:
    c = Client(mosquitto.port)
    deep = "[" * 100_000 + "]" * 100_000
    c.c.publish("customs-edge/v1/evil/status", deep, qos=1, retain=True).wait_for_publish(5)
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    try:
        c.sub("customs-edge/v1/dev-ok/ack")
        c.pub("customs-edge/v1/evil/records", wire_batch("evil", "e", [2**63]))  # beyond SQLite INTEGER
        c.pub("customs-edge/v1/evil/records", wire_batch("evil", "n", [1], ts="NaN"))
        c.pub("customs-edge/v1/dev-ok/records", wire_batch("dev-ok", "g", [1]))
        wait_for(lambda: c.got, 10, "the good batch's ack")
        assert hub.thread.is_alive() and hub.hub.rejected == 2
    finally:
        hub.stop()
        c.c.publish("customs-edge/v1/evil/status", b"", qos=1, retain=True).wait_for_publish(5)
        c.close()


def test_sync_survives_an_outbox_error_and_keeps_delivering(tmp_path: Path, mosquitto: Mosquitto,
                                                            scale_urls: dict[str, str]) -> None:
    import sqlite3

    from customs_edge.agent.outbox import SqliteOutbox

    class FlakyOutbox(SqliteOutbox):
        failures = 2

        def ack(self, ranges):  # type: ignore[no-untyped-def]
            if self.failures:
                self.failures -= 1
                raise sqlite3.OperationalError("database is locked")
            return super().ack(ranges)

    cfg = parse_unit_config(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port,
                                      sync={"backoff_min_s": 0.1}))
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    unit = Unit(cfg, outbox=FlakyOutbox(cfg.outbox.path))
    unit.start()
    try:
        wait_for(lambda: unit.sync.stats.records_acked >= 30, 15, "deliveries after the outbox errors")
        assert unit.health()
    finally:
        unit.stop()
        hub.stop()


def test_resend_backoff_does_not_overflow_after_days_of_hub_silence(tmp_path: Path) -> None:
    from customs_edge.agent.sync import Sync, _InFlight

    cfg = parse_unit_config(unit_dict(tmp_path, "/dev/null", 1))
    sync = Sync("d", _NoOutbox(), cfg.sync)
    sync._inflight["b"] = _InFlight([(1, 1)], 1, 0.0, 1, [], pubacked=True, attempt=5000)
    sync._check_deadline(10.0)  # sent at 0, 10 s ago: far less than the capped 300 s wait
    assert sync.stats.hub_resends == 0


class _NoOutbox:
    def release(self) -> None:
        pass


def test_reload_to_a_config_that_cannot_start_keeps_the_old_one(tmp_path: Path, mosquitto: Mosquitto,
                                                                scale_urls: dict[str, str]) -> None:
    import signal

    import yaml

    from tests.fleet import AgentProc

    agent = AgentProc(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port), tmp_path).start()
    ob = Path(agent.cfg["outbox"]["path"])
    wait_for(lambda: outbox_state(ob)[0] > 5, 10, "records")
    (tmp_path / "a-file").write_text("not a directory")
    bad = {**agent.cfg, "outbox": {"path": str(tmp_path / "a-file" / "outbox.db")}}  # validates, cannot open
    agent.path.write_text(yaml.safe_dump(bad))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "the new config cannot start" in agent.log_text(), 10, "the refusal in the log")
    n = outbox_state(ob)[0]
    wait_for(lambda: outbox_state(ob)[0] > n + 10, 5, "records to keep coming into the old outbox")
    assert agent.proc.poll() is None
    agent.terminate()
