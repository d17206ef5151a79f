"""The hub's answer to `customs-edge check`'s round trip: a HubPing on `{prefix}/{device}/hub/ping` (the unit's
own topic: its certificate may publish there) gets a HubPong on `{prefix}/{device}/hub/pong` carrying the hub's
clock. Bounded: a ping over MAX_PING_BYTES or not a valid HubPing is refused; each device gets at most
BURST answers at once and RATE_PER_S after that (a flood costs the hub nothing but counting). Refusals are
counted per cause and logged at the 1st, 2nd, 4th, 8th, ... of each."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from pydantic import ValidationError

from customs_edge.core.wire import HUB_PING, HUB_PONG, MAX_PING_BYTES, HubPing, HubPong, topic

log = logging.getLogger(__name__)

RATE_PER_S = 1.0
BURST = 5.0


class Pinged:
    def __init__(self, prefix: str, clock: Callable[[], float] = time.time) -> None:
        self.prefix = prefix
        self.clock = clock  # the hub's wall clock (a test may skew it)
        self.answered = 0
        self.refused: Counter[str] = Counter()
        self._tokens: dict[str, tuple[float, float]] = {}  # device -> (tokens, monotonic time)

    def filter(self) -> str:
        """A plain subscription (not the records' shared one): every connected hub answers, and the checker
        takes the first pong. A shared group may hand a QoS 0 ping to a member that is offline, and drop it."""
        return f"{self.prefix}/+/{HUB_PING}"

    def matches(self, t: str) -> bool:
        return t.startswith(f"{self.prefix}/") and t.endswith(f"/{HUB_PING}")

    def answer(self, t: str, payload: bytes) -> list[tuple[str, bytes]]:
        """The pong to publish (topic, payload), or nothing when the ping is refused."""
        device = t[len(self.prefix) + 1 : -len(HUB_PING) - 1]
        if not device or "/" in device:
            return self._refuse("bad_topic", t)
        if len(payload) > MAX_PING_BYTES:
            return self._refuse("too_large", t)
        try:
            ping = HubPing.model_validate_json(payload)
        except ValidationError:
            return self._refuse("malformed", t)
        now = time.monotonic()
        tokens, last = self._tokens.get(device, (BURST, now))
        tokens = min(BURST, tokens + (now - last) * RATE_PER_S)
        if tokens < 1.0:
            self._tokens[device] = (tokens, now)
            return self._refuse("rate", t)
        self._tokens[device] = (tokens - 1.0, now)
        if len(self._tokens) > 100_000:  # one entry per device that pinged: bounded
            self._tokens.clear()
        self.answered += 1
        pong = HubPong(id=ping.id, ping_ts=ping.ts, ts=self.clock())
        return [(topic(self.prefix, device, HUB_PONG), pong.model_dump_json().encode())]

    def _refuse(self, kind: str, t: str) -> list[tuple[str, bytes]]:
        self.refused[kind] += 1
        n = self.refused[kind]
        if n & (n - 1) == 0:
            log.warning("refused a hub ping; not answered", extra={"topic": t[:200], "kind": kind, "count": n})
        return []
