"""Risk lists: the codes a handheld checks every scan against, offline, in O(1).

The hub publishes a list, retained, on `{prefix}/fleet/risk-list` (`customs-edge fleet risk-list publish
FILE`): a gzip-compressed JSON Lines document. Its first line is the header, every other line one entry:

    {"risk_list": "hainan-resale", "version": 7, "issued": "2026-03-14T08:00:00Z"}
    {"gtin": "09506000134352", "serial": "A1B2", "tag": "resold-duty-free", "action": "hold"}
    {"gtin": "09506000134352", "batch": "L2301", "tag": "recalled-batch", "action": "inspect"}
    {"gtin": "09506000134352", "tag": "restricted-product", "action": "notify"}
    {"code": "HN-DF-2026-000123", "tag": "duty-free-trace", "action": "hold"}
    {"pattern": "^https://trace\\.example\\.cn/fake/", "tag": "counterfeit-site", "action": "hold"}

An entry has exactly one key kind: GTIN (14 digits) + serial, GTIN + batch, GTIN alone, a plain code (the
scanned text as it is: a traceability code, a URL), or a pattern (a regular expression searched in the
scanned text). `tag` names the risk, `action` what the officer does (hold, inspect, notify).

Matching (`RiskMatcher`): every exact key is hashed (64 bits) into an open-addressing table held in two
numpy arrays (keys uint64, value uint32: an index into the few distinct (tag, action, kind) triples), at
most half full, probed linearly: a lookup is a handful of array reads whatever the list's size. 10^6
entries cost 2^21 slots x 12 bytes = 24 MiB. The table keeps hashes, not the keys: two different codes
with the same 64-bit hash would be taken for one another (probability ~ n / 2^64 per scan). Patterns
are compiled once, when the list is loaded, and are bounded in number and length.

Validation on receipt (`parse`): a payload larger than `max_bytes` compressed or `max_expanded` expanded,
a header without name and integer version, a line that is not a JSON object, an entry with no or two key
kinds, a GTIN without 14 digits, a pattern that does not compile: the whole list is refused with the line
and the reason (the unit keeps the list it had), never half-applied. A version not newer than the one held
is ignored (a retained copy seen again at every reconnect).

Storage (`RiskListStore`): the accepted payload is written to `{outbox}.risk-list.gz` (temporary file,
fsync, rename) before it is used, and loaded from there at start: a unit that restarts in a hold without
network still checks against the latest list it received.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import threading
import time
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_BYTES = 16 << 20  # compressed: one MQTT message within the shipped broker's max_packet_size (16 MiB + 64 KiB)
MAX_EXPANDED = 512 << 20  # the JSON Lines text
MAX_ENTRIES = 4_000_000
MAX_PATTERNS = 256
MAX_PATTERN_CHARS = 300
MAX_FIELD_CHARS = 512
KINDS = ("gtin_serial", "gtin_batch", "gtin", "code", "pattern")
_U64 = (1 << 64) - 1


class RiskListError(ValueError):
    """A risk list refused whole: the message names the line and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class RiskHit:
    kind: str  # one of KINDS
    key: str  # what matched: "09506000134352/21:A1B2", the code, or the pattern
    tag: str
    action: str


def key_of(kind: str, gtin: str | None = None, second: str | None = None, code: str | None = None) -> str:
    """The exact key of an entry or a scan: one string per kind, so kinds never collide."""
    if kind == "gtin_serial":
        return f"S\x1f{gtin}\x1f{second}"
    if kind == "gtin_batch":
        return f"B\x1f{gtin}\x1f{second}"
    if kind == "gtin":
        return f"G\x1f{gtin}"
    return f"C\x1f{code}"


def _hash(key: str) -> int:
    h = hash(key) & _U64  # salted per process: the table is built and queried in the same process
    return h or 1  # 0 marks an empty slot


class RiskMatcher:
    """An immutable, loaded risk list: `match(...)` in O(1) for exact keys plus one pass over the patterns."""

    def __init__(self, name: str, version: int, issued: str | None, hashes: np.ndarray, values: np.ndarray,
                 triples: list[tuple[str, str, str]], patterns: list[tuple[re.Pattern[str], int]],
                 entries: int, bytes_in: int) -> None:
        self.name, self.version, self.issued = name, version, issued
        self.triples = triples
        self.patterns = patterns
        self.entries = entries
        self.bytes_in = bytes_in
        self.loaded_at = time.time()
        n = len(hashes)
        size = 1024
        while size < 2 * n:
            size <<= 1
        self.mask = size - 1
        self.keys = np.zeros(size, dtype=np.uint64)
        self.values = np.zeros(size, dtype=np.uint32)
        self.max_probe = _build(self.keys, self.values, hashes, values, self.mask)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)

    def get(self, key: str) -> int | None:
        """The triple index of an exact key, or None."""
        h = _hash(key)
        keys, mask = self.keys, self.mask
        i = h & mask
        for _ in range(self.max_probe + 1):
            k = int(keys[i])
            if k == h:
                return int(self.values[i])
            if k == 0:
                return None
            i = (i + 1) & mask
        return None

    def match(self, *, gtin: str | None, serial: str | None, batch: str | None, text: str) -> list[RiskHit]:
        """Every entry a scan hits: GTIN+serial, GTIN+batch, GTIN, the text as a code, then the patterns."""
        probes: list[tuple[str, str, str]] = []
        if gtin:
            if serial:
                probes.append(("gtin_serial", key_of("gtin_serial", gtin, serial), f"{gtin}/21:{serial}"))
            if batch:
                probes.append(("gtin_batch", key_of("gtin_batch", gtin, batch), f"{gtin}/10:{batch}"))
            probes.append(("gtin", key_of("gtin", gtin), gtin))
        if text:
            probes.append(("code", key_of("code", code=text), text))
        hits = []
        for kind, key, shown in probes:
            v = self.get(key)
            if v is not None and self.triples[v][2] == kind:
                tag, action, _ = self.triples[v]
                hits.append(RiskHit(kind, shown, tag, action))
        for rx, v in self.patterns:
            if text and rx.search(text):
                tag, action, _ = self.triples[v]
                hits.append(RiskHit("pattern", rx.pattern, tag, action))
        return hits

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "issued": self.issued, "entries": self.entries,
                "patterns": len(self.patterns), "table_bytes": self.nbytes}


def _build(keys: np.ndarray, values: np.ndarray, hashes: np.ndarray, vals: np.ndarray, mask: int) -> int:
    """Linear-probing insert of every (hash, value), vectorised in rounds: in each round every unplaced key
    tries its next slot; of several wanting one empty slot the first wins, the others probe on. A key ends
    at slot h+k only when slots h..h+k-1 were taken, so a lookup from h finds it before an empty slot."""
    if not len(hashes):
        return 0
    hashes, first = np.unique(hashes, return_index=True)  # a key listed twice: its first entry counts
    vals = vals[first]
    home = (hashes & np.uint64(mask)).astype(np.int64)
    probe = np.zeros(len(hashes), dtype=np.int64)
    todo = np.arange(len(hashes))
    rounds = 0
    while todo.size:
        slots = (home[todo] + probe[todo]) & mask
        free = keys[slots] == 0
        cand, cslots = todo[free], slots[free]
        _, win = np.unique(cslots, return_index=True)  # one winner per empty slot
        keys[cslots[win]] = hashes[cand[win]]
        values[cslots[win]] = vals[cand[win]]
        placed = np.zeros(len(hashes), dtype=bool)
        placed[cand[win]] = True
        todo = todo[~placed[todo]]
        probe[todo] += 1
        rounds += 1
    return int(probe.max()) if len(probe) else 0


ENTRY_KEYS = frozenset(("gtin", "serial", "batch", "code", "pattern", "tag", "action"))
PARSE_BATCH = 20_000  # lines decoded by one json.loads call


def _decode_batch(batch: list[bytes], first: int) -> list[Any]:
    """The JSON objects of a run of lines, decoded in one call; on failure the bad line is named."""
    try:
        return list(json.loads(b"[" + b",".join(batch) + b"]"))
    except ValueError:
        for i, raw in enumerate(batch):
            try:
                json.loads(raw)
            except ValueError as exc:
                raise RiskListError(f"line {first + i}: not JSON ({exc})") from None
        raise RiskListError(f"lines {first}-{first + len(batch) - 1}: not JSON") from None


def _entries(batch: list[bytes], first: int, n: int, max_entries: int, hashes: array[int], vals: array[int],
             triples: dict[tuple[str, str, str], int], patterns: list[tuple[re.Pattern[str], int]]) -> int:
    """Check and add a run of entry lines (blank lines already left out, so numbers may run ahead of them);
    returns the entry count so far."""
    if not batch:
        return n
    for i, obj in enumerate(_decode_batch(batch, first)):
        line = first + i
        if type(obj) is not dict:
            raise RiskListError(f"line {line}: an entry is a JSON object")
        n += 1
        if n > max_entries:
            raise RiskListError(f"more than {max_entries} entries: split the list")
        for k, v in obj.items():
            if type(v) is not str or not v or len(v) > MAX_FIELD_CHARS:
                raise RiskListError(f"line {line}: {k!r} must be a non-empty string of at most {MAX_FIELD_CHARS} "
                                    f"characters (got {v!r:.60})")
        if not obj.keys() <= ENTRY_KEYS:
            raise RiskListError(f"line {line}: unknown keys {sorted(obj.keys() - ENTRY_KEYS)}; an entry has "
                                f"{', '.join(sorted(ENTRY_KEYS))}")
        get = obj.get
        gtin, serial, batch_, code, pattern, tag = (get("gtin"), get("serial"), get("batch"), get("code"),
                                                    get("pattern"), get("tag"))
        if tag is None:
            raise RiskListError(f"line {line}: every entry needs a 'tag' naming the risk")
        if ((gtin is not None) + (code is not None) + (pattern is not None)) != 1 or (serial and batch_) \
                or ((serial or batch_) and not gtin):
            raise RiskListError(f"line {line}: an entry has exactly one of gtin (+ serial or batch), code, pattern")
        if gtin is not None and (len(gtin) != 14 or not gtin.isdigit()):
            raise RiskListError(f"line {line}: gtin must be 14 digits (pad a GTIN-13 with a leading 0): {gtin!r}")
        kind = "pattern" if pattern else "code" if code else "gtin_serial" if serial else \
            "gtin_batch" if batch_ else "gtin"
        v = triples.setdefault((tag, get("action", "inspect"), kind), len(triples))
        if pattern is not None:
            if len(patterns) >= MAX_PATTERNS or len(pattern) > MAX_PATTERN_CHARS:
                raise RiskListError(f"line {line}: at most {MAX_PATTERNS} patterns of {MAX_PATTERN_CHARS} "
                                    "characters each: list exact codes instead")
            try:
                patterns.append((re.compile(pattern), v))
            except re.error as exc:
                raise RiskListError(f"line {line}: pattern does not compile: {exc}") from None
            continue
        hashes.append(_hash(key_of(kind, gtin, serial or batch_, code)))
        vals.append(v)
    return n


def _lines(payload: bytes, max_expanded: int) -> Iterable[bytes]:
    """The document's lines, gzip or plain, refusing more than max_expanded bytes once expanded."""
    seen = 0
    raw: io.BufferedIOBase = gzip.GzipFile(fileobj=io.BytesIO(payload)) if payload[:2] == b"\x1f\x8b" \
        else io.BytesIO(payload)
    try:
        for line in raw:
            seen += len(line)
            if seen > max_expanded:
                raise RiskListError(f"more than {max_expanded} bytes once expanded: split the list")
            yield line
    except (OSError, EOFError, zlib.error) as exc:
        raise RiskListError(f"not a gzip or text document: {exc}") from None


def parse(payload: bytes, *, max_bytes: int = MAX_BYTES, max_expanded: int = MAX_EXPANDED,
          max_entries: int = MAX_ENTRIES) -> RiskMatcher:
    """A validated, loaded list; RiskListError naming the line and the fix otherwise."""
    if not payload:
        raise RiskListError("empty payload (a cleared retained message)")
    if len(payload) > max_bytes:
        raise RiskListError(f"{len(payload)} bytes, at most {max_bytes}: split the list or raise risk_list_max_mb")
    lines = iter(_lines(payload, max_expanded))
    try:
        head = json.loads(next(lines))
    except StopIteration:
        raise RiskListError("no header line") from None
    except ValueError as exc:
        raise RiskListError(f"line 1: not JSON ({exc})") from None
    if not isinstance(head, dict) or not isinstance(head.get("risk_list"), str) or not head["risk_list"] \
            or type(head.get("version")) is not int or head["version"] < 1:
        raise RiskListError('line 1: the header must be {"risk_list": NAME, "version": N >= 1, ...}')
    issued = head.get("issued")
    hashes, vals = array("Q"), array("I")
    triples: dict[tuple[str, str, str], int] = {}
    patterns: list[tuple[re.Pattern[str], int]] = []
    n = 0
    batch: list[bytes] = []
    first = 2  # the line number of batch[0]
    lineno = 1
    for raw in lines:
        lineno += 1
        if raw.strip():
            batch.append(raw)
        elif not batch:
            first = lineno + 1
        if len(batch) >= PARSE_BATCH:
            n = _entries(batch, first, n, max_entries, hashes, vals, triples, patterns)
            batch, first = [], lineno + 1
    n = _entries(batch, first, n, max_entries, hashes, vals, triples, patterns)
    return RiskMatcher(head["risk_list"], head["version"], issued if isinstance(issued, str) else None,
                       np.frombuffer(hashes, dtype=np.uint64), np.frombuffer(vals, dtype=np.uint32),
                       list(triples), patterns, n, len(payload))


def encode(path: Path) -> bytes:
    """A list file (JSON Lines, gzip or plain) as the payload to publish: gzip, checked by parse() first."""
    data = path.read_bytes()
    parse(data)
    return data if data[:2] == b"\x1f\x8b" else gzip.compress(data, 6)


class RiskListStore:
    """The latest accepted list: on disk beside the outbox, loaded at start, replaced on a newer version.
    `offer()` is called from the sync thread, `current` read from the core thread (one reference swap)."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.current: RiskMatcher | None = None
        self.refused = 0
        self.ignored = 0  # not newer than the one held
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._lock_pending = threading.Lock()
        self._pending: bytes | None = None
        self._worker: threading.Thread | None = None
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.last_error = f"cannot read {self.path}: {exc}"
            log.warning("risk list file unreadable; none in force until the hub sends one",
                        extra={"path": str(self.path), "error": str(exc)})
            return
        try:
            self.current = parse(data, max_bytes=self.max_bytes)
        except RiskListError as exc:
            self.last_error = f"{self.path}: {exc}"
            log.warning("stored risk list refused; none in force until the hub sends one",
                        extra={"path": str(self.path), "error": str(exc)})

    def offer_async(self, payload: bytes) -> None:
        """offer() in a thread of its own: a 10^6-entry list takes seconds to load, and the caller (the sync
        loop) must keep answering acks meanwhile. A newer payload arriving meanwhile waits for it."""
        with self._lock_pending:
            self._pending = payload
            if self._worker is not None and self._worker.is_alive():
                return
            self._worker = threading.Thread(target=self._work, name="risk-list", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock_pending:
                payload, self._pending = self._pending, None
                if payload is None:
                    self._worker = None
                    return
            try:
                self.offer(payload)
            except Exception:  # a full disk: the list in force stays, the next retained copy retries
                self.refused += 1
                log.exception("risk list could not be stored; the one in force stays")

    def wait_idle(self, timeout: float) -> bool:
        """True once no list is being loaded (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock_pending:
                if self._worker is None and self._pending is None:
                    return True
            time.sleep(0.01)
        return False

    def offer(self, payload: bytes) -> str:
        """A list received from the hub: 'applied', 'ignored' (not newer) or 'refused: ...' (counted)."""
        with self._lock:
            try:
                new = parse(payload, max_bytes=self.max_bytes)
            except RiskListError as exc:
                self.refused += 1
                self.last_error = str(exc)
                log.warning("risk list refused; the one in force stays", extra={"error": str(exc)})
                return f"refused: {exc}"
            cur = self.current
            if cur is not None and (new.name, new.version) <= (cur.name, cur.version) and new.name == cur.name:
                self.ignored += 1
                return "ignored"
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            self.current = new
            log.info("risk list applied", extra={"risk_list": new.name, "version": new.version,
                                                 "entries": new.entries})
            return "applied"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def risk_list_topic(prefix: str) -> str:
    """Where the hub publishes the fleet's risk list, retained."""
    return f"{prefix}/fleet/risk-list"


class RiskListReceiver:
    """The sync's sideline for risk lists (see agent/sync.py Sideline): subscribes to the retained topic, so
    a list published while the unit was offline arrives at its next connect; loading runs in its own thread."""

    def __init__(self, store: RiskListStore, prefix: str) -> None:
        self.store = store
        self.t_list = risk_list_topic(prefix)

    def topics(self) -> list[str]:
        return [self.t_list]

    def on_connected(self) -> None:
        pass

    def on_message(self, msg: Any) -> bool:
        if msg.topic != self.t_list:
            return False
        if msg.payload:  # an empty retained message clears the broker's copy: the list in force stays
            self.store.offer_async(bytes(msg.payload))
        return True

    def step(self, link: Any, records_idle: bool) -> None:
        pass
