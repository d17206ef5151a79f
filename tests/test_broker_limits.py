"""The shipped broker config's size limit, with real mosquitto: a packet over MAX_MESSAGE_BYTES disconnects its
sender and reaches nobody; the largest legitimate message passes; an agent splits a batch over MAX_BATCH_BYTES."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from customs_edge.core.wire import MAX_BATCH_BYTES, MAX_MESSAGE_BYTES
from tests.conftest import need_mosquitto, wait_for
from tests.test_tls import Broker, Client, pki  # noqa: F401  (pki: the fleet's certificates, a fixture)

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_config_names_the_wire_limit() -> None:
    conf = (ROOT / "configs" / "broker" / "customs-edge.conf").read_text().splitlines()
    assert f"max_packet_size {MAX_MESSAGE_BYTES}" in conf
    assert MAX_BATCH_BYTES * 2 <= MAX_MESSAGE_BYTES  # a batch cut at the limit fits, with its envelope


@pytest.fixture
def shipped(tmp_path: Path, pki: Path) -> Iterator[Broker]:  # noqa: F811
    """mosquitto running configs/broker/customs-edge.conf (its paths and ports moved to the test's)."""
    need_mosquitto()
    b = Broker(tmp_path / "broker", pki)
    b.mq.start()
    try:
        yield b
    finally:
        b.mq.stop()


def test_the_hub_s_session_queues_a_burst_past_mosquitto_s_default_of_1000(shipped: Broker) -> None:
    """A hub busy or restarting while 200 units reconnect: 1,600 batches queue for its persistent session. With
    mosquitto's default max_queued_messages (1,000) the rest were dropped and resent by the units later."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[str] = []
    subacked: set[int] = set()

    def hub_session() -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="hub-q", clean_session=False, protocol=paho.MQTTv311)
        c.on_message = lambda _c, _u, m: got.append(m.topic)
        c.on_subscribe = lambda _c, _u, mid, *_: subacked.add(mid)
        c.connect("127.0.0.1", shipped.plain_port)
        c.loop_start()
        wait_for(c.is_connected, 10, "the hub session's CONNACK")
        return c

    hub = hub_session()
    mid = hub.subscribe("customs-edge/v1/+/records", 1)[1]
    wait_for(lambda: mid in subacked, 10, "SUBACK")
    hub.loop_stop()
    hub.disconnect()  # the session stays: the broker queues for it
    sender = Client(shipped.plain_port, None)
    n = 1_600
    for i in range(n):
        sender.pub(f"customs-edge/v1/dev-{i % 200}/records", b"{}")  # QoS 1, PUBACKed by the broker
    sender.close()
    hub = hub_session()
    try:
        wait_for(lambda: len(got) >= n, 30, f"{n} queued messages")
    finally:
        hub.loop_stop()
        hub.disconnect()
    assert len(got) == n


def test_an_oversized_publish_disconnects_its_sender_and_reaches_nobody(shipped: Broker) -> None:
    broker = shipped
    listener = Client(broker.plain_port, None)
    try:
        listener.sub("customs-edge/v1/+/cmd")
        sender = Client(broker.plain_port, None)
        big = b"x" * (MAX_MESSAGE_BYTES - 1024)  # the largest legitimate message, with its header, passes
        sender.pub("customs-edge/v1/dev-a/cmd", big)
        wait_for(lambda: listener.topics(), 10, "the large but legal message")
        # a raw MQTT 3.1.1 client sends one packet over the limit: the broker hangs up without a PUBACK
        s = socket.create_connection(("127.0.0.1", broker.plain_port), timeout=10)
        body = struct.pack("!H", 4) + b"MQTT" + bytes([4, 2]) + struct.pack("!H", 30) + struct.pack("!H", 3) + b"big"
        s.sendall(bytes([0x10, len(body)]) + body)
        assert s.recv(4) == b"\x20\x02\x00\x00"
        topic = b"customs-edge/v1/dev-a/cmd"
        payload = b"y" * (MAX_MESSAGE_BYTES + 1)
        rest = struct.pack("!H", len(topic)) + topic + struct.pack("!H", 1) + payload
        n, length = len(rest), bytearray()
        while True:
            n, digit = n >> 7, n & 0x7F
            length.append(digit | (0x80 if n else 0))
            if not n:
                break
        try:
            s.sendall(bytes([0x32]) + bytes(length) + rest)
            got = s.recv(4)
        except ConnectionError:
            got = b""
        assert got == b"", got  # closed, no PUBACK
        s.close()
        sender.pub("customs-edge/v1/dev-a/cmd", b"after")  # the broker is fine; the big one never arrived
        wait_for(lambda: len(listener.topics()) >= 2, 10, "the message after")
        assert [len(p) for _, p in listener.got] == [len(big), 5]
        sender.close()
    finally:
        listener.close()


def test_the_agent_splits_a_batch_over_the_limit_and_every_part_is_acked(tmp_path: Path) -> None:
    from customs_edge.core.records import RecordIn
    from tests.fakes import FakeLink, MemOutbox
    from tests.test_sync_machine import connect, hub_ack, make, seqs

    ob = MemOutbox()
    ob.put([RecordIn(type="photo_chunk", payload={"i": i, "data": "z" * 60_000}) for i in range(40)])
    sync, link, _ = make(tmp_path, 0, outbox=ob, link=FakeLink(), batch_max_records=40, window_batches=1)
    connect(sync, link)
    sent = link.batches()
    assert len(sent) > 1 and all(len(p.payload) <= MAX_BATCH_BYTES for p in sent)
    assert sorted(s for p in sent for s in seqs(p)) == list(range(1, 41))  # every record, once
    for p in sent:
        link.puback(p.mid)
        hub_ack(link, p, [(min(seqs(p)), max(seqs(p)))])
    sync.step()
    assert ob.records == {}


def test_the_limit_holds_the_largest_legitimate_message_a_whole_photo() -> None:
    from customs_edge.hub.photos import HEADER_MAX, MAX_PHOTO_BYTES

    topic = len("customs-edge/v1/") + 64 + len("/photos")  # the longest device id
    assert MAX_PHOTO_BYTES + HEADER_MAX + topic + 16 <= MAX_MESSAGE_BYTES  # 16: fixed header, lengths, packet id
