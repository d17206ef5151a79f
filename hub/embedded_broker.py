"""A small MQTT 3.1.1 broker in pure Python (asyncio, stdlib only), so the demo runs without mosquitto.

`customs-edge demo` prefers a local mosquitto and falls back to this. What it does, and where it stops:
- Sessions: clean and persistent (clean_session=0). A persistent session keeps its subscriptions, its
  unacknowledged QoS 1 messages and the QoS 1 messages queued while it is offline - in memory only, so
  a broker restart forgets them. QoS 0 messages for an offline client are dropped (as mosquitto does).
- QoS 2 is downgraded to QoS 1. An incoming QoS 2 PUBLISH gets the full PUBREC/PUBREL/PUBCOMP exchange
  (a resend of the same packet id before PUBREL is not routed twice) and is routed as QoS 1; a
  SUBSCRIBE at QoS 2 is granted QoS 1. Delivery QoS = min(publish QoS, granted QoS).
- `$share/GROUP/filter`: each message goes to one member of the group, round-robin over connected
  members (an offline persistent member only when none is connected). Retained messages are not sent
  to shared subscriptions. Topics starting with `$` are not matched by `#` or `+` at the first level.
- Back-pressure: each client's writes queue in its own transport buffer, so a slow reader never stalls
  the others; a client whose buffer exceeds `max_queued_bytes` is dropped (logged, `dropped_clients`).
  At most `max_inflight` unacknowledged QoS 1 messages per client; the rest wait in the session queue
  (at most `max_queued_messages`; the oldest is dropped beyond that, logged).
- Keepalive: a client silent for 1.5 x its keepalive is disconnected; its will is published (also on any
  other abnormal end: socket closed, protocol error, take-over by the same client id, dropped).
- username/password are accepted and ignored. Listens on 127.0.0.1 unless told otherwise.
- Limits, as mosquitto with configs/broker/customs-edge.conf (defaults in brackets, each a keyword argument):
  a packet over `max_packet_bytes` [16 MiB + 64 KiB, core/wire.py MAX_MESSAGE_BYTES; mosquitto `max_packet_size`]
  disconnects its sender; a string that is not valid MQTT UTF-8 (invalid UTF-8, U+0000, control characters
  U+0001-U+001F and U+007F-U+009F, non-characters: mosquitto's `mosquitto_validate_utf8`) anywhere in a packet,
  and a PUBLISH topic with a wildcard or more than 200 levels, disconnect it too; a CONNECT asking for
  keepalive 0 or more than `max_keepalive` [600 s; 0 allows any, mosquitto's own default] is refused with
  CONNACK 2 "identifier rejected" (mosquitto >= 2.0.12); a connection over `max_connections` [1000; mosquitto
  `max_connections`] is closed before its CONNECT is read; a client's subscriptions past
  `max_subscriptions` [100 per client; mosquitto has no such cap] get the SUBACK failure code 0x80.

`python -m customs_edge.hub.embedded_broker --port N` runs it in the foreground until SIGTERM/SIGINT and prints one JSON
line {"host": ..., "port": ...} when listening. In-process: `EmbeddedBroker().start()` ... `.stop()`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import struct
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from customs_edge.core.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES  # the default of max_packet_bytes
MAX_KEEPALIVE_S = 600  # configs/broker/customs-edge.conf max_keepalive
MAX_CONNECTIONS = 1000
MAX_SUBSCRIPTIONS = 100  # per client
TOPIC_HIERARCHY_LIMIT = 200  # mosquitto: a topic with more '/' than this is invalid
CONNECT_TIMEOUT_S = 10.0


class ProtocolError(Exception):
    """The client broke MQTT 3.1.1; its connection is closed (and its will published)."""


def valid_topic(topic: str) -> bool:
    """A topic name to publish to (mosquitto_pub_topic_check): not empty, no wildcards, no NUL, at most
    TOPIC_HIERARCHY_LIMIT '/'."""
    return bool(topic) and not any(c in topic for c in "+#\0") and topic.count("/") <= TOPIC_HIERARCHY_LIMIT


def mqtt_text_problem(text: str) -> str | None:
    """Why `text` (already decoded as UTF-8) is not an MQTT UTF-8 string as mosquitto checks it
    (lib/utf8_mosq.c mosquitto_validate_utf8), or None. Surrogates and overlong forms fail decoding."""
    for i, ch in enumerate(text):
        cp = ord(ch)
        if cp <= 0x1F or 0x7F <= cp <= 0x9F:
            return f"control character U+{cp:04X} at {i}"
        if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFF) in (0xFFFE, 0xFFFF):
            return f"non-character U+{cp:04X} at {i}"
    return None


def parse_filter(filt: str) -> tuple[str | None, str]:
    """`$share/GROUP/f` -> ("GROUP", "f"); a plain filter -> (None, filter). ValueError if invalid."""
    group: str | None = None
    if filt.startswith("$share/"):
        parts = filt.split("/", 2)
        if len(parts) < 3 or not parts[1] or any(c in parts[1] for c in "+#"):
            raise ValueError(f"bad shared subscription {filt!r}: expected $share/GROUP/filter")
        group, filt = parts[1], parts[2]
    levels = filt.split("/")
    if not filt or "\0" in filt:
        raise ValueError("empty topic filter or NUL in it")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be a whole last level in {filt!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level in {filt!r}")
    return group, filt


def matches(filt: str, topic: str) -> bool:
    """MQTT topic matching of a (plain, valid) filter against a topic name."""
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    f_levels, t_levels = filt.split("/"), topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


class _Sub(NamedTuple):
    group: str | None
    filt: str
    qos: int


def _packet(ptype: int, flags: int, body: bytes = b"") -> bytes:
    n, length = len(body), bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([ptype << 4 | flags]) + bytes(length) + body


def _publish_packet(msg: Message, pid: int = 0, dup: bool = False) -> bytes:
    topic = msg.topic.encode()
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", pid) if msg.qos else b"") + msg.payload
    return _packet(PUBLISH, dup << 3 | msg.qos << 1 | msg.retain, body)


class _Reader:
    """Field reader over one packet body; a short or malformed body is a ProtocolError."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("packet shorter than its fields")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            text = self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"string is not UTF-8: {exc}") from None
        if (problem := mqtt_text_problem(text)) is not None:
            raise ProtocolError(f"string is not MQTT UTF-8: {problem}")
        return text

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def done(self) -> bool:
        return self.pos >= len(self.data)


async def _read_packet(reader: asyncio.StreamReader, max_bytes: int = MAX_PACKET_BYTES) -> tuple[int, int, bytes]:
    head = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            raise ProtocolError("remaining length longer than 4 bytes")
    total = 1 + shift // 7 + 1 + length  # the whole packet, as mosquitto's max_packet_size counts it
    if max_bytes and total > max_bytes:
        raise ProtocolError(f"packet of {total} bytes exceeds max_packet_bytes {max_bytes}")
    return head >> 4, head & 0x0F, (await reader.readexactly(length) if length else b"")


@dataclass(eq=False)
class _Session:
    client_id: str
    clean: bool
    subs: dict[str, _Sub] = field(default_factory=dict)
    inflight: OrderedDict[int, Message] = field(default_factory=OrderedDict)
    queue: deque[Message] = field(default_factory=deque)
    conn: _Conn | None = None
    last_pid: int = 0
    dropped: int = 0

    def next_pid(self) -> int:
        while True:
            self.last_pid = self.last_pid % 0xFFFF + 1
            if self.last_pid not in self.inflight:
                return self.last_pid


class _Conn:
    def __init__(self, broker: EmbeddedBroker, writer: asyncio.StreamWriter) -> None:
        self.broker, self.writer = broker, writer
        self.peer = writer.get_extra_info("peername")
        self.session: _Session | None = None
        self.will: Message | None = None
        self.qos2_pids: set[int] = set()
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.writer.write(data)
        queued = self.writer.transport.get_write_buffer_size()
        if queued > self.broker.max_queued_bytes:
            client = self.session.client_id if self.session else self.peer
            log.warning("dropping slow client %s: %d bytes queued (limit %d)", client, queued,
                        self.broker.max_queued_bytes)
            self.broker.dropped_clients += 1
            self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if not self.closed:
            self.closed = True
            if abort:
                self.writer.transport.abort()
            else:
                self.writer.close()


class EmbeddedBroker:
    """MQTT 3.1.1 broker; `start()` runs it on its own thread and event loop, `serve()` in the caller's loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_queued_bytes: int = 8 * 1024 * 1024,
                 max_inflight: int = 100, max_queued_messages: int = 100_000,
                 max_packet_bytes: int = MAX_PACKET_BYTES, max_keepalive: int = MAX_KEEPALIVE_S,
                 max_connections: int = MAX_CONNECTIONS, max_subscriptions: int = MAX_SUBSCRIPTIONS) -> None:
        self.host, self.port = host, port
        self.max_queued_bytes, self.max_inflight = max_queued_bytes, max_inflight
        self.max_queued_messages = max_queued_messages
        self.max_packet_bytes, self.max_keepalive = max_packet_bytes, max_keepalive
        self.max_connections, self.max_subscriptions = max_connections, max_subscriptions
        self.refused: dict[str, int] = {}  # connections, keepalive, subscriptions refused, by limit
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, Message] = {}
        self.dropped_clients = 0
        self._round_robin: dict[str, int] = {}
        self._conns: dict[_Conn, asyncio.Task[None] | None] = {}
        self._auto_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> None:
        """Run on a daemon thread; return once listening (`.port` is then the bound port)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.serve(ready.set))
            except BaseException as exc:
                errors.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"embedded broker not listening after {timeout_s} s")
        if errors:
            raise errors[0]

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    async def serve(self, on_listening: Callable[[], object] | None = None) -> None:
        """Listen until stopped (stop(), or `request_stop()` called in this loop)."""
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        log.info("MQTT broker listening on %s:%d", self.host, self.port)
        if on_listening is not None:
            on_listening()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            tasks = [task for task in self._conns.values() if task is not None]
            for conn in list(self._conns):
                conn.close(abort=True)
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    def request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    # -- one connection ------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(self, writer)
        if self.max_connections and len(self._conns) >= self.max_connections:
            self._refuse("connections", f"connection from {conn.peer} refused: max_connections "
                                        f"{self.max_connections} reached")
            conn.close(abort=True)
            return
        self._conns[conn] = asyncio.current_task()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                ptype, _, body = await _read_packet(reader, self.max_packet_bytes)
            if ptype != CONNECT:
                raise ProtocolError(f"first packet is type {ptype}, not CONNECT")
            keepalive = self._connect(conn, body)
            while not conn.closed:
                try:
                    async with asyncio.timeout(1.5 * keepalive if keepalive else None):
                        ptype, flags, body = await _read_packet(reader, self.max_packet_bytes)
                except TimeoutError:
                    log.info("%s: silent for 1.5 x keepalive %d s, disconnecting", conn.peer, keepalive)
                    break
                if ptype == DISCONNECT:
                    conn.will = None
                    break
                self._dispatch(conn, ptype, flags, body)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            log.debug("%s: connection ended: %r", conn.peer, exc)
        except ProtocolError as exc:
            log.warning("%s: protocol error, closing: %s", conn.peer, exc)
        except Exception:
            log.exception("%s: unexpected error, closing", conn.peer)
        finally:
            self._conns.pop(conn, None)
            self._detach(conn)

    def _connect(self, conn: _Conn, body: bytes) -> int:
        r = _Reader(body)
        name, level, flags, keepalive = r.text(), r.u8(), r.u8(), r.u16()
        if name != "MQTT" or level != 4:
            conn.send(_packet(CONNACK, 0, b"\x00\x01"))  # unacceptable protocol version
            conn.close()
            return 0
        if flags & 0x01:
            raise ProtocolError("reserved CONNECT flag is set")
        clean, client_id = bool(flags & 0x02), r.text()
        if self.max_keepalive and (keepalive == 0 or keepalive > self.max_keepalive):
            # mosquitto >= 2.0.12 with max_keepalive set: a 3.1.1 client cannot be told another keepalive
            self._refuse("keepalive", f"{client_id!r} from {conn.peer} refused: keepalive {keepalive} s "
                                      f"(0 or over max_keepalive {self.max_keepalive})")
            conn.send(_packet(CONNACK, 0, b"\x00\x02"))  # identifier rejected
            conn.close()
            return 0
        will = None
        if flags & 0x04:
            topic, payload = r.text(), r.binary()
            if not valid_topic(topic):
                raise ProtocolError(f"invalid will topic {topic!r}")
            will = Message(topic, payload, min((flags >> 3) & 3, 1), bool(flags & 0x20))
        if not client_id:
            if not clean:
                conn.send(_packet(CONNACK, 0, b"\x00\x02"))  # identifier rejected
                conn.close()
                return 0
            client_id = f"auto-{next(self._auto_ids)}"
        session = self.sessions.get(client_id)
        if session is not None and session.conn is not None:
            log.info("client id %r connected again from %s: closing the old connection", client_id, conn.peer)
            session.conn.close(abort=True)  # its handler publishes its will
            session.conn = None
        present = session is not None and not clean and not session.clean
        if session is None or not present:
            session = self.sessions[client_id] = _Session(client_id, clean)
        session.conn, conn.session, conn.will = conn, session, will
        conn.send(_packet(CONNACK, 0, bytes([present, 0])))
        for pid, msg in session.inflight.items():
            conn.send(_publish_packet(msg, pid, dup=True))
        self._fill(session)
        return keepalive

    def _detach(self, conn: _Conn) -> None:
        conn.close()
        session = conn.session
        if session is not None and session.conn is conn:
            session.conn = None
            if session.clean and self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
        if conn.will is not None and not (self._stopping and self._stopping.is_set()):
            log.info("publishing the will of %s on %r", session.client_id if session else conn.peer,
                     conn.will.topic)
            self._publish(conn.will)

    def _dispatch(self, conn: _Conn, ptype: int, flags: int, body: bytes) -> None:
        session, r = conn.session, _Reader(body)
        assert session is not None
        if ptype == PUBLISH:
            qos, topic = flags >> 1 & 3, r.text()
            if qos == 3 or not valid_topic(topic):
                raise ProtocolError(f"PUBLISH with QoS {qos} to topic {topic!r}")
            pid = r.u16() if qos else 0
            msg = Message(topic, r.rest(), min(qos, 1), bool(flags & 0x01))
            if qos == 2:
                if pid not in conn.qos2_pids:
                    conn.qos2_pids.add(pid)
                    self._publish(msg)
                conn.send(_packet(PUBREC, 0, struct.pack("!H", pid)))
                return
            self._publish(msg)
            if qos == 1:
                conn.send(_packet(PUBACK, 0, struct.pack("!H", pid)))
        elif ptype == PUBACK:
            session.inflight.pop(r.u16(), None)
            self._fill(session)
        elif ptype == PUBREL:
            pid = r.u16()
            conn.qos2_pids.discard(pid)
            conn.send(_packet(PUBCOMP, 0, struct.pack("!H", pid)))
        elif ptype == SUBSCRIBE and flags == 2:
            pid, granted = r.u16(), bytearray()
            fresh: list[_Sub] = []
            while not r.done():
                filt, wanted = r.text(), r.u8()
                try:
                    group, plain = parse_filter(filt)
                except ValueError as exc:
                    log.info("%s: refusing subscription: %s", session.client_id, exc)
                    granted.append(0x80)
                    continue
                if filt not in session.subs and self.max_subscriptions and \
                        len(session.subs) >= self.max_subscriptions:
                    self._refuse("subscriptions", f"{session.client_id}: subscription refused: max_subscriptions "
                                                  f"{self.max_subscriptions} per client reached")
                    granted.append(0x80)
                    continue
                sub = session.subs[filt] = _Sub(group, plain, min(wanted & 3, 1))
                granted.append(sub.qos)
                if group is None:
                    fresh.append(sub)
            if not granted:
                raise ProtocolError("SUBSCRIBE without topic filters")
            conn.send(_packet(SUBACK, 0, struct.pack("!H", pid) + bytes(granted)))
            for sub in fresh:
                for msg in list(self.retained.values()):
                    if matches(sub.filt, msg.topic):
                        self._deliver(session, Message(msg.topic, msg.payload, min(msg.qos, sub.qos), True))
        elif ptype == UNSUBSCRIBE and flags == 2:
            pid = r.u16()
            while not r.done():
                session.subs.pop(r.text(), None)
            conn.send(_packet(UNSUBACK, 0, struct.pack("!H", pid)))
        elif ptype == PINGREQ:
            conn.send(_packet(PINGRESP, 0))
        else:
            raise ProtocolError(f"unexpected packet type {ptype} (flags {flags:#x})")

    def _refuse(self, limit: str, why: str) -> None:
        """Count a refusal by limit; log the 1st, 2nd, 4th, 8th, ... of each (a flood must not flood the log)."""
        n = self.refused[limit] = self.refused.get(limit, 0) + 1
        if n & (n - 1) == 0:
            log.warning("%s (%d refused by this limit so far)", why, n)

    # -- routing -----------------------------------------------------------------------------------------
    def _publish(self, msg: Message) -> None:
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)
        groups: dict[str, list[tuple[_Session, int]]] = {}
        for session in list(self.sessions.values()):
            best = -1
            for key, sub in session.subs.items():
                if not matches(sub.filt, msg.topic):
                    continue
                if sub.group is None:
                    best = max(best, sub.qos)
                else:
                    groups.setdefault(key, []).append((session, sub.qos))
            if best >= 0:
                self._deliver(session, Message(msg.topic, msg.payload, min(msg.qos, best)))
        for key, members in groups.items():
            online = [m for m in members if m[0].conn is not None and not m[0].conn.closed] or members
            turn = self._round_robin.get(key, 0)
            self._round_robin[key] = turn + 1
            session, qos = online[turn % len(online)]
            self._deliver(session, Message(msg.topic, msg.payload, min(msg.qos, qos)))

    def _deliver(self, session: _Session, msg: Message) -> None:
        if msg.qos == 0:
            if session.conn is not None:
                session.conn.send(_publish_packet(msg))
            return
        if len(session.queue) >= self.max_queued_messages:
            session.queue.popleft()
            session.dropped += 1
            if session.dropped & (session.dropped - 1) == 0:  # log at 1, 2, 4, 8, ... drops
                log.warning("queue of %s full (%d): %d oldest messages dropped", session.client_id,
                            self.max_queued_messages, session.dropped)
        session.queue.append(msg)
        self._fill(session)

    def _fill(self, session: _Session) -> None:
        """Move queued QoS 1 messages into flight while the client is connected and the window has room."""
        conn = session.conn
        while conn is not None and session.queue and len(session.inflight) < self.max_inflight:
            msg = session.queue.popleft()
            pid = session.next_pid()
            session.inflight[pid] = msg
            conn.send(_publish_packet(msg, pid))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m customs_edge.hub.embedded_broker",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883, help="0 picks a free port (printed)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--max-packet-bytes", type=int, default=MAX_PACKET_BYTES, help="0: no limit")
    parser.add_argument("--max-keepalive", type=int, default=MAX_KEEPALIVE_S, help="0: keepalive 0 allowed")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="0: no limit")
    parser.add_argument("--max-subscriptions", type=int, default=MAX_SUBSCRIPTIONS, help="per client; 0: no limit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    broker = EmbeddedBroker(args.host, args.port, max_packet_bytes=args.max_packet_bytes,
                            max_keepalive=args.max_keepalive, max_connections=args.max_connections,
                            max_subscriptions=args.max_subscriptions)

    def listening() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, broker.request_stop)
        print(json.dumps({"host": broker.host, "port": broker.port}), flush=True)

    asyncio.run(broker.serve(listening))
    return 0


if __name__ == "__main__":
    sys.exit(main())
