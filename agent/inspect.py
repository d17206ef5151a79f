"""Remote inspection: on an officer's `inspect` command, a unit sends snapshots of what its camera or thermal
array sees, for a bounded time, and nothing otherwise.

Snapshots are JPEG (a thermal frame false-coloured between its own min and max, and downscaled to at most
MAX_WIDTH) published with QoS 0 on `{prefix}/{device_id}/snapshot`: a live view, not evidence (a lost one is
replaced by the next; nothing is queued for an offline link). The core thread hands the newest image-like
reading over by reference while a session runs; a thread of its own encodes and publishes at the asked rate,
so the unit's pipeline never waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from customs_edge.core.readings import Image, Reading, ThermalFrame

log = logging.getLogger(__name__)

MAX_SECONDS = 120.0  # a session's longest life: asked for again to see more
DEFAULT_SECONDS = 30.0
RATES_HZ = (0.2, 5.0)
DEFAULT_RATE_HZ = 2.0
MAX_WIDTH = 640
JPEG_QUALITY = 80


def encode(reading: Reading) -> bytes:
    """A JPEG of an image or a thermal frame."""
    import cv2

    if isinstance(reading, ThermalFrame):
        px = reading.pixels
        lo, hi = float(px.min()), float(px.max())
        grey = np.zeros(px.shape, np.uint8) if hi <= lo else ((px - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        scale = max(1, min(16, MAX_WIDTH // max(1, px.shape[1])))
        img = cv2.applyColorMap(cv2.resize(grey, (px.shape[1] * scale, px.shape[0] * scale),
                                           interpolation=cv2.INTER_NEAREST), cv2.COLORMAP_INFERNO)
    elif isinstance(reading, Image):
        img = reading.pixels
        if img.shape[1] > MAX_WIDTH:
            img = cv2.resize(img, (MAX_WIDTH, round(img.shape[0] * MAX_WIDTH / img.shape[1])),
                             interpolation=cv2.INTER_AREA)
    else:
        raise TypeError(f"no image in a {type(reading).__name__}")
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf)


def is_image(reading: object) -> bool:
    return isinstance(reading, (ThermalFrame, Image))


class Inspector:
    """One inspection session at a time; a new `inspect` replaces the running one's role, rate and end."""

    def __init__(self, publish: Callable[[bytes], None]) -> None:
        self.publish = publish  # raises on a link that is down: that snapshot is skipped
        self.active = False  # read by the core thread before it hands a reading over
        self.sent = 0
        self.skipped = 0
        self._role: str | None = None
        self._until = 0.0
        self._period = 1.0 / DEFAULT_RATE_HZ
        self._latest: tuple[str, Reading, int] | None = None
        self._offered = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, args: dict[str, Any], roles: Sequence[str]) -> dict[str, Any]:
        """The `inspect` command: {"seconds": 30, "rate_hz": 2, "role": optional}; `roles`: the unit's roles
        whose drivers produce images or thermal frames."""
        if not roles:
            raise ValueError("inspect: this unit has no camera or thermal array")
        unknown = set(args) - {"seconds", "rate_hz", "role"}
        if unknown:
            raise ValueError(f"inspect: unknown argument(s) {', '.join(sorted(unknown))}: seconds, rate_hz, role")
        seconds = _number(args.get("seconds", DEFAULT_SECONDS), "seconds", 1.0, MAX_SECONDS)
        rate = _number(args.get("rate_hz", DEFAULT_RATE_HZ), "rate_hz", *RATES_HZ)
        role = args.get("role", roles[0])
        if role not in roles:
            raise ValueError(f"inspect: role {role!r} has no images here; one of {', '.join(roles)}")
        with self._cond:
            self._role, self._period = str(role), 1.0 / rate
            self._until = time.monotonic() + seconds
            self.active = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="inspect", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        log.info("remote inspection", extra={"role": role, "seconds": seconds, "rate_hz": rate})
        return {"role": role, "seconds": seconds, "rate_hz": rate, "until": time.time() + seconds}

    def offer(self, role: str, reading: Reading) -> None:
        """From the core thread: the newest reading of a role (kept by reference, encoded later)."""
        if role == self._role:
            with self._cond:
                self._offered += 1
                self._latest = (role, reading, self._offered)
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._until = 0.0
            self.active = False
            self._cond.notify_all()

    def _run(self) -> None:
        sent_no = 0
        next_at = time.monotonic()
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if now >= self._until:
                        self.active, self._latest, self._role = False, None, None
                        return
                    if self._latest is not None and self._latest[2] != sent_no and now >= next_at:
                        _, reading, sent_no = self._latest
                        break
                    self._cond.wait(min(self._until, next_at if now < next_at else self._until) - now + 0.001)
            next_at = time.monotonic() + self._period
            try:
                self.publish(encode(reading))
                self.sent += 1
            except Exception as exc:  # a link down or a frame that will not encode: the next one may
                self.skipped += 1
                log.debug("snapshot skipped", extra={"error": str(exc)})


def _number(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"inspect: {name} must be a number from {lo:g} to {hi:g}, not {value!r}")
    return float(value)
