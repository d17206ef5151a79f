"""paho-mqtt wrapped in one small class, driven by the thread that owns it.

Nothing here runs a thread of its own: the owner calls `step()` in its loop, and paho's callbacks
(which run inside step) only append to lists the owner drains. Each connection attempt uses a fresh
paho client, so aborting a half-open attempt is closing its socket and forgetting it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)


class NotConnected(ConnectionError):
    pass


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass
class Inbox:
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    pubacks: list[int] = field(default_factory=list)


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


class MqttLink:
    """One MQTT 3.1.1 session to one broker.

    States: idle (no socket) -> connecting (socket open, CONNACK awaited, bounded by connect_timeout_s)
    -> connected. `abort()` returns to idle from anywhere. `lost` counts connections that ended.
    """

    MAX_READS = 200

    def __init__(self, client_id: str, host: str, port: int, *, keepalive: int = 10,
                 clean_session: bool = True, will: Will | None = None, username: str | None = None,
                 password: str | None = None, connect_timeout_s: float = 5.0) -> None:
        self.client_id, self.host, self.port = client_id, host, port
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.will = will
        self.username, self.password = username, password
        self.connect_timeout_s = connect_timeout_s
        self.inbox = Inbox()
        self._client: paho.Client | None = None
        self._deadline = 0.0
        self.connected = False
        self.session_present = False
        self.last_error = ""

    @property
    def idle(self) -> bool:
        return self._client is None

    def connect(self) -> None:
        """Open TCP and send CONNECT; CONNACK arrives in a later step(). Raises OSError on refusal."""
        self.abort()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        clean_session=self.clean_session, protocol=paho.MQTTv311)
        c.connect_timeout = self.connect_timeout_s
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.will:
            c.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        self._deadline = time.monotonic() + self.connect_timeout_s
        self._client = c
        try:
            c.connect(self.host, self.port, keepalive=self.keepalive)
        except (OSError, ValueError) as exc:
            self._client = None
            self.last_error = str(exc)
            raise OSError(str(exc)) from exc
        sock = c.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # paho leaves Nagle on: a small ack then waits for the peer's delayed ACK (~40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, rc: Any, _p: Any = None) -> None:
        if client is not self._client:
            return
        if rc.is_failure:
            self.last_error = f"CONNACK refused: {rc}"
            return
        self.connected = True
        self.session_present = bool(getattr(flags, "session_present", False))

    def _on_disconnect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        if client is self._client:
            self.last_error = f"disconnected: {rc}"
            self._forget()

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if client is self._client:
            self.inbox.messages.append((msg.topic, bytes(msg.payload)))

    def _on_publish(self, client: paho.Client, _u: Any, mid: int, _rc: Any, _p: Any = None) -> None:
        if client is self._client:
            self.inbox.pubacks.append(mid)

    def step(self, timeout: float) -> None:
        """Run paho's network loop once. Detects CONNACK timeouts and lost connections."""
        c = self._client
        if c is None:
            time.sleep(timeout)
            return
        if not self.connected and time.monotonic() > self._deadline:
            self.last_error = f"no CONNACK within {self.connect_timeout_s:.1f} s"
            self.abort()
            return
        rc = c.loop(timeout)
        # paho reads about one packet per loop(): keep reading what is already there (bounded), so the
        # owner handles a burst of messages in one go (one hub transaction, one outbox delete).
        for _ in range(self.MAX_READS):
            if rc != paho.MQTT_ERR_SUCCESS or c is not self._client:
                break
            before = len(self.inbox.messages) + len(self.inbox.pubacks)
            rc = c.loop(0)
            if len(self.inbox.messages) + len(self.inbox.pubacks) == before:
                break
        if rc != paho.MQTT_ERR_SUCCESS and c is self._client:
            self.last_error = f"network loop: {paho.error_string(rc)}"
            self.abort()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int:
        c = self._client
        if c is None or not self.connected:
            raise NotConnected(topic)
        info = c.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise NotConnected(f"publish to {topic}: {paho.error_string(info.rc)}")
        return int(info.mid)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        c = self._client
        if c is None or not self.connected:
            raise NotConnected(topic)
        c.subscribe(topic, qos)

    def disconnect(self, flush_s: float = 1.0) -> None:
        """Clean DISCONNECT (the broker then does not publish the will), after flushing for up to flush_s."""
        c = self._client
        if c is not None and self.connected:
            deadline = time.monotonic() + flush_s
            while c.want_write() and time.monotonic() < deadline:
                c.loop(0.05)
            c.disconnect()
            with contextlib.suppress(Exception):
                c.loop(0.05)
        self.abort()

    def abort(self) -> None:
        """Drop the connection now, without DISCONNECT (the broker will publish the will)."""
        c = self._client
        if c is not None:
            sock = c.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._forget()

    def _forget(self) -> None:
        self._client = None
        self.connected = False
