"""What arrives from the broker, bounded before it is parsed; what is refused, counted and logged sparingly.

Agents and hubs both read topics anyone with broker access may write to (on the loopback listener, or
with a leaked certificate). Every inbound message goes through the same three steps:
  1. its size is checked on the raw bytes, before any parsing (`too_large`): a 100 MB command or batch
     never becomes a 100 MB string, let alone a tree of objects;
  2. its topic must be one the receiver subscribed to for that purpose (`unexpected_topic`);
  3. its schema (pydantic, strict) is validated by the receiver.
A refusal is counted per cause (`Refusals.counts`, shown in status) and logged at most once per cause
every `every_s` seconds, the line carrying the count so far and how many refusals were not logged since
the last line: a flood of 10,000 bad messages costs a handful of log lines, never a full journal.
`TokenBucket` paces what a sender may ask for (commands per device).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

SHOWN_CHARS = 200  # of a topic or a reason in a log line: a 64 KiB topic is the sender's, not the journal's


class Refusals:
    """Refused inbound messages: a counter per cause, and one log line per cause per `every_s` seconds."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.every_s = every_s
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._next_log: dict[str, float] = {}  # causes are a fixed vocabulary: this stays small
        self._unlogged: Counter[str] = Counter()

    def refuse(self, cause: str, event: str, **extra: Any) -> None:
        """Count a refusal of `cause`; log `event` with `extra` unless this cause was logged within every_s."""
        self.counts[cause] += 1
        now = self.clock()
        if now < self._next_log.get(cause, float("-inf")):
            self._unlogged[cause] += 1
            return
        self._next_log[cause] = now + self.every_s
        fields = {k: (v[:SHOWN_CHARS] if isinstance(v, str) else v) for k, v in extra.items()}
        self.log.warning(event, extra={"cause": cause, **fields, "refused": self.counts[cause],
                                       "not_logged": self._unlogged.pop(cause, 0)})

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


def too_large(payload: bytes | str, limit: int) -> str | None:
    """Why `payload` is refused unparsed (over `limit` bytes), or None."""
    n = len(payload)
    return f"{n} bytes, at most {limit}" if n > limit else None


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up; `take()` spends one or says no."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate_per_s, burst, clock
        self.tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self._at) * self.rate)
        self._at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_s(self) -> float:
        """Seconds until the next token (0 when one is there)."""
        return max(0.0, (1.0 - self.tokens) / self.rate) if self.rate > 0 else float("inf")
