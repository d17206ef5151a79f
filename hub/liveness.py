"""A hub worker's liveness for the units: "alive and storing", so a unit whose batch waits behind a backlog burst does
not take a busy hub for a dead one and resend (agent/sync.py).

Each worker publishes a HubAlive (core/wire.py: its client id, its clock, the batches it stored since it started, the
bytes it read and has not stored yet) on `{prefix}/fleet/hub-alive`:
  - at most once every `alive_interval_s` (at least MIN_INTERVAL_S), whatever the load, and only when it stored
    something since its last message: an idle or stuck worker says nothing (a unit then resends on its timer);
  - QoS 0: a lost one is replaced by the next; nothing is queued for an offline unit, nothing acked;
  - retained, one topic for the fleet: a unit that (re)connects gets the latest at once and takes it as the baseline
    that the next live one is compared with (a retained copy is never evidence by itself: it may be a dead hub's);
  - never in the way of the store: called from the hub's loop, it costs a clock read until a message is due, and a
    link that is down (NotConnected) or a publish that fails skips that message, counted.
Bytes at a unit, per worker per interval while the hub stores: ~133 a message (payload ~98 with a 25-character client
id, topic 31, MQTT header 4), plus TCP/IP (~52) and TLS: at 5 s, ~96 kB an hour of MQTT, ~133 kB with TCP/IP headers,
per busy worker. A unit with `sync.hub_liveness: false` subscribes to none and receives none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from customs_edge.core.mqtt import Link, NotConnected
from customs_edge.core.wire import HubAlive, hub_alive_topic

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 2.0  # the period's floor, whatever the config (HubConfig validates alive_interval_s too)


class Liveness:
    def __init__(self, prefix: str, hub: str, interval_s: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.topic = hub_alive_topic(prefix)
        self.hub = hub
        self.interval_s = max(interval_s, MIN_INTERVAL_S)
        self.clock = clock  # the period's (a test moves it)
        self.wall = wall  # the message's ts
        self.sent = 0
        self.skipped = 0  # due, but the link was down or the publish failed
        self._next = 0.0
        self._stored = 0  # in the last message (or at start: a message says the worker stored since then)

    def tick(self, link: Link, stored: int, pending_bytes: int) -> bool:
        """Publish a HubAlive if one is due and the worker stored something since the last; True if published."""
        now = self.clock()
        if now < self._next or stored <= self._stored:
            return False
        self._next = now + self.interval_s  # due or not sent, the next chance is a period later: never more often
        if not link.connected:
            self.skipped += 1
            return False
        try:
            msg = HubAlive(hub=self.hub, ts=round(self.wall(), 3), stored=stored, pending=max(pending_bytes, 0))
            link.publish(self.topic, msg.model_dump_json().encode(), qos=0, retain=True)
        except NotConnected:
            self.skipped += 1
            return False
        except Exception as exc:  # a hint to the units: never worth the store path
            self.skipped += 1
            if self.skipped & (self.skipped - 1) == 0:
                log.warning("hub liveness not published", extra={"error": repr(exc), "skipped": self.skipped})
            return False
        self._stored = stored
        self.sent += 1
        return True
