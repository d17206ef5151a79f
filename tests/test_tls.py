"""Mutual TLS against a real mosquitto running the shipped configs/broker config (adapted to temporary
certificate paths and free loopback ports): who may connect, and what each certificate may publish and read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.agent.config import SyncConfig, parse_unit_config
from customs_edge.agent.runtime import Unit
from customs_edge.agent.sync import Sync
from customs_edge.cli import certs
from customs_edge.core.mqtt import Lost, MqttLink, Tls
from customs_edge.core.records import RecordIn
from customs_edge.core.wire import Ack
from customs_edge.hub.brokers import Mosquitto, free_port
from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from tests.conftest import need_mosquitto, unit_dict, wait_for
from tests.fakes import MemOutbox
from tests.fleet import HubThread, hub_seqs, outbox_state, rec, records_msg

pytestmark = pytest.mark.broker

BROKER_CONF = Path(__file__).resolve().parents[1] / "configs" / "broker"
PREFIX = "customs-edge/v1"
NAMES = {"broker": "broker", "dev-a": "device", "dev-b": "device", "hub-1": "hub", "hub-1-alerts": "hub",
         "op-1": "operator"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet's CA with a broker, two devices, a hub and an operator; `rogue/` another CA's dev-a."""
    d = tmp_path_factory.mktemp("pki")
    certs.init_ca(d)
    for name, role in NAMES.items():
        certs.issue(d, name, role)  # type: ignore[arg-type]
    certs.init_ca(d / "rogue")
    certs.issue(d / "rogue", "dev-a", "device")
    return d


class Broker:
    """mosquitto with configs/broker/customs-edge.conf: TLS on `port`, plaintext on `plain_port` (loopback)."""

    def __init__(self, workdir: Path, pki: Path) -> None:
        self.port, self.plain_port = free_port(), free_port()
        etc = workdir / "etc"
        etc.mkdir(parents=True)
        for f in ("acl", "acl-loopback"):
            shutil.copy(BROKER_CONF / f, etc / f)
        for f in ("ca.crt", "ca.crl", "broker.crt", "broker.key"):
            shutil.copy(pki / f, etc / f)
        conf = (BROKER_CONF / "customs-edge.conf").read_text()
        adapted = (conf.replace("/etc/mosquitto/customs-edge/", f"{etc}/")
                   .replace("listener 8883\n", f"listener {self.port} 127.0.0.1\n")
                   .replace("listener 1883 127.0.0.1\n", f"listener {self.plain_port} 127.0.0.1\n"))
        settings = [line for line in adapted.splitlines() if line and not line.startswith("#")]
        assert len([s for s in settings if s.startswith("listener ") and s.endswith(" 127.0.0.1")]) == 2
        assert not [s for s in settings if "/etc/mosquitto" in s]
        self.mq = Mosquitto(workdir, self.port, listeners=adapted)


@pytest.fixture
def broker(tmp_path: Path, pki: Path) -> Iterator[Broker]:
    need_mosquitto()
    b = Broker(tmp_path / "broker", pki)
    b.mq.start()
    try:
        yield b
    finally:
        b.mq.stop()


def tls(pki: Path, name: str | None) -> Tls:
    return Tls(pki / "ca.crt", pki / f"{name}.crt" if name else None, pki / f"{name}.key" if name else None,
               "broker")


def tls_keys(pki: Path, name: str) -> dict[str, Any]:
    return {"tls_ca": str(pki / "ca.crt"), "tls_cert": str(pki / f"{name}.crt"),
            "tls_key": str(pki / f"{name}.key"), "tls_server_name": "broker"}


def hub_keys(pki: Path) -> dict[str, Any]:
    """hub-1's certificate, and hub-1-alerts' for its alert lane (a second session needs a second name)."""
    return {**tls_keys(pki, "hub-1"), "alerts_tls_cert": str(pki / "hub-1-alerts.crt"),
            "alerts_tls_key": str(pki / "hub-1-alerts.key")}


class Client:
    """A paho client with a certificate (or plaintext on the loopback port): waits for its SUBACKs and
    PUBACKs, collects what it receives."""

    def __init__(self, port: int, t: Tls | None) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        if t:
            self.c.tls_set_context(t.context())
        self.got: list[tuple[str, bytes]] = []
        self.granted: dict[int, list[int]] = {}
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.on_subscribe = lambda _c, _u, mid, codes, _p: self.granted.__setitem__(mid, [int(x.value)
                                                                                            for x in codes])
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        wait_for(self.c.is_connected, 15, "the test client's CONNACK")

    def sub(self, topic: str) -> list[int]:
        _, mid = self.c.subscribe(topic, 1)
        return list(wait_for(lambda: self.granted.get(mid), 15, f"SUBACK for {topic}"))

    def pub(self, topic: str, payload: str | bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(15)

    def topics(self) -> list[str]:
        return [t for t, _ in self.got]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def scale_urls() -> Iterator[dict[str, str]]:
    with Endpoints(ScaleSim(ScaleWorld(seed=2, cycle_s=1.0), rate_hz=50)) as urls:
        yield urls


def test_an_agent_and_a_hub_with_certificates_deliver_records_over_tls(tmp_path: Path, pki: Path, broker: Broker,
                                                                       scale_urls: dict[str, str]) -> None:
    cfg = parse_unit_config(unit_dict(tmp_path, scale_urls["socket"], broker.port, device_id="dev-a",
                                      sync=tls_keys(pki, "dev-a")))
    unit = Unit(cfg)
    hub = HubThread(broker.port, tmp_path / "hub.db", **tls_keys(pki, "hub-1")).start()
    unit.start()
    try:
        wait_for(lambda: unit.sync.stats.records_acked >= 20, 30, "the hub's acks over TLS")
        seqs, _ = hub_seqs(tmp_path / "hub.db", "dev-a")
        last, pending = outbox_state(cfg.outbox.path)
        assert set(range(1, last + 1)) - pending <= set(seqs) and len(seqs) >= 20
        assert unit.sync.link.connected and unit.sync.stats.connects == 1
    finally:
        unit.stop()
        hub.stop()


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate", "plaintext", "wrong server name"])
def test_clients_without_a_fleet_certificate_are_refused(pki: Path, broker: Broker, who: str) -> None:
    t = {"no certificate": tls(pki, None), "plaintext": None,
         "wrong server name": Tls(pki / "ca.crt", pki / "dev-a.crt", pki / "dev-a.key", "other-broker"),
         "another CA's certificate": Tls(pki / "ca.crt", pki / "rogue/dev-a.crt", pki / "rogue/dev-a.key",
                                         "broker")}[who]
    link = MqttLink(f"x-{who[:2]}", "127.0.0.1", broker.port, tls=t, connect_timeout_s=3, backoff_min_s=0.05,
                    backoff_max_s=0.2)
    lost: list[Lost] = []
    try:
        wait_for(lambda: lost.extend(e for e in link.step(0.1) if isinstance(e, Lost)) or len(lost) >= 2, 30,
                 "two refused attempts")
        assert link.connects == 0 and not any(e.was_connected for e in lost)
    finally:
        link.close()
    good = MqttLink("good", "127.0.0.1", broker.port, tls=tls(pki, "dev-a"), connect_timeout_s=5)
    try:  # the same link with a fleet certificate connects: the refusal above was the certificate's
        wait_for(lambda: link_connected(good), 30, "a fleet certificate's CONNACK")
    finally:
        good.close()


def link_connected(link: MqttLink) -> bool:
    link.step(0.1)
    return link.connected


@pytest.mark.parametrize("lane", [True, False], ids=["alert lane", "hub certificate only"])
def test_a_device_can_neither_publish_as_another_nor_read_its_acks_and_commands(tmp_path: Path, pki: Path,
                                                                                broker: Broker, lane: bool) -> None:
    """On both record topics (`records`, and `alerts`, read by the hub's alert lane with its own certificate, or
    with the bulk when the hub has no certificate for the lane)."""
    hub = HubThread(broker.port, tmp_path / "hub.db", **(hub_keys(pki) if lane else tls_keys(pki, "hub-1"))).start()
    assert (hub.hub.lane is not None) == lane
    a, b, op = (Client(broker.port, tls(pki, n)) for n in ("dev-a", "dev-b", "op-1"))
    db, own = tmp_path / "hub.db", [f"{PREFIX}/dev-a/ack", f"{PREFIX}/dev-a/cmd"]
    try:
        # mosquitto grants these subscriptions, and then delivers nothing dev-a may not read
        for t in (f"{PREFIX}/dev-b/ack", f"{PREFIX}/dev-b/cmd", f"{PREFIX}/+/records", f"{PREFIX}/+/alerts", *own):
            a.sub(t)
        # records and alerts as dev-b from dev-a, then dev-b's real ones: the hub stores only the real ones
        a.pub(f"{PREFIX}/dev-b/records", records_msg("dev-b", "forged", [rec(1), rec(2)]))
        a.pub(f"{PREFIX}/dev-b/alerts", records_msg("dev-b", "forged-alert", [rec(3, prio=3)]))
        b.pub(f"{PREFIX}/dev-b/records", records_msg("dev-b", "real", [rec(5)]))
        b.pub(f"{PREFIX}/dev-b/alerts", records_msg("dev-b", "real-alert", [rec(6, prio=3)]))
        wait_for(lambda: len(hub_seqs(db, "dev-b")[0]) == 2, 30, "dev-b's two records at the hub")
        assert hub_seqs(db, "dev-b")[0] == [5, 6]
        # dev-a's own record: stored, and acked to dev-a (the hub acked dev-b's before: dev-a never gets it)
        a.pub(f"{PREFIX}/dev-a/records", records_msg("dev-a", "own", [rec(1)]))
        wait_for(lambda: f"{PREFIX}/dev-a/ack" in a.topics(), 30, "dev-a's ack")
        assert hub_seqs(db, "dev-a")[0] == [1]
        # a command to dev-b, then one to dev-a: dev-a receives its own only
        op.pub(f"{PREFIX}/dev-b/cmd", json.dumps({"id": "1", "cmd": "ping"}))
        op.pub(f"{PREFIX}/dev-a/cmd", json.dumps({"id": "2", "cmd": "ping"}))
        wait_for(lambda: f"{PREFIX}/dev-a/cmd" in a.topics(), 30, "dev-a's own command")
        assert a.topics() == own  # no records of anyone, nothing of dev-b's
    finally:
        for c in (a, b, op):
            c.close()
        hub.stop()


def test_the_hubs_alert_lane_connects_with_a_certificate_of_its_own(tmp_path: Path, pki: Path,
                                                                   broker: Broker) -> None:
    """The broker takes a certificate's name as client id: the lane's session (hub-1-alerts) and the bulk one
    (hub-1) each keep theirs, and an alert batch is stored and acked through the lane."""
    hub = HubThread(broker.port, tmp_path / "hub.db", **hub_keys(pki)).start()
    a = Client(broker.port, tls(pki, "dev-a"))
    try:
        a.sub(f"{PREFIX}/dev-a/ack")
        a.pub(f"{PREFIX}/dev-a/alerts", records_msg("dev-a", "alarm", [rec(1, type="radiation_alarm", prio=3)]))
        a.pub(f"{PREFIX}/dev-a/records", records_msg("dev-a", "weighings", [rec(2), rec(3)]))
        wait_for(lambda: len(a.topics()) == 2, 30, "the hub's acks of both batches")
        assert {json.loads(p)["batch"] for _, p in a.got} == {"alarm", "weighings"}
        assert hub_seqs(tmp_path / "hub.db", "dev-a")[0] == [1, 2, 3]
        lane = hub.hub.lane
        assert lane is not None and lane.connected and hub.hub.link.connected
        assert (lane.connects, hub.hub.link.connects) == (1, 1)  # neither took the other's session over
    finally:
        a.close()
        hub.stop()


def handled_so_far(sync: Sync, operator: Client) -> None:
    """Step dev-a's sync until everything published to it so far has been handled: a ping to dev-a from an
    operator (whatever was PUBACKed before it is queued to dev-a before it); once dev-a answered it, every
    forged ack that got through has been handled, and is settled by a few more steps."""
    operator.sub(f"{PREFIX}/dev-a/cmd/reply")
    operator.pub(f"{PREFIX}/dev-a/cmd", json.dumps({"id": "marker", "cmd": "ping"}))
    wait_for(lambda: sync.step() or f"{PREFIX}/dev-a/cmd/reply" in operator.topics(), 30, "dev-a's pong")
    for _ in range(10):
        sync.step()  # settle what was acked


def forged_acks_delete(tmp_path: Path, port: int, agent_tls: dict[str, Any], attackers: list[Client]) -> int:
    """dev-a's sync with 50 records in flight and no hub; each attacker publishes, for every batch in flight,
    the ack the hub would send. Returns how many records dev-a deleted from its outbox."""
    outbox = MemOutbox()
    outbox.put([RecordIn(type="t", payload={"i": i}) for i in range(50)])
    cfg = SyncConfig(port=port, batch_max_records=10, ack_timeout_s=60, **agent_tls)
    sync = Sync("dev-a", outbox, cfg, outbox_path=tmp_path / "dev-a" / "outbox.db")
    try:
        wait_for(lambda: sync.step() or (len(sync._inflight) == 5 and not sync._by_mid), 30, "5 batches PUBACKed")
        for bid, flight in sync._inflight.items():
            ack = Ack(batch=bid, ranges=flight.ranges, stored=flight.count).model_dump_json()
            for attacker in attackers:
                attacker.pub(f"{PREFIX}/dev-a/ack", ack)
        handled_so_far(sync, attackers[-1])
        return 50 - len(outbox.records)
    finally:
        sync.link.close()


def test_forged_acks_from_device_and_operator_certificates_delete_nothing(tmp_path: Path, pki: Path,
                                                                         broker: Broker) -> None:
    # Without the ACL (anyone on the plaintext loopback listener may ack), the attack deletes everything:
    plain = Client(broker.plain_port, None)
    try:
        assert forged_acks_delete(tmp_path / "plain", broker.plain_port, {}, [plain]) == 50
    finally:
        plain.close()
    # With certificates, a device's (dev-b) and an operator's acks are dropped by the broker
    attackers = [Client(broker.port, tls(pki, n)) for n in ("dev-b", "op-1")]
    try:
        assert forged_acks_delete(tmp_path / "tls", broker.port, tls_keys(pki, "dev-a"), attackers) == 0
    finally:
        for c in attackers:
            c.close()


def test_dev_a_keeps_its_records_until_the_real_hub_acks(tmp_path: Path, pki: Path, broker: Broker) -> None:
    outbox = MemOutbox()
    outbox.put([RecordIn(type="t", payload={"i": i}) for i in range(30)])
    sync = Sync("dev-a", outbox, SyncConfig(port=broker.port, batch_max_records=10, ack_timeout_s=5,
                                            **tls_keys(pki, "dev-a")), outbox_path=tmp_path / "o.db")
    attacker, operator = Client(broker.port, tls(pki, "dev-b")), Client(broker.port, tls(pki, "op-1"))
    try:
        wait_for(lambda: sync.step() or (len(sync._inflight) == 3 and not sync._by_mid), 30, "3 batches PUBACKed")
        for bid, flight in sync._inflight.items():
            attacker.pub(f"{PREFIX}/dev-a/ack", Ack(batch=bid, ranges=flight.ranges).model_dump_json())
        handled_so_far(sync, operator)  # every forged ack had its chance to arrive
        assert len(outbox.records) == 30
        hub = HubThread(broker.port, tmp_path / "hub.db", **tls_keys(pki, "hub-1")).start()
        try:
            wait_for(lambda: sync.step() or not outbox.records, 60, "the real hub's acks (batches resent)")
            assert hub_seqs(tmp_path / "hub.db", "dev-a")[0] == list(range(1, 31))
        finally:
            hub.stop()
    finally:
        attacker.close()
        operator.close()
        sync.link.close()


def test_a_certificate_close_to_expiry_is_warned_about_at_start(tmp_path: Path, pki: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "ca"
    certs.init_ca(d)
    certs.issue(d, "dev-soon", "device", days=10)
    certs.issue(d, "dev-fine", "device")
    with caplog.at_level("WARNING"):
        fine = MqttLink("x", "127.0.0.1", 1, tls=Tls(d / "ca.crt", d / "dev-fine.crt", d / "dev-fine.key"))
        assert not caplog.records and fine.cert_days_left is not None and 364 < fine.cert_days_left <= 365
        soon = MqttLink("y", "127.0.0.1", 1, tls=Tls(d / "ca.crt", d / "dev-soon.crt", d / "dev-soon.key"))
    assert soon.cert_days_left is not None and 9 < soon.cert_days_left <= 10
    assert [r.getMessage() for r in caplog.records] == ["client certificate expires soon: issue a new one"]
    assert caplog.records[0].days_left == pytest.approx(10, abs=0.1)
    fine.close()
    soon.close()



def test_the_hub_command_connects_with_its_certificate(tmp_path: Path, pki: Path, broker: Broker) -> None:
    keys = hub_keys(pki)  # the alert lane's too
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in keys.items()]
    log = (tmp_path / "hub.log").open("wb")
    hub = subprocess.Popen([sys.executable, "-m", "customs_edge", "hub", "--port", str(broker.port),
                            "--db", str(tmp_path / "hub.db"), *flags], stderr=log)
    a = Client(broker.port, tls(pki, "dev-a"))
    try:
        a.sub(f"{PREFIX}/dev-a/ack")
        wait_for(lambda: (tmp_path / "hub.log").read_text().count("hub subscribed") == 2, 60,
                 "the subscriptions of the hub's two sessions")
        a.pub(f"{PREFIX}/dev-a/records", records_msg("dev-a", "b1", [rec(1), rec(2)]))
        a.pub(f"{PREFIX}/dev-a/alerts", records_msg("dev-a", "b2", [rec(3, prio=3)]))
        wait_for(lambda: len(a.topics()) == 2, 60, "the hub's acks")
        assert hub_seqs(tmp_path / "hub.db", "dev-a")[0] == [1, 2, 3]
    finally:
        a.close()
        hub.terminate()
        hub.wait(30)
        log.close()
    r = subprocess.run([sys.executable, "-m", "customs_edge", "hub", "--db", str(tmp_path / "h2.db"),
                        f"--tls-cert={keys['tls_cert']}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "tls_cert and tls_key go together" in r.stderr and "Traceback" not in r.stderr


def test_units_read_the_hubs_liveness_that_only_hubs_may_publish(pki: Path, broker: Broker) -> None:
    """configs/broker/acl: every device certificate reads `fleet/hub-alive` (hub/liveness.py); a hub certificate
    publishes it; a device's publish there never reaches the others (it could hold back their resends)."""
    alive = f"{PREFIX}/fleet/hub-alive"
    dev_a, dev_b, hub = (Client(broker.port, tls(pki, n)) for n in ("dev-a", "dev-b", "hub-1"))
    try:
        assert dev_a.sub(alive) == [1]
        dev_b.pub(alive, '{"v":1,"hub":"forged","ts":1,"stored":9}')
        hub.pub(alive, '{"v":1,"hub":"hub-1","ts":1,"stored":5}')
        wait_for(lambda: dev_a.got, 15, "the hub's liveness at dev-a")
        assert dev_a.got == [(alive, b'{"v":1,"hub":"hub-1","ts":1,"stored":5}')]
    finally:
        for c in (dev_a, dev_b, hub):
            c.close()


def test_devices_read_the_fleets_risk_list_that_operators_publish(pki: Path, broker: Broker) -> None:
    """configs/broker/acl: every device certificate reads `fleet/risk-list` (the handheld's offline risk lists); an
    operator's certificate publishes it; a device's publish there never reaches the others. As a `topic` line above
    the users the read applied to anonymous clients only: no certificate device got the list."""
    lists = f"{PREFIX}/fleet/risk-list"
    dev_a, dev_b, op = (Client(broker.port, tls(pki, n)) for n in ("dev-a", "dev-b", "op-1"))
    try:
        assert dev_a.sub(lists) == [1]
        dev_b.pub(lists, b"forged")
        op.pub(lists, b"the list")
        wait_for(lambda: dev_a.got, 15, "the operator's risk list at dev-a")
        assert dev_a.got == [(lists, b"the list")]
    finally:
        for c in (dev_a, dev_b, op):
            c.close()
