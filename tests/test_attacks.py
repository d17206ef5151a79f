"""Issue 9's attacks from a client on the broker, against a real mosquitto on loopback: each one fails.

The TLS ones use the shipped configs/broker config (tests/test_tls.py's fixtures); the others the plain
broker, where anyone may publish anything: what the agent and the hub must survive on their own."""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.sync import Sync
from customs_edge.cli import certs
from customs_edge.core.mqtt import Lost, MqttLink
from customs_edge.core.records import RecordIn
from customs_edge.hub.brokers import Mosquitto
from tests.conftest import need_mosquitto, wait_for
from tests.fakes import MemOutbox
from tests.fleet import HubThread, hub_seqs, rec, records_msg
from tests.test_tls import Broker, Client, broker, pki, tls, tls_keys  # noqa: F401 (fixtures)

pytestmark = pytest.mark.broker

PREFIX = "customs-edge/v1"
MB = 1024 * 1024


class Agent:
    """A device's sync over `port` with `n` records in a MemOutbox, run in its own thread."""

    def __init__(self, tmp_path: Path, device: str, port: int, n: int, **cfg: Any) -> None:
        self.outbox = MemOutbox()
        self.outbox.put([RecordIn(type="t", payload={"i": i}) for i in range(n)])
        self.sync = Sync(device, self.outbox, SyncConfig(port=port, **cfg), outbox_path=tmp_path / device / "o.db")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sync.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Agent:
        self.thread.start()
        wait_for(lambda: self.sync.link.connected, 15, "the agent's connection")
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)


def command(cmd: str, i: int) -> str:
    return json.dumps({"id": f"c{i}", "cmd": cmd, "ts": time.time()})


def test_20_resends_a_second_do_not_amplify_traffic(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Each resend used to release the whole window and send it again: 40 resends, 40 windows (32,000 records
    for 800 in flight). Now one resend per ack_timeout_s runs; the rest are refused, answered and counted."""
    op = Client(mosquitto.port, None)
    op.sub(f"{PREFIX}/dev-r/cmd/reply")
    with Agent(tmp_path, "dev-r", mosquitto.port, 2000, batch_max_records=100, window_batches=8,
               ack_timeout_s=60) as a:  # no hub: 8 batches stay in flight
        wait_for(lambda: a.sync.stats.records_sent == 800, 15, "a full window in flight")
        for i in range(40):  # each answered before the next: every resend has its effect
            op.pub(f"{PREFIX}/dev-r/cmd", command("resend", i))
            wait_for(lambda i=i: len(op.got) == i + 1, 15, f"the answer to resend {i}")
        answers = [json.loads(p) for _, p in op.got]
        assert [a["ok"] for a in answers] == [True] + [False] * 39
        assert all(a["error"].startswith("rate limited: ") for a in answers[1:])
        wait_for(lambda: a.sync.stats.records_sent == 1600, 15, "the one resend's window")
        assert a.sync.stats.commands_rate_limited == 39 and a.sync.stats.commands == 1
        assert a.sync.refusals.counts == {"command_rate_limited": 39}
        assert a.sync.stats.records_sent == 1600  # 2 windows, not 41
    op.close()


def test_the_hub_keeps_its_link_alive_during_a_long_store(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """keepalive 2 s: a store that blocks the hub's thread for 3 s used to cost it its connection (and all
    the while nothing was read). The store now runs in a worker while the link pings and reads."""
    hub = HubThread(mosquitto.port, tmp_path / "hub.db", keepalive_s=2).start()
    pongs: list[str] = []
    client = hub.hub.link._client
    assert client is not None
    client.on_log = lambda _c, _u, _level, buf: pongs.append(buf) if "PINGRESP" in buf else None
    inside, release = threading.Event(), threading.Event()
    real = hub.hub.store.store

    def slow(batches: Any, refused: Any = None) -> Any:
        batches = list(batches)
        if batches and not inside.is_set():
            inside.set()
            release.wait(30)
        return real(batches, refused)

    hub.hub.store.store = slow  # type: ignore[method-assign]
    op = Client(mosquitto.port, None)
    try:
        op.sub(f"{PREFIX}/+/ack")
        op.pub(f"{PREFIX}/dev-s/records", records_msg("dev-s", "first", [rec(1)]))
        wait_for(inside.is_set, 15, "the store to begin")
        op.pub(f"{PREFIX}/dev-s/records", records_msg("dev-s", "second", [rec(2)]))
        wait_for(lambda: hub.hub._pending, 15, "the hub to read the next message while it stores")
        wait_for(lambda: len(pongs) >= 2, 15, "two keepalive round trips while it stores")
        release.set()
        wait_for(lambda: len(op.got) == 2, 15, "both batches acked")
        assert hub.hub.link.connects == 1 and hub_seqs(tmp_path / "hub.db", "dev-s")[0] == [1, 2]
    finally:
        release.set()
        op.close()
        hub.stop()


def test_what_the_hub_reads_during_a_store_is_bounded(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Past PENDING_MAX_BYTES read during one store, the hub reads nothing more: the broker holds the rest
    (back-pressure), and it all arrives once the store is done."""
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    hub.hub.PENDING_MAX_BYTES = 1  # type: ignore[misc]
    steps = [0]
    real_step, real_store = hub.hub.link.step, hub.hub.store.store

    def counting_step(timeout: float, read: bool = True) -> Any:
        steps[0] += 1
        return real_step(timeout, read)

    inside, release = threading.Event(), threading.Event()

    def slow(batches: Any, refused: Any = None) -> Any:
        batches = list(batches)
        if batches and not inside.is_set():
            inside.set()
            release.wait(30)
        return real_store(batches, refused)

    hub.hub.link.step = counting_step  # type: ignore[method-assign]
    hub.hub.store.store = slow  # type: ignore[method-assign]
    op = Client(mosquitto.port, None)
    try:
        op.sub(f"{PREFIX}/+/ack")
        op.pub(f"{PREFIX}/dev-s/records", records_msg("dev-s", "b1", [rec(1)]))
        wait_for(inside.is_set, 15, "the store to begin")
        op.pub(f"{PREFIX}/dev-s/records", records_msg("dev-s", "b2", [rec(2)]))
        wait_for(lambda: hub.hub._pending, 15, "a message read during the store (past the bound: 1 byte)")
        for s in (3, 4):  # the broker has them (PUBACKed) and hands them on: the hub must not read them now
            op.pub(f"{PREFIX}/dev-s/records", records_msg("dev-s", f"b{s}", [rec(s)]))
        seen = steps[0]
        wait_for(lambda: steps[0] >= seen + 8, 15, "8 more steps of the hub's link")  # each could have read
        assert len(hub.hub._pending) == 1
        release.set()
        wait_for(lambda: len(op.got) == 4, 15, "all four batches acked")
        assert hub_seqs(tmp_path / "hub.db", "dev-s")[0] == [1, 2, 3, 4] and hub.hub.link.connects == 1
    finally:
        release.set()
        op.close()
        hub.stop()


def test_oversized_and_malformed_messages_on_every_topic_are_refused_without_harm(tmp_path: Path,
                                                                                  mosquitto: Mosquitto) -> None:
    deep = b"[" * 10_000  # nested past any parser's recursion limit, under every size limit
    hub = HubThread(mosquitto.port, tmp_path / "hub.db").start()
    op = Client(mosquitto.port, None)
    garbage = {
        f"{PREFIX}/dev-m/ack": [b"x" * (2 * MB), deep, b"\xff\xfe", b'{"batch": 1, "ranges": "all"}'],
        f"{PREFIX}/dev-m/cmd": [b"x" * (7 * MB), deep, b"\xff\xfe"],
        f"{PREFIX}/dev-x/records": [b"x" * (17 * MB), deep, records_msg("dev-y", "b", [rec(1)])],
        f"{PREFIX}/dev-x/status": [b"x" * (100 * 1024), deep],
        f"{PREFIX}/dev-x/health": [b"x" * (20 * 1024), deep],
    }
    try:
        op.sub(f"{PREFIX}/dev-m/cmd/reply")
        with Agent(tmp_path, "dev-m", mosquitto.port, 30, batch_max_records=10, ack_timeout_s=30) as a:
            wait_for(lambda: a.sync.stats.records_acked == 30, 30, "the agent's records acked")
            for t, payloads in garbage.items():
                for p in payloads:
                    op.pub(t, p)
            op.pub(f"{PREFIX}/dev-m/cmd", command("ping", 1))  # after the garbage: answered once it is handled
            wait_for(lambda: any(json.loads(p).get("ok") for _, p in op.got), 30, "the pong")
            a.outbox.put([RecordIn(type="t", payload={"after": True})])
            a.sync.wake.set()
            wait_for(lambda: a.sync.stats.records_acked == 31, 30, "a record after the garbage acked")
            assert a.sync.link.connects == 1 and hub.hub.link.connects == 1  # neither dropped its link
            assert a.sync.refusals.counts == {"ack_too_large": 1, "ack_malformed": 3, "command_too_large": 1,
                                              "command_malformed": 2}
            assert [json.loads(p)["ok"] for _, p in op.got] == [False, False, False, True]
        wait_for(lambda: hub.hub.refusals.counts["status_malformed"] == 1, 15, "the status garbage handled")
        assert hub.hub.refusals.counts == {"too_large": 1, "malformed": 1, "device_mismatch": 1,
                                           "status_too_large": 1, "status_malformed": 1, "health_too_large": 1,
                                           "health_malformed": 1}
        assert hub_seqs(tmp_path / "hub.db", "dev-m")[0] == list(range(1, 32))
    finally:
        op.close()
        hub.stop()


# -- over mutual TLS, with the shipped broker config -----------------------------------------------------

class CertClient:
    """A paho client with a certificate and a client id of its choosing."""

    def __init__(self, port: int, ctx: ssl.SSLContext, client_id: str) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                             protocol=paho.MQTTv311)
        self.c.tls_set_context(ctx)
        self.got: list[str] = []
        self.c.on_message = lambda _c, _u, m: self.got.append(m.topic)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        wait_for(self.c.is_connected, 15, "the client's CONNACK")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def tls_hub(tmp_path: Path, pki: Path, broker: Broker) -> Iterator[HubThread]:  # noqa: F811
    hub = HubThread(broker.port, tmp_path / "hub.db", **tls_keys(pki, "hub-1")).start()
    try:
        yield hub
    finally:
        hub.stop()


def test_a_client_with_the_hubs_client_id_cannot_take_its_session_over(tmp_path: Path, pki: Path,  # noqa: F811
                                                                       broker: Broker,  # noqa: F811
                                                                       tls_hub: HubThread) -> None:
    """The hub's client id is predictable; a device certificate connecting with it gets its own CN as client
    id (use_username_as_clientid): the hub keeps its session and its link, the intruder receives nothing."""
    intruder = CertClient(broker.port, tls(pki, "dev-a").context(), tls_hub.hub.link.client_id)
    intruder.c.subscribe(f"{PREFIX}/+/records", 1)
    b = Client(broker.port, tls(pki, "dev-b"))
    try:
        b.sub(f"{PREFIX}/dev-b/ack")
        b.pub(f"{PREFIX}/dev-b/records", records_msg("dev-b", "real", [rec(1)]))
        wait_for(lambda: b.topics(), 15, "the hub's ack")
        assert tls_hub.hub.link.connects == 1 and intruder.c.is_connected() and intruder.got == []
    finally:
        b.close()
        intruder.close()


def test_300_records_squatted_as_another_device_are_dropped_by_the_broker(tmp_path: Path, pki: Path,  # noqa: F811
                                                                          broker: Broker,  # noqa: F811
                                                                          tls_hub: HubThread) -> None:
    a, b = Client(broker.port, tls(pki, "dev-a")), Client(broker.port, tls(pki, "dev-b"))
    try:
        a.pub(f"{PREFIX}/dev-b/records", records_msg("dev-b", "squat", [rec(s, payload={"fake": 1})
                                                                         for s in range(1, 301)]))
        b.sub(f"{PREFIX}/dev-b/ack")
        for i in range(0, 201, 100):
            b.pub(f"{PREFIX}/dev-b/records", records_msg("dev-b", f"real{i}", [rec(s) for s in
                                                                             range(i + 1, min(i + 100, 201) + 1)]))
        wait_for(lambda: len(b.topics()) == 3, 15, "the real unit's three acks")
        (st,) = tls_hub.hub.store.stats()
        assert (st.device_id, st.received, st.stored, st.conflicts) == ("dev-b", 201, 201, 0)
    finally:
        a.close()
        b.close()


def expired_certificate(ca_dir: Path, name: str) -> None:
    """NAME.crt/.key signed by the CA in `ca_dir`, expired yesterday (`certs issue` refuses to make one)."""
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    (ca_dir / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (ca_dir / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))


def test_an_expired_and_a_revoked_certificate_are_refused(tmp_path: Path) -> None:
    need_mosquitto()
    d = tmp_path / "pki"
    certs.init_ca(d)
    for name, role in (("broker", "broker"), ("dev-ok", "device"), ("dev-stolen", "device")):
        certs.issue(d, name, role)  # type: ignore[arg-type]
    expired_certificate(d, "dev-old")
    r = subprocess.run([sys.executable, "-m", "customs_edge", "certs", "revoke", "dev-stolen", "--dir", str(d)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ca.crl" in r.stdout, r.stderr
    assert [e.serial_number for e in x509.load_pem_x509_crl((d / "ca.crl").read_bytes())] == \
        [x509.load_pem_x509_certificate((d / "dev-stolen.crt").read_bytes()).serial_number]
    b = Broker(tmp_path / "broker", d)
    b.mq.start()
    try:
        for name in ("dev-old", "dev-stolen"):
            link = MqttLink(f"x-{name}", "127.0.0.1", b.port, tls=tls(d, name), connect_timeout_s=3,
                            backoff_min_s=0.05, backoff_max_s=0.2)
            lost: list[Lost] = []
            try:
                wait_for(lambda link=link, lost=lost: lost.extend(e for e in link.step(0.1) if isinstance(e, Lost))
                         or len(lost) >= 2, 30, f"two refused attempts of {name}")
                assert link.connects == 0, name
            finally:
                link.close()
        ok = MqttLink("ok", "127.0.0.1", b.port, tls=tls(d, "dev-ok"), connect_timeout_s=5)
        try:  # the same CA, the same CRL: a valid certificate connects
            wait_for(lambda: ok.step(0.1) is not None and ok.connected, 30, "dev-ok's CONNACK")
        finally:
            ok.close()
    finally:
        b.mq.stop()


def test_commands_come_only_from_operator_and_hub_identities(tmp_path: Path, pki: Path,  # noqa: F811
                                                             broker: Broker) -> None:  # noqa: F811
    a, op = Client(broker.port, tls(pki, "dev-a")), Client(broker.port, tls(pki, "op-1"))
    op.sub(f"{PREFIX}/dev-b/cmd/reply")
    try:
        with Agent(tmp_path, "dev-b", broker.port, 0, **tls_keys(pki, "dev-b")) as b:
            for i, t in enumerate((f"{PREFIX}/dev-b/cmd", f"{PREFIX}/dev-a/cmd")):  # another's, its own
                a.pub(t, command("resend", i))
            op.pub(f"{PREFIX}/dev-b/cmd", command("ping", 9))  # after them: once answered, they were dropped
            wait_for(lambda: op.got, 15, "the operator's pong")
            assert [json.loads(p)["id"] for _, p in op.got] == ["c9"]
            assert b.sync.stats.commands == 1 and b.sync.refusals.counts == {}
    finally:
        a.close()
        op.close()


def test_status_survives_hostile_retained_status_and_health(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """`customs-edge status` reads the unit's retained messages, which anyone on the loopback listener may
    set: a status nested past the parser's stack and an oversized health are named, never a traceback."""
    from customs_edge.agent.config import parse_unit_config
    from customs_edge.cli.status import read_live
    from tests.conftest import unit_dict

    cfg = parse_unit_config(unit_dict(tmp_path, "/dev/ttyUSB0", mosquitto.port))
    op = Client(mosquitto.port, None)
    mqtt_log = logging.getLogger("customs_edge.core.mqtt")
    level = mqtt_log.level  # read_live quiets it for the CLI's process: put it back for the tests after this
    try:
        op.c.publish(f"{PREFIX}/{cfg.device_id}/status", b"[" * 10_000, qos=1, retain=True).wait_for_publish(5)
        op.c.publish(f"{PREFIX}/{cfg.device_id}/health", b"{" * (2 * MB), qos=1, retain=True).wait_for_publish(5)
        live = read_live(cfg, wait_s=2)
        assert live.status is None and live.health is None and len(live.unreadable) == 2, live.unreadable
        assert any("2097152 bytes, at most 16384" in u for u in live.unreadable)
    finally:
        for kind in ("status", "health"):
            op.c.publish(f"{PREFIX}/{cfg.device_id}/{kind}", b"", qos=1, retain=True).wait_for_publish(5)
        op.close()
        mqtt_log.setLevel(level)
