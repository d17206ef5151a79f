"""Fakes with the real interfaces, for testing the sync state machine without a broker or a file.

FakeLink implements core/mqtt.py's Link: the test scripts what the broker does (`connect`, `drop`,
`puback`, `deliver`) and the next step() returns it as events, exactly as MqttLink would; what the
owner published is kept in `published`. Message ids wrap at `mid_max` as MQTT's do at 65535.
MemOutbox implements agent/outbox.py's Outbox in memory.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from customs_edge.agent.outbox import DeadLetter, MemoryOutbox
from customs_edge.core.mqtt import Connected, Event, Lost, Message, NotConnected, PubAck
from customs_edge.core.records import Pending


@dataclass
class Published:
    topic: str
    payload: bytes
    mid: int
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class FakeLink:
    def __init__(self, client_id: str = "fake", mid_max: int = 65535) -> None:
        self.client_id = client_id
        self.waker = threading.Event()
        self.mid_max = mid_max
        self.published: list[Published] = []
        self.subscribed: list[str] = []
        self.aborts: list[str] = []
        self.steps = 0
        self._connected = False
        self._next: list[Event] = []
        self._mid = 0

    # -- the broker's side, scripted by the test --------------------------------------------------
    def connect(self, session_present: bool = False) -> None:
        self._next.append(Connected(session_present))

    def drop(self, reason: str = "broker went away") -> None:
        self._next.append(Lost(reason, True))

    def puback(self, mid: int) -> None:
        self._next.append(PubAck(mid))

    def deliver(self, topic: str, payload: bytes | str) -> None:
        self._next.append(Message(topic, payload.encode() if isinstance(payload, str) else payload))

    def batches(self) -> list[Published]:
        return [p for p in self.published if p.topic.endswith(("/records", "/alerts"))]

    # -- Link ---------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    def step(self, timeout: float) -> list[Event]:
        self.steps += 1
        events, self._next = self._next, []
        for ev in events:
            if isinstance(ev, Connected):
                self._connected = True
            elif isinstance(ev, Lost):
                self._connected = False
        return events

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int:
        if not self._connected:
            raise NotConnected(topic)
        self._mid = self._mid % self.mid_max + 1
        self.published.append(Published(topic, payload.encode() if isinstance(payload, str) else payload,
                                         self._mid, retain))
        return self._mid

    def subscribe(self, topic: str, qos: int = 1) -> None:
        if not self._connected:
            raise NotConnected(topic)
        self.subscribed.append(topic)

    def abort(self, reason: str = "aborted by its owner") -> None:
        self.aborts.append(reason)
        if self._connected:
            self._connected = False
            self._next.append(Lost(reason, True))

    def disconnect(self, flush_s: float = 1.0) -> None:
        self._connected = False

    def close(self) -> None:
        self._connected = False


class MemOutbox(MemoryOutbox):
    """The production in-memory outbox (agent/outbox.py, held to the outbox contract), with views for
    assertions: `records` (pending, by seq), `dead` (seq -> (dead letter, reason)), `last_seq`."""

    @property
    def records(self) -> dict[int, Pending]:
        with self._lock:
            return {seq: r for by_seq in self._records.values() for seq, r in by_seq.items()}

    @property
    def dead(self) -> dict[int | None, tuple[DeadLetter, str]]:
        return {d.seq: (d, d.reason) for d in reversed(self.dead_letters(10_000))}

    @property
    def last_seq(self) -> int:
        return self.stats().last_seq


class SyncClock:
    """agent/sync.py's time.monotonic, moved by the test (time.time stays the real one): fixture `sync_clock`."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t
