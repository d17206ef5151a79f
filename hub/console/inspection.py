"""Remote inspection for the console: an `inspect` command to a unit on an officer's request, and the unit's
snapshots (JPEG, `{prefix}/{device_id}/snapshot`, QoS 0) kept in memory, the newest per unit.

One MQTT connection, stepped by a thread of its own; requests are queued to it, so the HTTP threads never
touch the link. Nothing is asked of a unit unless an officer asks; every request is in the audit trail
(the server records it before it is queued here).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

from customs_edge.core.mqtt import BrokerSettings, Connected, Message, MqttLink, NotConnected
from customs_edge.core.wire import Command, topic

log = logging.getLogger(__name__)

MAX_SNAPSHOT = 2 * 1024 * 1024  # the shipped broker's max_packet_size; a unit sends < 100 kB


@dataclass(frozen=True)
class Snapshot:
    jpeg: bytes
    at: float  # arrival, the console's clock
    n: int  # per unit, counts up from 1


class Inspection:
    def __init__(self, host: str, port: int, settings: BrokerSettings | None = None,
                 prefix: str = "customs-edge/v1") -> None:
        self.prefix = prefix
        creds = (settings or BrokerSettings()).credentials()
        self.link = MqttLink(f"ce-console-{uuid.uuid4().hex[:12]}", host, port, clean_session=True, **creds,
                             backoff_min_s=0.2, backoff_max_s=5.0)
        self.latest: dict[str, Snapshot] = {}
        self.refused = 0  # snapshots too large or on a topic that names no unit
        self._out: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=100)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-mqtt", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self.link.connected

    def request(self, device_id: str, seconds: float, rate_hz: float = 2.0) -> str:
        """Queue an `inspect` command for a unit; its id."""
        now = time.time()
        cmd = Command(id=uuid.uuid4().hex, cmd="inspect", ts=now, expires=now + 10,  # a late start is no use
                      args={"seconds": seconds, "rate_hz": rate_hz})
        self._out.put_nowait((topic(self.prefix, device_id, "cmd"), cmd.model_dump_json().encode()))
        return cmd.id

    def snapshot(self, device_id: str) -> Snapshot | None:
        with self._lock:
            return self.latest.get(device_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.link.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for ev in self.link.step(0.1):
                if isinstance(ev, Connected):
                    self.link.subscribe(f"{self.prefix}/+/snapshot", 0)
                elif isinstance(ev, Message):
                    self._snapshot(ev.topic, ev.payload)
            while self.link.connected and not self._out.empty():
                t, payload = self._out.get_nowait()
                try:
                    self.link.publish(t, payload, qos=1)
                except NotConnected:
                    log.warning("inspect request not sent: the broker connection dropped", extra={"topic": t})

    def _snapshot(self, t: str, payload: bytes) -> None:
        parts = t.split("/")
        if len(parts) < 3 or parts[-1] != "snapshot" or len(payload) > MAX_SNAPSHOT or not payload.startswith(
                b"\xff\xd8"):  # a JPEG's start-of-image marker
            self.refused += 1
            return
        device_id = parts[-2]
        with self._lock:
            prev = self.latest.get(device_id)
            self.latest[device_id] = Snapshot(payload, time.time(), (prev.n if prev else 0) + 1)
