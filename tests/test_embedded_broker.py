"""The embedded MQTT 3.1.1 broker against real paho-mqtt 2.x clients (and a raw socket where paho would hide
the wire: unacknowledged messages, a reader that stops reading) on 127.0.0.1."""

from __future__ import annotations

import json
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.hub.embedded_broker import EmbeddedBroker, matches, parse_filter

DEADLINE_S = 5.0


def wait_for(cond, timeout_s: float = DEADLINE_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Client:
    """A paho client on its own network thread; received messages go to a queue."""

    def __init__(self, port: int, client_id: str = "", clean: bool = True, keepalive: int = 60,
                 will: tuple[str, bytes, int, bool] | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected, self.disconnected = threading.Event(), threading.Event()
        self.session_present: bool | None = None
        self.subacks: dict[int, list[int]] = {}
        c = self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                                    protocol=mqtt.MQTTv311)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *_: self.disconnected.set()
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        c.on_subscribe = lambda _c, _u, mid, codes, _p: self.subacks.__setitem__(mid, [x.value for x in codes])
        c.on_unsubscribe = lambda _c, _u, mid, _codes, _p: self.subacks.__setitem__(mid, [])
        if will is not None:
            c.will_set(will[0], will[1], qos=will[2], retain=will[3])
        c.connect("127.0.0.1", port, keepalive=keepalive)
        c.loop_start()
        assert self.connected.wait(DEADLINE_S), "no CONNACK"

    def _on_connect(self, _c, _u, flags, reason, _p) -> None:
        self.session_present = flags.session_present
        self.connected.set()

    def subscribe(self, *subs: tuple[str, int]) -> list[int]:
        _, mid = self.paho.subscribe(list(subs))
        wait_for(lambda: mid in self.subacks, what="SUBACK")
        return self.subacks[mid]

    def unsubscribe(self, topic: str) -> None:
        _, mid = self.paho.unsubscribe(topic)
        wait_for(lambda: mid in self.subacks, what="UNSUBACK")

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(DEADLINE_S)
        assert info.is_published(), f"publish to {topic} not completed"

    def get(self, timeout_s: float = DEADLINE_S) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError("no message arrived") from None

    def take(self, n: int) -> list[tuple[str, bytes]]:
        return [(m.topic, m.payload) for m in (self.get() for _ in range(n))]

    def until(self, marker: str) -> list[tuple[str, bytes]]:
        """Everything received before the message on topic `marker` (which proves nothing else is pending)."""
        got = []
        while (m := self.get()).topic != marker:
            got.append((m.topic, m.payload))
        return got

    def close(self) -> None:
        self.paho.disconnect()
        self.disconnected.wait(DEADLINE_S)
        self.paho.loop_stop()

    def die(self) -> None:
        """Stop the network thread and close the socket without DISCONNECT."""
        self.paho.loop_stop()
        sock = self.paho.socket()
        assert isinstance(sock, socket.socket)
        sock.close()


class Raw:
    """A hand-written MQTT 3.1.1 client for what paho does not let a test control."""

    def __init__(self, port: int, client_id: str, clean: bool = True, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(DEADLINE_S)
        self.sock.connect(("127.0.0.1", port))
        self.send(1, 0, self.text("MQTT") + bytes([4, 0x02 if clean else 0]) + struct.pack("!H", 60)
                  + self.text(client_id))
        ptype, _, body = self.recv()
        assert ptype == 2 and body[1] == 0, body
        self.session_present = bool(body[0])

    @staticmethod
    def text(s: str) -> bytes:
        return struct.pack("!H", len(s)) + s.encode()

    def send(self, ptype: int, flags: int, body: bytes) -> None:
        assert len(body) < 128
        self.sock.sendall(bytes([ptype << 4 | flags, len(body)]) + body)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def recv(self) -> tuple[int, int, bytes]:
        head = self._exact(1)[0]
        length, shift = 0, 0
        while (byte := self._exact(1)[0]) & 0x80:
            length |= (byte & 0x7F) << shift
            shift += 7
        length |= byte << shift
        return head >> 4, head & 0x0F, self._exact(length)

    def subscribe(self, topic: str, qos: int) -> None:
        self.send(8, 2, struct.pack("!H", 1) + self.text(topic) + bytes([qos]))
        assert self.recv() == (9, 0, b"\x00\x01" + bytes([qos]))


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker()
    b.start()
    yield b
    b.stop()


@pytest.mark.parametrize(
    ("filt", "topic", "expected"),
    [
        ("a/b", "a/b", True), ("a/b", "a/c", False), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
        ("a/+/c", "a/x/c", True), ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "a/b", True),
        ("+", "a/b", False), ("+/+", "/x", True), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True), ("a/b/#", "a/bc", False),
    ],
)
def test_topic_matching(filt: str, topic: str, expected: bool) -> None:
    assert matches(filt, topic) is expected


def test_filter_parsing() -> None:
    assert parse_filter("$share/hubs/cx/+/records") == ("hubs", "cx/+/records")
    assert parse_filter("a/+/#") == (None, "a/+/#")
    for bad in ("a/#/b", "a/b#", "a+/b", "", "$share/g", "$share//a", "$share/g+/a", "$share/g/a/#/b"):
        with pytest.raises(ValueError):
            parse_filter(bad)


def test_pubsub_qos_and_wildcards(broker: EmbeddedBroker) -> None:
    sub, pub = Client(broker.port), Client(broker.port)
    assert sub.subscribe(("q0/t", 0), ("q1/t", 1), ("q2/t", 2)) == [0, 1, 1]
    pub.publish("q0/t", "a", qos=1)   # granted 0 -> delivered at 0
    pub.publish("q1/t", "b", qos=0)   # published at 0 -> delivered at 0
    pub.publish("q1/t", "c", qos=1)
    pub.publish("q2/t", "d", qos=2)   # QoS 2 completes (PUBREC/PUBREL/PUBCOMP) and is delivered at QoS 1
    got = [(m.topic, m.payload, m.qos, m.retain) for m in (sub.get() for _ in range(4))]
    assert got == [("q0/t", b"a", 0, False), ("q1/t", b"b", 0, False), ("q1/t", b"c", 1, False),
                   ("q2/t", b"d", 1, False)]

    wild = Client(broker.port)
    wild.subscribe(("w/+/c", 0), ("w/x/#", 0), ("#", 0), ("$SYS/#", 0))
    for topic in ("w/a/c", "w/x", "w/x/y/z", "w/a/b", "$SYS/load"):
        pub.publish(topic, topic, qos=1)
    pub.publish("end", "", qos=1)
    got = wild.until("end")
    # overlapping filters deliver once; "#" does not see $SYS, "$SYS/#" does
    assert got == [(t, t.encode()) for t in ("w/a/c", "w/x", "w/x/y/z", "w/a/b", "$SYS/load")]

    wild.unsubscribe("#")
    pub.publish("w/a/b", "gone", qos=1)
    pub.publish("w/a/c", "kept", qos=1)
    assert wild.get().payload == b"kept"
    for c in (sub, pub, wild):
        c.close()


def test_retained_messages_and_clearing(broker: EmbeddedBroker) -> None:
    pub = Client(broker.port)
    pub.publish("ret/a", "one", qos=1, retain=True)
    pub.publish("ret/a", "two", qos=1, retain=True)
    pub.publish("ret/b", "bee", qos=0, retain=True)
    late = Client(broker.port)
    late.subscribe(("ret/#", 1))
    got = sorted((m.topic, m.payload, m.qos, m.retain) for m in (late.get(), late.get()))
    assert got == [("ret/a", b"two", 1, True), ("ret/b", b"bee", 0, True)]
    pub.publish("ret/a", "live", qos=1, retain=True)  # to an established subscription: retain flag 0
    m = late.get()
    assert (m.payload, m.retain) == (b"live", False)

    pub.publish("ret/a", "", qos=1, retain=True)  # empty payload clears
    assert late.get().payload == b""
    later = Client(broker.port)
    later.subscribe(("ret/#", 1), ("mark", 0))
    pub.publish("mark", "", qos=1)
    assert later.until("mark") == [("ret/b", b"bee")]
    for c in (pub, late, later):
        c.close()


def test_will_on_abrupt_close_not_on_disconnect(broker: EmbeddedBroker) -> None:
    watcher = Client(broker.port)
    watcher.subscribe(("status/#", 1))
    dying = Client(broker.port, "unit-1", will=("status/unit-1", b"lost", 1, True))
    polite = Client(broker.port, "unit-2", will=("status/unit-2", b"lost", 1, False))
    polite.close()
    wait_for(lambda: "unit-2" not in broker.sessions, what="unit-2 to leave")
    dying.die()
    m = watcher.get()
    assert (m.topic, m.payload, m.qos) == ("status/unit-1", b"lost", 1)
    watcher.paho.publish("status/mark", "", qos=1)
    assert watcher.until("status/mark") == []  # the polite client's will never came

    late = Client(broker.port)  # the will was retained
    late.subscribe(("status/+", 0))
    m = late.get()
    assert (m.topic, m.payload, m.retain) == ("status/unit-1", b"lost", True)
    watcher.close()
    late.close()


def test_keepalive_timeout_disconnects_silent_client(broker: EmbeddedBroker) -> None:
    watcher = Client(broker.port)
    watcher.subscribe(("ka/#", 0))
    pinging = Client(broker.port, "pinger", keepalive=1, will=("ka/pinger", b"dead", 0, False))
    t0 = time.monotonic()
    silent = Client(broker.port, "silent", keepalive=1, will=("ka/silent", b"dead", 0, False))
    silent.paho.loop_stop()  # socket stays open, nothing more is sent
    m = watcher.get()
    elapsed = time.monotonic() - t0
    assert m.topic == "ka/silent"
    assert 1.4 <= elapsed < 4.0, elapsed
    sock = silent.paho.socket()
    assert isinstance(sock, socket.socket)
    sock.settimeout(DEADLINE_S)
    while sock.recv(64):  # a PINGRESP may still be unread; then the broker closed it
        pass
    # the client that pings every keepalive stays connected well past 1.5 x keepalive
    wait_for(lambda: time.monotonic() - t0 > 3.0, what="3 s")
    watcher.paho.publish("ka/mark", "", qos=0)
    assert watcher.until("ka/mark") == []
    assert broker.sessions["pinger"].conn is not None
    sock.close()
    pinging.close()
    watcher.close()


def test_shared_subscription_round_robin(broker: EmbeddedBroker) -> None:
    hubs = [Client(broker.port, f"hub-{i}") for i in range(2)]
    for h in hubs:
        assert h.subscribe(("$share/hubs/cx/+/records", 1)) == [1]
    everything, other_group = Client(broker.port), Client(broker.port)
    everything.subscribe(("cx/+/records", 1))
    other_group.subscribe(("$share/audit/cx/#", 1))
    pub = Client(broker.port)
    for i in range(10):
        pub.publish(f"cx/unit-{i}/records", str(i), qos=1)
    all_ten = [(f"cx/unit-{i}/records", str(i).encode()) for i in range(10)]
    assert everything.take(10) == all_ten
    assert other_group.take(10) == all_ten  # a group of one gets every message
    shares = [h.take(5) for h in hubs]
    assert sorted(shares[0] + shares[1]) == sorted(all_ten)  # each message to exactly one hub, 5 each
    assert {p for _, p in shares[0]} in ({b"0", b"2", b"4", b"6", b"8"}, {b"1", b"3", b"5", b"7", b"9"})
    for c in (*hubs, everything, other_group, pub):
        c.close()


def test_persistent_session_queues_while_offline(broker: EmbeddedBroker) -> None:
    hub = Client(broker.port, "hub-p", clean=False)
    assert hub.session_present is False
    hub.subscribe(("up/#", 1), ("live/#", 0))
    hub.close()
    pub = Client(broker.port)
    for i in range(20):
        pub.publish(f"up/{i}", str(i), qos=1)
    pub.publish("live/x", "qos0 is not queued", qos=0)

    back = Client(broker.port, "hub-p", clean=False)  # no new SUBSCRIBE: the session kept it
    assert back.session_present is True
    assert back.take(20) == [(f"up/{i}", str(i).encode()) for i in range(20)]
    pub.publish("up/mark", "", qos=1)
    assert back.until("up/mark") == []
    back.close()

    fresh = Client(broker.port, "hub-p", clean=True)  # a clean session discards the stored one
    assert fresh.session_present is False
    fresh.close()
    pub.publish("up/after", "x", qos=1)
    again = Client(broker.port, "hub-p", clean=False)
    assert again.session_present is False
    again.subscribe(("up/#", 1))
    pub.publish("up/mark", "", qos=1)
    assert again.until("up/mark") == []
    for c in (pub, again):
        c.close()


def test_unacknowledged_qos1_redelivered_with_dup(broker: EmbeddedBroker) -> None:
    raw = Raw(broker.port, "acker", clean=False)
    raw.subscribe("d/t", 1)
    pub = Client(broker.port)
    pub.publish("d/t", "x", qos=1)
    ptype, flags, body = raw.recv()
    assert (ptype, flags) == (3, 0x02)  # QoS 1, no DUP
    pid = body[5:7]
    assert body == Raw.text("d/t") + pid + b"x"
    raw.sock.close()  # no PUBACK
    wait_for(lambda: broker.sessions["acker"].conn is None, what="the broker to see the close")

    raw = Raw(broker.port, "acker", clean=False)
    assert raw.session_present
    ptype, flags, body = raw.recv()
    assert (ptype, flags, body) == (3, 0x0A, Raw.text("d/t") + pid + b"x")  # QoS 1 with DUP, same packet id
    raw.send(4, 0, pid)  # PUBACK
    raw.send(12, 0, b"")  # PINGREQ: the broker answers in order, so nothing else is pending
    assert raw.recv() == (13, 0, b"")
    raw.sock.close()
    wait_for(lambda: broker.sessions["acker"].conn is None, what="the broker to see the close")
    raw = Raw(broker.port, "acker", clean=False)
    raw.send(12, 0, b"")
    assert raw.recv() == (13, 0, b"")  # acknowledged: not redelivered
    raw.sock.close()
    pub.close()


def test_slow_subscriber_is_dropped_without_blocking_others() -> None:
    broker = EmbeddedBroker(max_queued_bytes=256 * 1024)
    broker.start()
    try:
        slow = Raw(broker.port, "slow", rcvbuf=4096)
        slow.subscribe("bp/#", 0)  # ... and never reads again
        fast, pub = Client(broker.port), Client(broker.port)
        fast.subscribe(("bp/#", 0))
        payload = bytes(16 * 1024)
        sent = 0
        deadline = time.monotonic() + 10.0
        while broker.dropped_clients == 0:
            assert time.monotonic() < deadline, "slow client never dropped"
            pub.publish(f"bp/{sent}", payload, qos=1)
            sent += 1
        pub.publish("bp/end", "", qos=1)
        got = fast.until("bp/end")
        assert [t for t, _ in got] == [f"bp/{i}" for i in range(sent)]  # the fast one lost nothing
        assert "slow" not in broker.sessions
        slow.sock.settimeout(DEADLINE_S)
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                slow.recv()
        fast.close()
        pub.close()
    finally:
        broker.stop()


def test_refuses_bad_filters_other_protocol_versions_and_anonymous_persistent(broker: EmbeddedBroker) -> None:
    raw = Raw(broker.port, "filters")
    raw.send(8, 2, struct.pack("!H", 7) + Raw.text("ok/#") + b"\x02" + Raw.text("bad/#/x") + b"\x01"
             + Raw.text("$share//x") + b"\x00")
    assert raw.recv() == (9, 0, b"\x00\x07" + bytes([1, 0x80, 0x80]))
    raw.sock.close()
    for connect, code in ((Raw.text("MQIsdp") + bytes([3, 2]) + b"\x00\x3c" + Raw.text("x"), 1),
                          (Raw.text("MQTT") + bytes([4, 0]) + b"\x00\x3c" + Raw.text(""), 2)):
        with socket.create_connection(("127.0.0.1", broker.port), timeout=DEADLINE_S) as s:
            s.sendall(bytes([0x10, len(connect)]) + connect)
            assert s.recv(4) == bytes([0x20, 2, 0, code])
            assert s.recv(1) == b""  # and closed


def test_command_line_runs_until_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "customs_edge.hub.embedded_broker", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["host"] == "127.0.0.1" and line["port"] > 0
        a = Client(line["port"])
        a.subscribe(("cli/t", 1))
        a.publish("cli/t", "hello", qos=1)
        assert a.get().payload == b"hello"
        a.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- limits, as mosquitto (lib/utf8_mosq.c, lib/util_topic.c, src/handle_connect.c, src/net.c) ---------------

def mqtt_packet(ptype: int, flags: int, body: bytes) -> bytes:
    """An MQTT packet with the spec's variable-length remaining length (written here from MQTT 3.1.1 2.2.3)."""
    n, length = len(body), bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([ptype << 4 | flags]) + bytes(length) + body


def closed(sock: socket.socket) -> bool:
    """The broker hung up (EOF or reset) and sent nothing first."""
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def connect_raw(port: int, client_id: str, keepalive: int = 60) -> tuple[socket.socket, bytes]:
    """A raw CONNECT; returns the socket and the CONNACK's 4 bytes (b"" if the connection was closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    s.sendall(mqtt_packet(1, 0, Raw.text("MQTT") + bytes([4, 2]) + struct.pack("!H", keepalive)
                          + Raw.text(client_id)))
    try:
        return s, s.recv(4)
    except ConnectionError:
        return s, b""


@pytest.mark.parametrize("topic", [b"dev/\x01/records", b"dev/\x7f", b"dev/\xc2\x85", b"dev/\xef\xbf\xbe",
                                   b"dev/\xff\xfe", b"dev/\xed\xa0\x80", b"dev/\xc0\xaf", b"dev/+/x", b"dev/#",
                                   b"\x00", b"/".join([b"l"] * 202)],
                         ids=["C0 control", "DEL", "C1 control", "non-character", "invalid UTF-8", "surrogate",
                              "overlong", "plus", "hash", "NUL", "201 levels"])
def test_a_publish_topic_mosquitto_refuses_disconnects_and_reaches_nobody(broker: EmbeddedBroker,
                                                                          topic: bytes) -> None:
    watcher = Client(broker.port)
    watcher.subscribe(("#", 1))
    raw = Raw(broker.port, "bad-topic")
    raw.sock.sendall(mqtt_packet(3, 2, struct.pack("!H", len(topic)) + topic + b"\x00\x01payload"))
    assert closed(raw.sock)  # no PUBACK: disconnected
    raw.sock.close()
    watcher.publish("ok/after", b"x", qos=1)
    assert watcher.until("ok/after") == []
    watcher.close()


def test_control_characters_elsewhere_in_a_packet_disconnect_too(broker: EmbeddedBroker) -> None:
    s, connack = connect_raw(broker.port, "ctl\x07id")
    assert connack == b"" or closed(s)  # a client id with BEL: no session
    s.close()
    raw = Raw(broker.port, "sub-ctl")
    raw.sock.sendall(mqtt_packet(8, 2, struct.pack("!H", 1) + Raw.text("a/\x1bb") + b"\x01"))
    assert closed(raw.sock)
    raw.sock.close()


def test_a_packet_over_max_packet_bytes_disconnects_its_sender() -> None:
    b = EmbeddedBroker(max_packet_bytes=1024)
    b.start()
    try:
        watcher = Client(b.port)
        watcher.subscribe(("big/#", 1))
        raw = Raw(b.port, "big")
        topic = b"big/t"
        head = struct.pack("!H", len(topic)) + topic + b"\x00\x01"
        fits = mqtt_packet(3, 2, head + b"a" * (1024 - 3 - len(head)))  # 1 + 2 length bytes + body = 1024
        assert len(fits) == 1024
        raw.sock.sendall(fits)
        assert raw.recv() == (4, 0, b"\x00\x01")  # PUBACK: at the limit is allowed
        raw.sock.sendall(mqtt_packet(3, 2, head + b"b" * (1024 - 3 - len(head) + 1)))
        assert closed(raw.sock)
        raw.sock.close()
        watcher.publish("big/end", b"", qos=1)
        assert [len(p) for _, p in watcher.until("big/end")] == [1024 - 3 - len(head)]
        watcher.close()
    finally:
        b.stop()


def test_default_max_packet_is_the_wire_limit_the_shipped_broker_uses() -> None:
    from customs_edge.core.wire import MAX_MESSAGE_BYTES
    from customs_edge.hub.embedded_broker import MAX_PACKET_BYTES

    assert MAX_PACKET_BYTES == MAX_MESSAGE_BYTES


def test_keepalive_0_or_over_the_maximum_is_refused_like_mosquitto_with_max_keepalive(
        broker: EmbeddedBroker) -> None:
    assert broker.max_keepalive == 600  # configs/broker/customs-edge.conf max_keepalive
    for keepalive in (0, 601):
        s, connack = connect_raw(broker.port, f"ka-{keepalive}", keepalive)
        assert connack == b"\x20\x02\x00\x02"  # CONNACK "identifier rejected"
        assert closed(s)
        s.close()
    s, connack = connect_raw(broker.port, "ka-600", 600)
    assert connack == b"\x20\x02\x00\x00"
    s.close()
    assert broker.refused["keepalive"] == 2
    anything = EmbeddedBroker(max_keepalive=0)  # mosquitto's own default: keepalive 0 allowed
    anything.start()
    try:
        s, connack = connect_raw(anything.port, "ka-0", 0)
        assert connack == b"\x20\x02\x00\x00"
        s.close()
    finally:
        anything.stop()


def test_connections_over_the_cap_are_closed_before_connect() -> None:
    b = EmbeddedBroker(max_connections=2)
    b.start()
    try:
        first, second = Raw(b.port, "c1"), Raw(b.port, "c2")
        s, connack = connect_raw(b.port, "c3")
        assert connack == b""
        s.close()
        assert b.refused["connections"] == 1
        first.sock.close()
        wait_for(lambda: len(b._conns) < 2, what="the first connection to end")
        third = Raw(b.port, "c3")  # room again
        second.send(12, 0, b"")
        assert second.recv() == (13, 0, b"")  # the others never noticed
        third.sock.close()
        second.sock.close()
    finally:
        b.stop()


def test_subscriptions_over_the_per_client_cap_are_refused_one_by_one() -> None:
    b = EmbeddedBroker(max_subscriptions=3)
    b.start()
    try:
        raw = Raw(b.port, "subs")
        body = struct.pack("!H", 9) + b"".join(Raw.text(f"t/{i}") + b"\x01" for i in range(5))
        raw.send(8, 2, body)
        assert raw.recv() == (9, 0, b"\x00\x09" + bytes([1, 1, 1, 0x80, 0x80]))
        raw.send(8, 2, struct.pack("!H", 10) + Raw.text("t/0") + b"\x00")  # an existing filter: replaced, allowed
        assert raw.recv() == (9, 0, b"\x00\x0a\x00")
        raw.sock.close()
        other = Raw(b.port, "other")  # the cap is per client
        other.subscribe("t/9", 1)
        other.sock.close()
        assert b.refused["subscriptions"] == 2
    finally:
        b.stop()
