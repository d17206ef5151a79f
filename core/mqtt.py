"""One MQTT 3.1.1 link, driven by the thread that owns it; paho stays inside this module.

The owner calls `step(timeout)` in its loop and acts on the events it returns:
  Connected(session_present)   CONNACK accepted: subscribe, resend what was in flight
  Lost(reason, was_connected)  the connection ended, or an attempt failed (was_connected=False)
  Message(topic, payload, retain) a PUBLISH arrived
  PubAck(mid)                  the broker acknowledged our QoS 1 publish `mid`
A step returns what it saw (and what abort() or publish() noticed since the last step) and keeps
nothing: no list here waits for its owner to drain it.

One state machine for every owner (the agent's sync, the hub):
  idle --attempt due--> connecting --CONNACK--> connected --error, keepalive, abort()--> idle
Attempts are paced by a jittered exponential backoff; a socket that gets no CONNACK within
connect_timeout_s is dropped. The backoff resets only when a connection lasted a keepalive period, so
a broker that accepts and drops at once (two clients taking one client id's session over) is retried
ever more slowly, never in a loop; after TAKEOVER_AFTER such sessions in a row the Lost reason (and an
ERROR log line) names the likely cause: another client with the same id. A refused CONNACK is decoded
into words naming what to check (`refusal`). Each attempt uses a fresh paho client, so dropping a half-open
connection is closing its socket and forgetting it. No thread of its own: step() waits in select() on
the socket and on `waker`, which any thread may set to end the wait early.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import select
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel, Field, SecretStr, model_validator

log = logging.getLogger(__name__)


class NotConnected(ConnectionError):
    pass


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Connected:
    session_present: bool


@dataclass(frozen=True)
class Lost:
    reason: str
    was_connected: bool  # False: an attempt failed (refused, unreachable, no CONNACK in time)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False  # the broker's stored copy, sent at subscribe (not a live publish)


@dataclass(frozen=True)
class PubAck:
    mid: int


Event = Connected | Lost | Message | PubAck


class Backoff:
    """Exponential backoff with full jitter: delay ~ U(min, min(max, min * 2**attempt))."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s, self.max_s = min_s, max_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        cap = min(self.max_s, self.min_s * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return self.rng.uniform(self.min_s, max(self.min_s, cap))

    def reset(self) -> None:
        self.attempt = 0


class Wake(Protocol):
    def set(self) -> None: ...


class Link(Protocol):
    """What an owner uses; MqttLink is the real one, tests/fakes.py's FakeLink the scripted one."""

    client_id: str

    @property
    def waker(self) -> Wake: ...
    @property
    def connected(self) -> bool: ...
    def step(self, timeout: float) -> list[Event]: ...
    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int: ...
    def subscribe(self, topic: str, qos: int = 1) -> None: ...
    def abort(self, reason: str = "aborted by its owner") -> None: ...
    def disconnect(self, flush_s: float = 1.0) -> None: ...
    def close(self) -> None: ...


class _Fileno(Protocol):
    def fileno(self) -> int: ...


T = TypeVar("T", bound=_Fileno)


def wait_ready(read: Sequence[T], write: Sequence[T], timeout: float) -> tuple[list[T], list[T]]:
    """select() for objects with fileno(), without its FD_SETSIZE limit: a process holding many links (a simulated
    fleet: a socket, a waker and an outbox's files per unit) has descriptors above 1024, which select() refuses.
    An error or hang-up counts as readable (the read then reports it), as with select()."""
    poller = select.poll()
    masks: dict[int, int] = {}
    for objs, mask in ((read, select.POLLIN), (write, select.POLLOUT)):
        for o in objs:
            fd = o.fileno()
            if fd < 0:
                raise ValueError("file descriptor cannot be a negative integer")
            masks[fd] = masks.get(fd, 0) | mask
    for fd, mask in masks.items():
        poller.register(fd, mask)
    events = dict(poller.poll(max(0.0, timeout) * 1000))
    gone = select.POLLERR | select.POLLHUP | select.POLLNVAL
    return ([o for o in read if events.get(o.fileno(), 0) & (select.POLLIN | gone)],
            [o for o in write if events.get(o.fileno(), 0) & (select.POLLOUT | gone)])


class Waker:
    """Ends a step()'s wait early. set() may be called from any thread, any number of times."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def set(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe: a wake is pending anyway; closed: nobody waits
            self._w.send(b"\0")

    def fileno(self) -> int:
        return self._r.fileno()

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            while self._r.recv(4096):
                pass

    def wait(self, timeout: float) -> None:
        wait_ready([self._r], [], timeout)
        self.clear()

    def close(self) -> None:
        self._r.close()
        self._w.close()


EXPIRY_WARN_DAYS = 30


@dataclass(frozen=True)
class Tls:
    """TLS to the broker: verify it against `ca` (None: the system's trust store) and the name
    `server_name` (None: the host connected to); present `cert`/`key` as this client's identity."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context, TLS 1.2 at least, hostname checked. Built for each connection attempt, so a
        renewed certificate is used at the next connect. Raises OSError/ssl.SSLError (never with a key's bytes)."""
        ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.server_name = self.server_name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca:
            ctx.load_verify_locations(cafile=str(self.ca))
        else:
            ctx.load_default_certs()
        if self.cert:
            ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return ctx

    def days_left(self) -> float | None:
        """Days until the client certificate expires (negative: expired); None without one."""
        return cert_days_left(self.cert) if self.cert else None


class _NamedContext(ssl.SSLContext):
    """Checks the broker's certificate against `server_name` whatever address paho connects to."""

    server_name: str | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
                                   self.server_name or server_hostname, session)


def cert_days_left(path: Path, now: float | None = None) -> float:
    """Days from `now` until the PEM certificate in `path` expires (negative once it has)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return (cert.not_valid_after_utc.timestamp() - (time.time() if now is None else now)) / 86400


def warn_expiry(tls: Tls | None) -> float | None:
    """Log a warning when the client certificate expires within EXPIRY_WARN_DAYS; return its days left."""
    try:
        days = tls.days_left() if tls else None
    except (OSError, ValueError) as exc:
        log.warning("cannot read the client certificate", extra={"path": str(tls and tls.cert),
                                                                   "error": str(exc)})
        return None
    if days is not None and days < EXPIRY_WARN_DAYS:
        log.warning("client certificate expires soon: issue a new one" if days > 0
                    else "client certificate has expired: issue a new one",
                    extra={"path": str(tls and tls.cert), "days_left": round(days, 1)})
    return days


class BrokerSettings(BaseModel):
    """The broker credentials a unit's `sync` section and the hub's config share. The password is a
    SecretStr: `config` output, reprs and error messages show it as '**********'."""

    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="file holding the broker password (first line), e.g. a "
                                       "systemd credential: keeps it out of the config and argv; not with password")
    tls_ca: Path | None = Field(None, description="CA certificate (PEM) the broker's certificate is checked "
                                "against; setting it (or tls_cert) turns TLS on")
    tls_cert: Path | None = Field(None, description="this client's certificate (PEM); with tls_key")
    tls_key: Path | None = Field(None, description="this client's private key (PEM, mode 0600); with tls_cert")
    tls_server_name: str | None = Field(None, description="name the broker's certificate must carry "
                                        "(default: host)")

    @model_validator(mode="after")
    def _cert_and_key(self) -> BrokerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both (client certificate) or neither")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file: set one of them (password_file keeps it out of the file)")
        return self

    def tls(self) -> Tls | None:
        if self.tls_ca is None and self.tls_cert is None:
            return None
        return Tls(self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name)

    def credentials(self) -> dict[str, Any]:
        """MqttLink's username, password and tls arguments."""
        password = self.password.get_secret_value() if self.password else None
        if self.password_file is not None:  # read at connect time: a rotated credential is picked up on restart
            password = self.password_file.read_text().splitlines()[0] if self.password_file.stat().st_size else ""
        return {"username": self.username, "tls": self.tls(), "password": password}


MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))


def install_client_id(name: str, anchor: Path) -> str:
    """`{name}-{h}`: h hashes this machine's id with the absolute path of `anchor`, the file this install
    keeps its state in (the agent's outbox, the hub's database). Two installs never share a client id
    (each would take the other's session over, in a loop), and a restart keeps it."""
    anchor = Path(anchor).resolve()
    h = hashlib.sha256(f"{_machine_id(anchor)}\0{anchor}".encode()).hexdigest()[:10]
    return f"{name}-{h}"


def _machine_id(anchor: Path) -> str:
    for p in MACHINE_ID_FILES:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if text := p.read_text().strip():
                return text
    # no machine id (a container, a minimal image): a random id, kept next to the anchor
    kept = anchor.with_name(anchor.name + ".install-id")
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if text := kept.read_text().strip():
            return text
    new = uuid.uuid4().hex
    tmp = kept.with_name(kept.name + ".tmp")
    try:
        tmp.write_text(new + "\n")
        os.replace(tmp, kept)
    except OSError as exc:
        log.warning("cannot keep the install id: the MQTT client id changes on every restart",
                    extra={"path": str(kept), "error": str(exc)})
    return new


def step_links(links: Sequence[tuple[MqttLink, bool]], timeout: float) -> list[list[Event]]:
    """Several links driven by one thread (the hub's alert lane and its bulk link): wait up to `timeout` s for any
    of them (a packet, its waker, an attempt due), then step each once without waiting, in the order given, with
    its `read` flag. Returns each link's events, in that order."""
    rs: list[_Fileno] = []
    ws: list[_Fileno] = []
    for link, read in links:
        r, w, most = link.waits(read)
        rs += r
        ws += w
        timeout = min(timeout, most)
    if timeout > 0:
        with contextlib.suppress(OSError, ValueError):  # a closed socket: its link's step reports it
            wait_ready(rs, ws, timeout)
    return [link.step(0.0, read) for link, read in links]


TAKEOVER_AFTER = 2  # sessions in a row closed soon after CONNACK: named as a client id shared by two units

# CONNACK refusals (MQTT 3.1.1 return codes, as paho maps them to MQTT 5 reason codes): "what: the fix"
REFUSALS = {
    0x84: "unacceptable protocol version: use a broker (or listener) that accepts MQTT 3.1.1",
    0x85: "client id rejected: allow this client id at the broker",
    0x86: "bad user name or password: check sync.username and sync.password",
    0x87: "not authorised (mosquitto's answer to a wrong or missing username/password too): check "
          "sync.username, sync.password and the broker's ACL",
    0x88: "server unavailable: the broker refuses connections for now; see its log",
}


def refusal(rc: Any) -> str:
    """A CONNACK refusal code in words, naming what to check."""
    value = getattr(rc, "value", rc)
    value = {1: 0x84, 2: 0x85, 3: 0x88, 4: 0x86, 5: 0x87}.get(value, value)  # a raw 3.1.1 return code
    return REFUSALS.get(value, f"refused with code {value} ({rc})")


class MqttLink:
    """One MQTT 3.1.1 session to one broker, with its own connect/backoff state machine."""

    MAX_READS = 200  # packets read in one step when they are already there (one hub commit, one delete)

    def __init__(self, client_id: str, host: str, port: int, *, keepalive: int = 10,
                 clean_session: bool = True, will: Will | None = None, username: str | None = None,
                 password: str | None = None, tls: Tls | None = None, connect_timeout_s: float = 5.0,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0, rng: random.Random | None = None) -> None:
        self.client_id, self.host, self.port = client_id, host, port
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.will = will
        self.username, self.password = username, password
        self.tls = tls
        self.cert_days_left = warn_expiry(tls)
        self.connect_timeout_s = connect_timeout_s
        self.backoff = Backoff(backoff_min_s, backoff_max_s, rng)
        self._waker = Waker()
        self.attempts = 0  # connection attempts, and connections made: counters for status and tests
        self.connects = 0
        self.last_error = ""
        self._client: paho.Client | None = None
        self._connected = False
        self._since = 0.0  # connecting: when the attempt began; connected: when CONNACK came
        self._next_attempt = 0.0
        self._refused = ""
        self._closed_early = 0  # sessions in a row the broker closed within a keepalive of accepting them
        self._events: list[Event] = []  # what happened since the last step; every step() empties it

    @property
    def waker(self) -> Waker:
        return self._waker

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def idle(self) -> bool:
        return self._client is None

    def step(self, timeout: float, read: bool = True) -> list[Event]:
        """Wait up to `timeout` s (less when the waker is set) for something to happen; return what did.
        read=False: write and keep alive, but read nothing (back-pressure: the broker holds what is unread; a
        PINGRESP unread for a keepalive period ends the connection)."""
        c = self._client
        if c is None:
            wait = self._next_attempt - time.monotonic()
            if wait > 0:
                self._waker.wait(min(timeout, wait))
            else:
                self._attempt()
        else:
            self._io(c, timeout, read)
        events, self._events = self._events, []
        return events

    def waits(self, read: bool = True) -> tuple[list[_Fileno], list[_Fileno], float]:
        """What step(timeout, read) would wait on: (readable, writable, longest wait), for step_links()."""
        c = self._client
        if c is None:
            return [self._waker], [], max(0.0, self._next_attempt - time.monotonic())
        sock = c.socket()
        if not isinstance(sock, socket.socket):
            return [], [], 0.0  # step() reports it
        most = float("inf") if self._connected else max(0.0, self._since + self.connect_timeout_s - time.monotonic())
        return ([sock, self._waker] if read or not self._connected else [self._waker],
                [sock] if c.want_write() else [], most)

    def _attempt(self) -> None:
        self.attempts += 1
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        clean_session=self.clean_session, protocol=paho.MQTTv311)
        c.connect_timeout = self.connect_timeout_s
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.will:
            c.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        if self.tls:
            try:
                c.tls_set_context(self.tls.context())
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; messages never hold key bytes
                self._client = c
                self._drop(f"tls: {exc}")
                return
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        self._client, self._connected, self._since, self._refused = c, False, time.monotonic(), ""
        try:
            c.connect(self.host, self.port, keepalive=self.keepalive)  # TCP, then CONNECT is written
        except (OSError, ValueError) as exc:
            self._drop(f"connect: {exc}")
            return
        sock = c.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # paho leaves Nagle on: a small ack then waits for the peer's delayed ACK (~40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _io(self, c: paho.Client, timeout: float, read: bool = True) -> None:
        if not self._connected:
            left = self._since + self.connect_timeout_s - time.monotonic()
            if left <= 0:
                self._drop(f"no CONNACK within {self.connect_timeout_s:.1f} s")
                return
            timeout = min(timeout, left)
        sock = c.socket()
        if not isinstance(sock, socket.socket):
            self._drop("socket closed")
            return
        try:
            rlist: list[socket.socket | Waker] = [sock, self._waker] if read or not self._connected else [self._waker]
            readable, writable = wait_ready(rlist, [sock] if c.want_write() else [], timeout)
        except (OSError, ValueError) as exc:
            self._drop(f"select: {exc}")
            return
        if self._waker in readable:
            self._waker.clear()
        rc = paho.MQTT_ERR_SUCCESS
        if sock in readable:
            # paho reads about one packet per call: go on while packets are there (bounded), so the owner
            # handles a burst in one go
            for _ in range(self.MAX_READS):
                before = len(self._events)
                rc = c.loop_read()
                if rc != paho.MQTT_ERR_SUCCESS or c is not self._client or len(self._events) == before:
                    break
        if rc == paho.MQTT_ERR_SUCCESS and c is self._client and (writable or c.want_write()):
            rc = c.loop_write()
        if rc == paho.MQTT_ERR_SUCCESS and c is self._client:
            rc = c.loop_misc()  # keepalive: PINGREQ, and no PINGRESP in time ends the connection
        if rc != paho.MQTT_ERR_SUCCESS and c is self._client:
            self._drop(f"network loop: {paho.error_string(rc)}")

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, rc: Any, _p: Any = None) -> None:
        if client is not self._client:
            return
        if rc.is_failure:
            self._refused = f"CONNACK refused: {refusal(rc)}"  # the broker closes the connection next
            return
        self._connected, self._since = True, time.monotonic()
        self.connects += 1
        self._events.append(Connected(bool(getattr(flags, "session_present", False))))

    def _on_disconnect(self, client: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
        if client is not self._client:
            return
        if self._refused or not self._connected:
            self._drop(self._refused or "the broker closed the connection before its CONNACK")
            return
        # MQTT 3.1.1 gives no reason: the broker (or the network) closed a session it had accepted.
        # Closed soon after being accepted, again and again: what mosquitto does to the older of two
        # clients with one client id, each time the other one connects.
        if time.monotonic() - self._since < self.keepalive:
            self._closed_early += 1
        if self._closed_early >= TAKEOVER_AFTER:
            self._drop(f"another client connected as {self.client_id!r}: two units share this client id? "
                       f"(the broker closed {self._closed_early} sessions in a row soon after accepting them)",
                       level=logging.ERROR)
        else:
            self._drop("the broker or the network closed the connection")

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if client is self._client:
            self._events.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_publish(self, client: paho.Client, _u: Any, mid: int, _rc: Any, _p: Any = None) -> None:
        if client is self._client:
            self._events.append(PubAck(int(mid)))

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int:
        c = self._client
        if c is None or not self._connected:
            raise NotConnected(topic)
        info = c.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise NotConnected(f"publish to {topic}: {paho.error_string(info.rc)}")
        return int(info.mid)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        c = self._client
        if c is None or not self._connected:
            raise NotConnected(topic)
        c.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        c = self._client
        if c is None or not self._connected:
            raise NotConnected(topic)
        c.unsubscribe(topic)

    def disconnect(self, flush_s: float = 1.0) -> None:
        """Clean DISCONNECT (the broker then does not publish the will), after flushing for up to flush_s."""
        c = self._client
        if c is not None and self._connected:
            deadline = time.monotonic() + flush_s
            while c is self._client and c.want_write() and time.monotonic() < deadline:
                sock = c.socket()
                if not isinstance(sock, socket.socket):
                    break
                wait_ready([], [sock], 0.05)
                c.loop_write()
            if c is self._client:
                c.on_disconnect = None  # this end is ours: no "connection lost" for it
                c.disconnect()
        self._drop("disconnected by its owner", quiet=True)

    def abort(self, reason: str = "aborted by its owner") -> None:
        """Drop the connection now, without DISCONNECT (the broker will publish the will)."""
        self._drop(reason)

    def close(self) -> None:
        """abort() and release the waker: the link is not used again."""
        self._drop("closed", quiet=True)
        self._waker.close()

    def _drop(self, reason: str, *, quiet: bool = False, level: int = logging.WARNING) -> None:
        c, was_connected = self._client, self._connected
        if c is None:
            return
        self._client, self._connected = None, False
        sock = c.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        now = time.monotonic()
        if was_connected and now - self._since >= self.keepalive:
            self.backoff.reset()  # that connection was real: reconnect soon
            self._closed_early = 0
        delay = self.backoff.next()
        self._next_attempt = now + delay
        self.last_error = reason
        self._events.append(Lost(reason, was_connected))
        if not quiet:
            log.log(level, "broker connection lost" if was_connected else "broker connect failed",
                    extra={"broker": f"{self.host}:{self.port}", "client_id": self.client_id,
                               "error": reason, "retry_in_s": round(delay, 2)})
