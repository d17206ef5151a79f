"""Sync and hub against a real mosquitto: records leave the outbox only on the hub's ack; acks,
commands, status and malformed input behave as documented."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.agent.config import SyncConfig, parse_unit_config
from customs_edge.agent.runtime import Unit
from customs_edge.agent.sync import Sync
from customs_edge.hub.brokers import Mosquitto
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from tests.conftest import unit_dict, wait_for
from tests.fakes import MemOutbox
from tests.fleet import HubThread, hub_seqs, outbox_state, rec, records_msg

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
        self.subacks: set[int] = set()
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload), bool(m.retain)))
        self.c.on_subscribe = lambda _c, _u, mid, *_: self.subacks.add(mid)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def sub(self, topic: str) -> None:
        _, mid = self.c.subscribe(topic, 1)
        wait_for(lambda: mid in self.subacks, 10, f"the SUBACK for {topic}")

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
        # no hub yet: the broker PUBACKs what was sent, but nothing may leave the outbox
        wait_for(lambda: unit.sync.stats.batches_sent >= 1 and outbox_state(cfg.outbox.path)[0] >= 20, 30,
                 "20 records committed and a batch published (PUBACKed by the broker, no hub)")
        last, pending = outbox_state(cfg.outbox.path)
        assert last >= 20 and len(pending) == last and unit.sync.stats.records_acked == 0
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

        def retained_status() -> bytes | None:
            """What a client subscribing after the fact gets first; None when the agent's own publish raced
            the subscription (a live message is delivered with retain unset)."""
            c = Client(mosquitto.port)
            try:
                c.sub(t_status)
                wait_for(lambda: c.got, 5, "a status")
                _, p, retained = c.got[0]
                return p if retained else None
            finally:
                c.close()

        status = json.loads(wait_for(retained_status, 30, "a retained status"))
        assert status["state"] == "online" and "outbox" in status and "scale" in status["drivers"]
        late = Client(mosquitto.port)
        late.sub(t_status)
        wait_for(lambda: late.got, 5, "the retained status again")
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
        ts = time.time()  # commands carry the sender's clock (refused when expired)
        for payload in (b"not json", b'{"id": "1", "cmd": "reboot"}', b'{"id": "2", "cmd": "ping", "x": 1}',
                        f'{{"id": "3", "cmd": "ping", "ts": {ts}}}'.encode(),
                        f'{{"id": "4", "cmd": "status", "ts": {ts}}}'.encode()):
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


def test_sync_survives_an_outbox_error_and_keeps_delivering(tmp_path: Path, mosquitto: Mosquitto,
                                                            scale_urls: dict[str, str]) -> None:
    import sqlite3

    from customs_edge.agent.outbox import SqliteOutbox

    class FlakyOutbox(SqliteOutbox):
        failures = 3

        def ack(self, ranges):  # type: ignore[no-untyped-def]
            if self.failures:
                self.failures -= 1
                raise sqlite3.OperationalError("database or disk is full")
            return super().ack(ranges)

    cfg = parse_unit_config(unit_dict(tmp_path, scale_urls["socket"], mosquitto.port,
                                      sync={"backoff_min_s": 0.1}))
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    unit = Unit(cfg, outbox=FlakyOutbox(cfg.outbox.path))
    unit.start()
    try:
        wait_for(lambda: unit.sync.stats.records_acked >= 30, 15, "deliveries after the outbox errors")
        assert unit.health()
        # a failed delete is no link failure: the link stayed up and nothing was sent twice
        st = unit.sync.stats
        assert st.settle_failures == 3 and (st.connects, st.resent_after_reconnect, st.hub_resends) == (1, 0, 0)
    finally:
        unit.stop()
        hub.stop()


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


def _run_for(syncs: list[Sync], stop: threading.Event) -> list[threading.Thread]:
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in syncs]
    for t in threads:
        t.start()
    return threads


def test_two_units_with_one_device_id_keep_their_own_sessions(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Before, both used the client id ce-agent-{device_id}: each connect took the other's session over,
    31 times in 30 s. Client ids are now unique per install (machine id + outbox path)."""
    cfg = SyncConfig(port=mosquitto.port, backoff_min_s=0.2, backoff_max_s=1)
    syncs = [Sync("twin", MemOutbox(), cfg, outbox_path=tmp_path / f"unit{i}" / "outbox.db") for i in range(2)]
    assert syncs[0].link.client_id != syncs[1].link.client_id
    stop = threading.Event()
    threads = _run_for(syncs, stop)
    try:
        wait_for(lambda: all(s.link.connected for s in syncs), 10, "both units connected")
        # a negative assertion needs a window: a unit kicked off by a takeover is back within backoff_max_s,
        # kicking the other one off in turn; 3 x backoff_max_s holds at least two such rounds
        time.sleep(3 * cfg.backoff_max_s)
        assert [s.stats.connects for s in syncs] == [1, 1] and all(s.link.connected for s in syncs)
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_two_hubs_on_one_host_keep_their_own_sessions(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Before, both hubs defaulted to ce-hub-{hostname} and took each other's persistent session over."""
    hubs = [HubThread(mosquitto.port, tmp_path / f"hub{i}" / "hub.db").start() for i in range(2)]
    try:
        assert hubs[0].hub.link.client_id != hubs[1].hub.link.client_id
        # a negative assertion needs a window: a hub kicked off by a takeover retries after its backoff, first
        # min_s then up to 2 x min_s (core/mqtt.py Backoff), kicking the other one off in turn; 4 x min_s holds
        # two such rounds
        time.sleep(4 * hubs[0].hub.link.backoff.min_s)
        assert [h.hub.link.connects for h in hubs] == [1, 1] and all(h.hub.ready.is_set() for h in hubs)
    finally:
        for h in hubs:
            h.stop()


def _containers(obj: object, seen: set[int] | None = None) -> dict[str, int]:
    """Sizes of the lists, dicts, sets and deques an object of ours holds, also inside its dataclasses."""
    import collections
    import dataclasses

    seen = seen if seen is not None else set()
    out: dict[str, int] = {}
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    for name, value in vars(obj).items():
        if isinstance(value, list | dict | set | collections.deque):
            out[name] = len(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out |= {f"{name}.{k}": n for k, n in _containers(value, seen).items()}
    return out


def test_the_hub_keeps_nothing_per_acked_publish(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Before, every PUBACK the hub received (one per ack it published) was appended to a list that
    nothing drained. Now a step returns its events and keeps none. Acks go at QoS 0 now; each batch here also
    makes a seq conflict, whose alert the hub publishes at QoS 1: n PUBACKs come back to it."""
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    c = Client(mosquitto.port)
    n = 60
    try:
        c.sub("customs-edge/v1/dev-m/ack")
        for i in range(n):
            c.pub("customs-edge/v1/dev-m/records", records_msg("dev-m", f"b{i}", [rec(i + 1)]))
            c.pub("customs-edge/v1/dev-m/records", records_msg("dev-m", f"c{i}", [rec(i + 1, payload={"c": 1})]))
        wait_for(lambda: len(c.got) >= 2 * n, 15, f"{2 * n} acks")
        wait_for(lambda: hub.hub.store.stats()[0].conflicts >= n, 15, f"{n} conflicts stored")
        link = hub.hub.link
        wait_for(lambda: not link._client._out_messages, 5, "the hub's alerts PUBACKed by the broker")  # type: ignore[union-attr]
        # the last step's events may not be drained yet when the PUBACKs are in: wait for the hub to settle
        wait_for(lambda: max(_containers(link).values(), default=99) < 5, 5, "a link holding nothing per publish")
        sizes = _containers(link)
        assert sizes and max(sizes.values()) < 5, sizes
    finally:
        c.close()
        hub.stop()
