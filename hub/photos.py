"""The hub's evidence photo store: content-addressed files, acked only once their bytes are on disk.

A photo arrives as one MQTT message on `{prefix}/{device_id}/photos` (agent/photos.py): a JSON header line
`{"v":1,"device_id","sha256","bytes","ts"}`, LF, the JPEG bytes. The hub checks the header (the device id
is its topic's, the size is what the header says, at most `max_bytes`) and the bytes' sha256 against the
header's; stores them at `{db}.photos/ab/<sha256>.jpg` (temporary file, fsync, rename, fsync of the
directory); then answers on `.../photos/ack` with `{"v":1,"sha256","stored":true,"bytes"}`. A photo it
already holds is not written again and is acked at once. Bytes that do not match their hash are answered
`stored:false` with the reason (the device sends them again), and counted. A message without a usable
header is counted and not answered. Records name photos by sha256: `customs-edge hub photos` ...
(`PhotoArchive.path(sha)`) finds the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from customs_edge.core.files import write_durable
from customs_edge.core.inbound import Refusals

log = logging.getLogger(__name__)

MAX_PHOTO_BYTES = 16 << 20
HEADER_MAX = 1024
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class PhotoOut(NamedTuple):
    topic: str
    payload: bytes


class PhotoArchive:
    def __init__(self, root: Path, max_bytes: int = MAX_PHOTO_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.refusals = Refusals(log)  # a flood of bad photo messages: one log line a minute per cause
        self.counts: Counter[str] = Counter()  # stored, duplicates, bad_hash, malformed, ...
        self.bytes_stored = 0
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.jpg"

    def has(self, sha: str) -> bool:
        return SHA_RE.match(sha) is not None and self.path(sha).is_file()

    def handle(self, t: str, payload: bytes) -> PhotoOut | None:
        """Store one photo message; the ack to publish, or None for a message with no usable header."""
        device_id = t.split("/")[-2]
        nl = payload.find(b"\n", 0, HEADER_MAX)
        try:
            if nl < 0:
                raise ValueError("no header line")
            head = json.loads(payload[:nl])
            sha, size = str(head["sha256"]), int(head["bytes"])
            if head.get("device_id") != device_id:
                raise ValueError(f"device_id {head.get('device_id')!r} on {device_id!r}'s topic")
            if not SHA_RE.match(sha):
                raise ValueError("sha256 must be 64 lower-case hex digits")
        except (ValueError, KeyError, TypeError) as exc:
            self.counts["malformed"] += 1
            self.refusals.refuse("photo_malformed", "photo message refused; not acked", topic=t, reason=str(exc))
            return None
        ack_topic = t + "/ack"
        data = payload[nl + 1:]
        error = None
        if len(data) != size:
            error = f"{len(data)} bytes, the header says {size}"
        elif size > self.max_bytes:
            error = f"{size} bytes, at most {self.max_bytes}"
        elif hashlib.sha256(data).hexdigest() != sha:
            error = "the bytes do not hash to their sha256"
        if error is not None:
            self.counts["bad_hash" if error.startswith("the bytes") else "refused"] += 1
            self.refusals.refuse("photo_not_stored", "photo not stored", device=device_id, sha256=sha, reason=error)
            return PhotoOut(ack_topic, _ack(sha, False, size, error))
        final = self.path(sha)
        if final.is_file():
            self.counts["duplicates"] += 1
        else:
            final.parent.mkdir(exist_ok=True)
            write_durable(final, data, self.root / f"{sha}.{os.getpid()}.tmp")
            self.counts["stored"] += 1
            self.bytes_stored += size
        return PhotoOut(ack_topic, _ack(sha, True, size))


def _ack(sha: str, stored: bool, size: int, error: str | None = None) -> bytes:
    doc: dict[str, object] = {"v": 1, "sha256": sha, "stored": stored, "bytes": size}
    if error:
        doc["error"] = error
    return json.dumps(doc, separators=(",", ":")).encode()
