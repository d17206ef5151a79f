"""Failed logins counted per user name from one client address, and per client address, over a sliding
window. Past either limit a login is refused before its password is checked (no scrypt: guessing gets no
faster and burns no CPU) until the oldest failure in the window is old enough. The name is counted per
address so that a guesser elsewhere does not lock an officer out of their own workstation. The address is the
client's (behind a `--trusted-proxy`, the one it forwards for: proxies.py). Kept in memory: a restart forgets."""

from __future__ import annotations

import threading
import time
from collections import deque

PER_NAME = 5  # failures for one user name from one address in the window
PER_ADDR = 30  # failures from one client address in the window, whatever the names
WINDOW_S = 900.0
MAX_KEYS = 10000  # names and addresses tracked; the stalest go first past it


class Throttle:
    def __init__(self, per_name: int = PER_NAME, per_addr: int = PER_ADDR, window_s: float = WINDOW_S) -> None:
        self.limits = {"name": per_name, "addr": per_addr}
        self.window_s = window_s
        self._fails: dict[tuple[str, str], deque[float]] = {}
        self._told: set[tuple[str, str]] = set()  # keys whose refusal is already in the audit trail
        self._lock = threading.Lock()

    def wait_s(self, name: str, addr: str) -> tuple[float, bool]:
        """Seconds until a login for `name` from `addr` is heard again (0: now), and whether this refusal is
        the first of its spell (the one worth a line in the audit trail: the others would only fill it)."""
        now = time.monotonic()
        out, first = 0.0, False
        with self._lock:
            for key in (("name", f"{name}\0{addr}"), ("addr", addr)):
                q = self._recent(key, now)
                if q is not None and len(q) >= self.limits[key[0]]:
                    out = max(out, q[0] + self.window_s - now)
                    if key not in self._told:
                        self._told.add(key)
                        first = True
        return out, first

    def failed(self, name: str, addr: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (("name", f"{name}\0{addr}"), ("addr", addr)):
                q = self._recent(key, now) or self._fails.setdefault(key, deque(maxlen=self.limits[key[0]]))
                q.append(now)
            if len(self._fails) > MAX_KEYS:
                for key in [k for k in self._fails if self._recent(k, now) is None]:
                    self._fails.pop(key, None)
                while len(self._fails) > MAX_KEYS:
                    self._told.discard(next(iter(self._fails)))
                    self._fails.pop(next(iter(self._fails)))

    def succeeded(self, name: str, addr: str) -> None:
        with self._lock:
            self._fails.pop(("name", f"{name}\0{addr}"), None)
            self._told.discard(("name", f"{name}\0{addr}"))

    def _recent(self, key: tuple[str, str], now: float) -> deque[float] | None:
        q = self._fails.get(key)
        while q and q[0] < now - self.window_s:
            q.popleft()
        if q is not None and not q:
            del self._fails[key]
            self._told.discard(key)
            return None
        return q
