"""Evidence photos: kept on the device beside the outbox, content-addressed, delivered behind the records.

Store (`PhotoStore`): `{outbox}.photos/ab/<sha256>.jpg`, written to a temporary file, fsynced and renamed
before the record that names it is committed (an orphan photo after a power cut is still delivered; a
record never names a photo that is not on disk). Its own cap (`max_mb`): a photo that would pass it is not
kept, the record says so (`photo_refused: "cap"`) and the refusal is counted; stored evidence is never
deleted to make room. A photo leaves the device only when the hub said it stored those bytes under that
hash.

Delivery (`PhotoSender`, a sync sideline run by the sync thread): one MQTT message per photo on
`{prefix}/{device_id}/photos` (QoS 1): a JSON header line `{"v":1,"device_id","sha256","bytes","ts"}`,
LF, then the JPEG bytes. The hub (hub/photos.py) checks the hash, stores the file, fsyncs, and answers
on `{prefix}/{device_id}/photos/ack` `{"v":1,"sha256","stored":true}` (or `stored:false` and an error).
Only that answer deletes the photo here; no answer within `ack_timeout_s` (doubling per attempt up to
`max_resend_s`) sends it again; the hub keeps a photo once, by its hash. Photos are sent only while the
record outbox is drained and nothing is in flight: alerts, then records, then photos. One message per
photo rather than chunks: with several hubs on a shared subscription, chunks of one photo would be
spread over hubs and never complete at any (docs/handheld.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from customs_edge.core.files import write_durable
from customs_edge.core.inbound import Refusals, too_large
from customs_edge.core.mqtt import Link, Message, NotConnected
from customs_edge.core.wire import topic

log = logging.getLogger(__name__)

HEADER_MAX = 1024


@dataclass
class PhotoStats:
    stored: int = 0  # photos written to the store since start
    refused_cap: int = 0  # photos not kept: the store's cap
    delivered: int = 0  # deleted after the hub's ack
    sent: int = 0  # messages published (resends included)
    resent: int = 0
    hub_refused: int = 0  # the hub answered stored:false (resent later)
    corrupt: int = 0  # files whose bytes no longer match their name: moved aside, never sent
    pending: int = 0
    pending_bytes: int = 0


def encode_photo(device_id: str, sha: str, data: bytes, ts: float) -> bytes:
    head = json.dumps({"v": 1, "device_id": device_id, "sha256": sha, "bytes": len(data), "ts": ts},
                      separators=(",", ":")).encode()
    return head + b"\n" + data


class PhotoStore:
    def __init__(self, root: Path, max_mb: float) -> None:
        self.root = root
        self.cap = int(max_mb * (1 << 20))
        self.stats = PhotoStats()
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, int] = OrderedDict()  # sha -> bytes, oldest first
        root.mkdir(parents=True, exist_ok=True)
        found = []
        for p in root.glob("??/*.jpg"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime, p.stem, st.st_size))
        for _, sha, size in sorted(found):
            self._pending[sha] = size
        for tmp in root.glob("*.tmp"):  # a write cut by a power cut: its record was never committed
            tmp.unlink(missing_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.jpg"

    @property
    def used(self) -> int:
        return sum(self._pending.values())

    def put(self, data: bytes) -> str | None:
        """Keep `data`; its sha256, or None when the cap refuses it (counted). Durable on return."""
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            if sha in self._pending:
                return sha  # the same bytes again: one copy
            if self.used + len(data) > self.cap:
                self.stats.refused_cap += 1
                return None
        final = self.path(sha)
        final.parent.mkdir(exist_ok=True)
        write_durable(final, data, self.root / f"{sha}.tmp")
        with self._lock:
            self._pending[sha] = len(data)
            self.stats.stored += 1
        return sha

    def pending(self, limit: int = 16) -> list[str]:
        with self._lock:
            return [sha for sha, _ in zip(self._pending, range(limit), strict=False)]

    def read(self, sha: str) -> bytes | None:
        """The photo's bytes if they still hash to its name; a file that does not is moved to `corrupt/`."""
        try:
            data = self.path(sha).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._pending.pop(sha, None)
            return None
        if hashlib.sha256(data).hexdigest() != sha:
            bad = self.root / "corrupt"
            bad.mkdir(exist_ok=True)
            shutil.move(str(self.path(sha)), bad / f"{sha}.jpg")
            with self._lock:
                self._pending.pop(sha, None)
                self.stats.corrupt += 1
            log.error("evidence photo damaged on disk: moved aside, not sent", extra={"sha256": sha})
            return None
        return data

    def remove(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)
        with self._lock:
            if self._pending.pop(sha, None) is not None:
                self.stats.delivered += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self.stats.pending, self.stats.pending_bytes = len(self._pending), self.used
            return asdict(self.stats)


class PhotoSender:
    """The sync's sideline for photos (see agent/sync.py Sideline)."""

    def __init__(self, store: PhotoStore, device_id: str, prefix: str, *, window: int = 2,
                 ack_timeout_s: float = 10.0, max_resend_s: float = 300.0) -> None:
        self.store, self.device_id = store, device_id
        self.t_photos = topic(prefix, device_id, "photos")
        self.t_ack = self.t_photos + "/ack"
        self.window, self.ack_timeout_s, self.max_resend_s = window, ack_timeout_s, max_resend_s
        self._inflight: dict[str, tuple[float, int]] = {}  # sha -> (sent_at, attempt)
        self._attempts: dict[str, int] = {}
        self._acked: list[str] = []
        self.refusals = Refusals(log)  # photo acks refused: counted, one log line a minute per cause

    def topics(self) -> list[str]:
        return [self.t_ack]

    def on_connected(self) -> None:
        self._inflight.clear()  # unanswered: sent again

    def on_message(self, msg: Message) -> bool:
        if msg.topic != self.t_ack:
            return False
        if why := too_large(msg.payload, HEADER_MAX):  # an ack is ~150 bytes: never parsed when larger
            self.refusals.refuse("photo_ack_too_large", "oversized photo ack ignored unread", reason=why)
            return True
        try:
            ack = json.loads(msg.payload)
            sha, stored = str(ack["sha256"]), ack.get("stored") is True
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            self.refusals.refuse("photo_ack_malformed", "bad photo ack ignored", bytes=len(msg.payload))
            return True
        was_sent = self._inflight.pop(sha, None) is not None
        if stored:  # the hub holds bytes with this hash: true whichever send (or session) it answers
            self.store.remove(sha)
            self._attempts.pop(sha, None)
        elif was_sent:
            self.store.stats.hub_refused += 1
            log.warning("the hub did not store a photo; it is sent again later",
                        extra={"sha256": sha, "error": str(ack.get("error"))[:200]})
        return True

    def step(self, link: Link, records_idle: bool) -> None:
        now = time.monotonic()
        for sha, (sent_at, attempt) in list(self._inflight.items()):
            if now - sent_at > min(self.ack_timeout_s * 2 ** min(attempt, 20), self.max_resend_s):
                del self._inflight[sha]  # sent again below, once the records are through
        if not records_idle:
            return
        for sha in self.store.pending(self.window + len(self._inflight)):
            if len(self._inflight) >= self.window:
                return
            if sha in self._inflight:
                continue
            data = self.store.read(sha)
            if data is None:
                continue
            attempt = self._attempts.get(sha, 0)
            try:
                link.publish(self.t_photos, encode_photo(self.device_id, sha, data, time.time()), qos=1)
            except NotConnected:
                return
            self._inflight[sha] = (time.monotonic(), attempt)
            self._attempts[sha] = attempt + 1
            self.store.stats.sent += 1
            self.store.stats.resent += attempt > 0
