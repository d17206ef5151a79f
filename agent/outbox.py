"""The outbox: every record is committed to SQLite before it counts as read, and leaves only when the
sync confirms delivery (by default: the hub's end-to-end ack) or the hub refuses it (a dead letter).

Identity: `seq` is an AUTOINCREMENT rowid, so it is monotonic per device and never reused, across
restarts and after deletions, as long as the file lives. Schema version lives in PRAGMA user_version;
MIGRATIONS[i] upgrades version i to i+1.

A file deleted or replaced under a running agent (or restored from an old image) would hand out seqs
the hub already holds, and the hub would file every new record as a conflict. The wire identity stays
(device_id, seq), so the hub needs no change (an epoch in the identity would change its primary key):
  - `raise_seq_floor(n)` makes the next seq greater than n. Sync calls it with the highest seq the hub
    acked, which it may keep elsewhere; a fresh file then continues after the hub's high-water mark.
  - the `meta` table keeps `acked_seq` (the highest seq the hub acked or rejected, updated in the
    delete's transaction) and `epoch` (random, written when the file is made): an epoch that changed,
    or an `acked_seq` below the hub's mark, shows the file was replaced. Both are in `stats()`.
  - `check_file()` compares the path's (st_dev, st_ino) with the file opened; a deleted, moved or
    replaced file is reported (`stats().file_problem`, one ERROR log line) for the runtime to alert on.
The file belongs to one device (`meta.device_id`, refused for another id) and one process: an
exclusive flock on `<path>.lock`, held while open, keeps a second agent out (within one process the
lock is shared: a reload opens the new unit's outbox before it closes the old one).

Disk space: deletes need WAL space too, so
  - the outbox keeps `min_free_mb` of its filesystem free (statvfs; default: 5 % of it, at most
    32 MiB): records may use what the outbox holds on disk plus what is free, less that headroom and
    less the WAL's working size; over that, the cap below drops records and inserts reuse their pages
    instead of taking the filesystem's last bytes;
  - a write that finds the disk full checkpoints the WAL (RESTART: the next transaction rewrites the
    WAL from its start, in bytes the file already owns, not ones it handed back) and tries once more;
  - `ack()`/`reject()` never raise on a full disk: their ranges wait in memory, `begin()` never hands
    those records out again, and the deletes are retried before every insert (put) and at most once
    a second by begin and stats, so the outbox recovers by itself once space returns. A process exit
    before then only means a resend, which the hub drops as a duplicate.

Cap policy (checked on open, then after puts: the size cap and the headroom every second, or after
every put once puts come near the cap; the age cap every ten minutes). A drop deletes at most CHUNK
rows per transaction and releases the lock between chunks; counts live in the `counters` table
(updated in the transaction that changes the records), so `stats()` reads a few rows whatever the
backlog (bench/outbox.py):
  1. records older than max_age_days are dropped, except ALERT records. Within the current boot, age
     is measured on the monotonic clock (a wall clock that jumps forward must not empty the outbox);
     records of earlier boots by their wall-clock stamp, except those stamped before 2020 (a Pi
     without an RTC boots in 1970: its first records must not look ancient). Records are committed in
     seq order, so the scan runs from the lowest seq and stops at the first record that is not old
     (an index on ts halves the insert rate; an app stamp a little out of order only delays a drop);
  2. while the file's used pages exceed the cap (max_mb, lowered by the headroom rule), the oldest
     records of the lowest priority present (below ALERT) are dropped;
  3. ALERT records are never dropped; if alerts alone exceed the cap, the cap is exceeded and a
     warning is logged.
Every drop is counted per priority in `counters` (dropped.<priority>), which survives restarts.

Hash chain (core/signing.py): put() gives each record `prev`, the chain hash of the record before it,
in the transaction that gives it its seq (the head lives in `meta.chain_head`). Records the cap drops
are replaced, in the same transaction, by a `tombstone` record (ALERT: never dropped) naming each dropped
run of seqs with the hash before it and the hash of its last record, so the hub's chain stays verifiable.

Fresh tail: the rows put() commits are also kept in memory, per priority, until begin() hands them out, so
begin() need not read back what was just written. They are added only once their transaction committed, and
the tail is forgotten (begin() reads the file again until it catches up) on release(), on a delete that
touches it, and past FRESH_MAX_RECORDS or FRESH_MAX_BYTES (a backlog): begin() hands out exactly what the file
holds either way (tests/test_outbox_fresh.py). The tail, the cursors and the waiting deletes have a lock of their
own, taken inside the connection's: while every priority's tail is in memory and no delete waits, begin() takes
only that one, and so never waits for a put's commit (its fsync) on the connection.

Dead letters: a record that cannot be stored (a NaN or infinite stamp, a payload that cannot be
encoded, a priority outside Priority) or that the hub refused (`reject()`) goes to `dead_letters` (the
newest DEAD_LETTERS_KEPT are kept, payload truncated) and is counted per reason; it never blocks its
neighbours. App state (`put(records, state=(key, blob))`) commits in the records' transaction.
"""

from __future__ import annotations

import bisect
import fcntl
import itertools
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar, cast

from customs_edge.core.errors import CustomsEdgeError
from customs_edge.core.jsonfast import dumps
from customs_edge.core.records import Pending, Priority, RecordIn
from customs_edge.core.signing import GENESIS, TOMBSTONE_RUNS, TOMBSTONE_TYPE, record_hash, record_hash_ts

log = logging.getLogger(__name__)

T = TypeVar("T")
Ranges = list[tuple[int, int]]

_PRIO_NAME = {int(p): p.name.lower() for p in Priority}
_PRIOS_DOWN = sorted(_PRIO_NAME, reverse=True)
_payload_of = itemgetter(6)  # of a Linked row
_row_priority, _row_payload = itemgetter(4), itemgetter(5)  # of a Row
_ALERT = int(Priority.ALERT)
CLOCKLESS_BEFORE = 1577836800.0  # 2020-01-01: an earlier stamp comes from a clock that was never set
MIB = 1024 * 1024
_SEQ_END = 2**63  # above every seq
DEAD_LETTERS_KEPT = 1000
DEAD_PAYLOAD_CHARS = 2000

MIGRATIONS: list[str] = [
    # 0 -> 1
    """
    CREATE TABLE records (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        ts       REAL    NOT NULL,
        boot_id  TEXT    NOT NULL,
        mono     REAL    NOT NULL,
        type     TEXT    NOT NULL,
        priority INTEGER NOT NULL,
        payload  TEXT    NOT NULL
    );
    CREATE INDEX records_priority_seq ON records(priority, seq);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
    # 1 -> 2: owner, epoch and hub high-water mark; app state; dead letters; pending counts
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL);
    INSERT INTO meta (key, value) VALUES ('epoch', lower(hex(randomblob(16)))), ('acked_seq', 0);
    CREATE TABLE app_state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE dead_letters (
        id       INTEGER PRIMARY KEY,
        at       REAL    NOT NULL,
        seq      INTEGER,
        type     TEXT    NOT NULL,
        priority INTEGER,
        reason   TEXT    NOT NULL,
        detail   TEXT    NOT NULL,
        payload  TEXT    NOT NULL
    );
    INSERT INTO counters (name, value)
        SELECT 'pending.' || CASE priority """ + " ".join(f"WHEN {p} THEN '{n}'" for p, n in _PRIO_NAME.items())
    + """ END, count(*) FROM records GROUP BY priority;
    """,
    # 2 -> 3: the hash chain (core/signing.py): each record's `prev`, the chain's head in meta
    f"""
    ALTER TABLE records ADD COLUMN prev TEXT;
    INSERT INTO meta (key, value) VALUES ('chain_head', '{GENESIS}');
    """,
]


class OutboxError(CustomsEdgeError):
    """An outbox that cannot be opened as asked; the message names the file and the fix."""


def boot_id() -> str:
    """The kernel's boot id (changes on every boot): with `mono` it orders records even when the
    wall clock is wrong, as on a Pi without an RTC before NTP syncs."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(uuid.uuid4())


@dataclass
class OutboxStats:
    pending: int  # records in the outbox, acked ones awaiting their delete included
    last_seq: int  # highest seq ever given out: records produced (or the floor raised to)
    oldest_ts: float | None  # stamp of the oldest pending record (the first committed)
    used_bytes: int
    dropped: dict[str, int]  # by the cap, per priority: {"dropped.event": n}
    pending_by_priority: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)  # per reason
    acked_seq: int = 0  # highest seq the hub acked or rejected
    awaiting_delete: int = 0  # acked or rejected, delete waiting for disk space
    file_problem: str | None = None  # the file was deleted or replaced under the running agent
    device_id: str | None = None
    epoch: str = ""


@dataclass(frozen=True)
class DeadLetter:
    seq: int | None  # None: refused before it had one
    type: str
    priority: int | None
    reason: str  # short and stable: the counter's name
    detail: str
    payload: str  # JSON text (or repr) cut to DEAD_PAYLOAD_CHARS
    at: float = field(default_factory=time.time)


class Outbox(Protocol):
    """What sync and the runtime need; tests/test_outbox_contract.py runs against every implementation."""

    def put(self, records: Sequence[RecordIn], state: tuple[str, bytes] | None = None) -> range: ...
    def begin(self, max_records: int) -> list[Pending]: ...
    def ack(self, ranges: Iterable[tuple[int, int]]) -> int: ...
    def reject(self, ranges: Iterable[tuple[int, int]], reason: str) -> int: ...
    def release(self) -> None: ...
    def raise_seq_floor(self, seq: int) -> None: ...
    def load_state(self, key: str) -> bytes | None: ...
    def check_file(self) -> str | None: ...
    def stats(self) -> OutboxStats: ...
    def close(self) -> None: ...


# -- shared by every implementation -----------------------------------------------------------------
Row = tuple[float, str, float, str, int, str]  # Pending without its seq: ts, boot_id, mono, type, priority, payload


def encode_records(records: Sequence[RecordIn], boot: str, mono: float) -> tuple[list[Row], list[DeadLetter]]:
    """Records as stored, and dead letters for those that cannot be: one bad record never holds up
    the others (a NaN stamp would fail NOT NULL and an inf one the wire's JSON, forever)."""
    rows: list[Row] = []
    dead: list[DeadLetter] = []
    append = rows.append
    for r in records:
        reason = "bad_ts"
        try:
            ts = r.ts if r.ts.__class__ is float else float(r.ts)
            if ts - ts:  # NaN for NaN and the infinities
                raise ValueError(f"ts {ts} is not a finite time")
            reason = "bad_priority"
            if r.priority.__class__ is Priority:
                prio = r.priority._value_
            else:
                prio = int(r.priority)
                if prio not in _PRIO_NAME:
                    raise ValueError(f"priority {prio} is not one of {sorted(_PRIO_NAME)}")
            reason = "bad_type"
            type_ = r.type
            type_.isascii() or type_.encode()  # a str that SQLite can store: no lone surrogates
            reason = "bad_payload"
            append((ts, boot, mono, type_, prio, dumps(r.payload)))
        except Exception as exc:  # this record's fault only
            dead.append(_dead_letter(None, str(r.type), None, reason, f"{type(exc).__name__}: {exc}", r.payload))
    return rows, dead


Linked = tuple[int, float, str, float, str, int, str, str]  # seq, *Row, prev: a Pending's fields, in order


def chain(head: str, first_seq: int, rows: Sequence[Row]) -> tuple[list[Linked], str]:
    """Each row with its seq (from first_seq on) and its `prev`, the chain hash before it (after the chain
    head `head`): a Pending's fields, as inserted; and the new head."""
    linked: list[Linked] = []
    append = linked.append
    seq = first_seq
    stamp: float | None = None  # the last ts formatted (the records of one reading share its float)
    text = ""
    for row in rows:
        append((seq, *row, head))
        if row[0] is not stamp:
            stamp = row[0]
            text = repr(stamp)
        head = record_hash_ts(head, seq, text, row[3], row[4], row[5])
        seq += 1
    return linked, head


def tombstones(dropped: Sequence[tuple[int, str | None, float, str, int, str]], boot: str, mono: float) -> list[Row]:
    """Tombstone rows for records about to be dropped (seq, prev, ts, type, priority, payload; in seq order):
    each run of consecutive seqs with the hash before it and the hash of its last record."""
    runs: list[tuple[int, int, str | None, str]] = []
    for seq, prev, ts, type_, prio, payload in dropped:
        h = record_hash(prev or "", seq, ts, type_, prio, payload)
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq, runs[-1][2], h)
        else:
            runs.append((seq, seq, prev, h))
    return [(time.time(), boot, mono, TOMBSTONE_TYPE, _ALERT,
             dumps({"runs": part, "count": sum(hi - lo + 1 for lo, hi, _, _ in part)}))
            for part in (runs[i:i + TOMBSTONE_RUNS] for i in range(0, len(runs), TOMBSTONE_RUNS))]


def _dead_letter(seq: int | None, type_: str, prio: int | None, reason: str, detail: str,
                 payload: object) -> DeadLetter:
    if not isinstance(payload, str):
        try:
            payload = dumps(payload)
        except Exception:
            try:
                payload = repr(payload)
            except Exception as exc:
                payload = f"<unrepresentable: {type(exc).__name__}>"
    return DeadLetter(seq, type_[:200].encode(errors="replace").decode(), prio, reason, detail[:500],
                      str(payload)[:DEAD_PAYLOAD_CHARS].encode(errors="replace").decode())


def _reason_key(reason: str) -> str:
    return (reason.strip() or "rejected")[:64]


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Inclusive ranges sorted, empty ones left out, overlapping or adjacent ones joined."""
    out: Ranges = []
    for lo, hi in sorted((int(a), int(b)) for a, b in ranges if a <= b):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def subtract_ranges(a: Ranges, b: Ranges) -> Ranges:
    """The parts of merged ranges `a` not in merged ranges `b`."""
    out: Ranges = []
    for lo, hi in a:
        for blo, bhi in b:
            if bhi < lo or blo > hi:
                continue
            if blo > lo:
                out.append((lo, blo - 1))
            lo = bhi + 1
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return out


_INSERT = "INSERT INTO records (seq, ts, boot_id, mono, type, priority, payload, prev) VALUES "
_flatten = itertools.chain.from_iterable


def insert_linked(db: sqlite3.Connection, linked: Sequence[Linked], most: int) -> None:
    """INSERT the rows, up to `most` (a power of two) per statement: one step of SQLite, and one release of
    the GIL, per statement instead of per row (executemany's), which another thread busy in Python turns into
    a wait each. The statements have a power of two of rows each, so a few texts are cached, not one per size."""
    i, n = 0, len(linked)
    while i < n:
        k = 1 << (min(most, n - i).bit_length() - 1)
        sql = _INSERT_SQL.get(k) or _INSERT_SQL.setdefault(k, _INSERT + ",".join(["(?,?,?,?,?,?,?,?)"] * k))
        db.execute(sql, list(_flatten(linked[i:i + k])))
        i += k


_INSERT_SQL: dict[int, str] = {}


# a row of begin()'s SELECT (its 8 columns, in Pending's order) as a Pending: what Pending._make does, without
# a Python call per row
_pending = cast(Callable[[tuple[object, ...]], Pending], partial(tuple.__new__, Pending))


def _covered(ranges: Ranges, seq: int) -> bool:
    i = bisect.bisect_right(ranges, (seq, _SEQ_END)) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


def _disk_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


def _used_bytes(db: sqlite3.Connection) -> int:
    page, count, free = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count", "freelist_count"))
    return int((count - free) * page)


def _read_stats(db: sqlite3.Connection) -> OutboxStats:
    """A few rows whatever the backlog: counts come from `counters`, kept in the records' transactions."""
    counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    last = db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
    oldest = db.execute("SELECT ts FROM records ORDER BY seq LIMIT 1").fetchone()
    by_prio = {n: counters.get(f"pending.{n}", 0) for n in _PRIO_NAME.values()}
    return OutboxStats(
        pending=sum(by_prio.values()), last_seq=last[0] if last else 0, oldest_ts=oldest[0] if oldest else None,
        used_bytes=_used_bytes(db), dropped={k: v for k, v in counters.items() if k.startswith("dropped.") and v},
        pending_by_priority=by_prio,
        dead_letters={k.removeprefix("dead."): v for k, v in counters.items() if k.startswith("dead.")},
        acked_seq=int(meta.get("acked_seq", 0)), device_id=meta.get("device_id"), epoch=str(meta.get("epoch", "")))


def read_stats(path: str | Path) -> OutboxStats:
    """An outbox file's stats, read-only (the `status` command, also on a live agent's file): no lock,
    no cap, no migration, and never a new file on a mistyped path."""
    p = Path(path)
    if not p.is_file():
        raise OutboxError(f"{p}: no outbox file there; check outbox.path in the unit's config")
    db = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != len(MIGRATIONS):
            why = ("not an outbox file" if version == 0 else
                   f"schema version {version} is older than this tool's ({len(MIGRATIONS)}): start the agent "
                   "once to upgrade it" if version < len(MIGRATIONS) else
                   f"schema version {version} is newer than this tool's ({len(MIGRATIONS)}): upgrade customs-edge")
            raise OutboxError(f"{p}: {why}")
        return _read_stats(db)
    except sqlite3.DatabaseError as exc:
        raise OutboxError(f"{p}: cannot read it as an outbox ({exc})") from None
    finally:
        db.close()


class _FileLock:
    """An exclusive flock on `<outbox>.lock` while the outbox is open: a second process is refused.
    Shared within one process (a reload opens the new unit's outbox before it closes the old one)."""

    _held: ClassVar[dict[str, list[int]]] = {}  # lock path -> [fd, users]
    _guard = threading.Lock()

    def __init__(self, db_path: Path) -> None:
        self.key = os.path.realpath(f"{db_path}.lock")
        with self._guard:
            if self.key in self._held:
                self._held[self.key][1] += 1
                return
            fd = os.open(self.key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 20, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutboxError(
                    f"{db_path} is in use by another process (pid {pid}, lock {self.key}): two units cannot share"
                    " one outbox; give each its own outbox.path, or stop the other agent first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._held[self.key] = [fd, 1]

    def release(self) -> None:
        with self._guard:
            held = self._held.get(self.key)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del self._held[self.key]
                os.close(held[0])  # closing the last descriptor releases the flock


class SqliteOutbox:
    AGE_CHECK_S = 600.0
    CHUNK = 500  # rows a drop reads or deletes per transaction; the lock is released between chunks
    YIELD_S = 0.0005  # pause between chunks
    RETRY_S = 1.0  # wait before retrying deletes that found the disk full
    # the fresh tail (see begin()): records committed and not yet handed out, kept in memory up to these bounds
    FRESH_MAX_RECORDS = 20_000
    FRESH_MAX_BYTES = 8 * MIB  # of payload text

    def __init__(self, path: str | Path, *, device_id: str | None = None, synchronous: str = "FULL",
                 max_mb: float = 256, max_age_days: float = 30, min_free_mb: float | None = None,
                 boot: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_mb * MIB)
        self.max_age_s = max_age_days * 86400
        fs = os.statvfs(self.path.parent)
        self.min_free_bytes = (int(min_free_mb * MIB) if min_free_mb is not None
                               else min(32 * MIB, fs.f_blocks * fs.f_frsize // 20))
        self.boot_id = boot or boot_id()
        self._sync_full = synchronous == "FULL"
        self._lock = threading.Lock()  # the connection: every statement, every transaction
        # the fresh tail, the cursor and the waiting deletes (taken inside _lock where both are held): begin()
        # hands out the fresh tail under this lock alone, never waiting for a put's commit (its fsync)
        self._fresh_lock = threading.Lock()
        self._closed = False
        self._file_problem: str | None = None
        self._cursor = dict.fromkeys(_PRIO_NAME, 0)
        # per priority, while _fresh_ok: every record of that priority in the file with a seq above the cursor,
        # in seq order (the rows as inserted), so begin() need not read back what put() just wrote
        self._fresh: dict[int, list[Linked]] = {p: [] for p in _PRIO_NAME}
        self._fresh_ok = dict.fromkeys(_PRIO_NAME, False)
        self._fresh_count = self._fresh_bytes = 0
        self._staged: list[tuple[int, list[Linked], int]] = []  # rows inserted by the open transaction
        self._waiting: list[tuple[Ranges, str | None, int]] = []  # (ranges, reject reason, records) to delete
        self._waiting_ranges: Ranges = []
        self._retry_at = 0.0
        self._next_cap_check = self._next_age_check = self._warn_at = 0.0
        self._unchecked = self._margin = 0  # bytes put since the last cap check; room below the cap then
        with ExitStack() as undo:  # a refused open leaves nothing held
            self._file_lock = _FileLock(self.path)
            undo.callback(self._file_lock.release)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            undo.callback(self._db.close)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # the file opened, whatever its path
            undo.callback(os.close, self._fd)
            st = os.fstat(self._fd)
            self._ident = (st.st_dev, st.st_ino)
            self._db.execute("PRAGMA journal_mode=WAL")
            # rows per INSERT statement: 8 variables each, within the library's limit (999 before SQLite 3.32)
            self._insert_rows = 1 << (min(256, self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 8)
                                      .bit_length() - 1)
            self._db.execute(f"PRAGMA synchronous={'FULL' if self._sync_full else 'NORMAL'}")
            self._migrate()
            self.device_id = self._claim(device_id)
            self.enforce_cap()
            undo.pop_all()

    # -- schema, ownership ------------------------------------------------------------------------
    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise OutboxError(f"{self.path}: schema version {version} is newer than this agent knows"
                              f" ({len(MIGRATIONS)}): upgrade customs-edge")
        for v in range(version, len(MIGRATIONS)):
            self._db.executescript("BEGIN;" + MIGRATIONS[v] + f";PRAGMA user_version={v + 1};COMMIT;")
            log.info("outbox migrated", extra={"path": str(self.path), "version": v + 1})

    def _claim(self, device_id: str | None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key='device_id'").fetchone()
        if row is None:
            if device_id is not None:
                with self._tx():
                    self._db.execute("INSERT INTO meta (key, value) VALUES ('device_id', ?)", (device_id,))
            return device_id
        if device_id is not None and row[0] != device_id:
            raise OutboxError(f"{self.path} belongs to device {row[0]!r}, not {device_id!r}: two units cannot"
                              " share one outbox; give this unit its own outbox.path")
        return str(row[0])

    def _tx(self) -> _Tx:
        return _Tx(self._db)

    def _write(self, fn: Callable[[], T], *, relaxed: bool = False) -> T:
        """fn() in one transaction (the caller holds the lock). On a full disk: checkpoint, so that the
        next transaction rewrites the WAL from its start instead of growing it, and try once more.

        relaxed: commit without an fsync of its own (synchronous=NORMAL for this transaction; the next
        put's FULL commit syncs the WAL), for deletes: one lost to a power cut only means a resend,
        which the hub drops as a duplicate. Puts are never relaxed."""
        relax = relaxed and self._sync_full
        if relax:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            try:
                self._staged = []
                with self._tx():
                    out = fn()
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    raise
                try:
                    self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                except sqlite3.OperationalError:
                    pass
                self._staged = []
                with self._tx():
                    out = fn()
            self._add_fresh()  # committed: now, and only now, begin() may hand these rows out
            return out
        finally:
            self._staged = []
            if relax:
                self._db.execute("PRAGMA synchronous=FULL")

    def _add_fresh(self) -> None:
        if not self._staged:
            return
        with self._fresh_lock:
            for prio, rows, nbytes in self._staged:
                if self._fresh_ok[prio]:
                    self._fresh[prio] += rows
                    self._fresh_count += len(rows)
                    self._fresh_bytes += nbytes
            if self._fresh_count > self.FRESH_MAX_RECORDS or self._fresh_bytes > self.FRESH_MAX_BYTES:
                self._drop_fresh(_PRIO_NAME)  # a backlog: begin() reads it from the file, as at start

    def _forget_fresh(self, lo: int, hi: int) -> None:
        """Forget the fresh tail of the priorities holding a seq in lo..hi (rows deleted or dropped)."""
        with self._fresh_lock:
            self._drop_fresh(self._fresh_hit(lo, hi))

    def _drop_fresh(self, prios: Iterable[int]) -> None:
        """Forget the fresh tail of these priorities: begin() reads them from the file again until it
        catches up (always safe: the file holds every committed record). The caller holds _fresh_lock."""
        for prio in prios:
            rows = self._fresh[prio]
            self._fresh_count -= len(rows)
            self._fresh_bytes -= sum(map(len, map(_payload_of, rows)))
            self._fresh[prio], self._fresh_ok[prio] = [], False

    def _fresh_hit(self, lo: int, hi: int) -> list[int]:
        """Priorities whose fresh tail holds a seq in lo..hi."""
        return [p for p, rows in self._fresh.items() if rows and rows[0][0] <= hi and rows[-1][0] >= lo]

    def _bump(self, changes: dict[str, int]) -> None:
        self._db.executemany("INSERT INTO counters (name, value) VALUES (?, ?)"
                             " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                             [kv for kv in changes.items() if kv[1]])

    def _bury(self, dead: list[DeadLetter]) -> None:
        """Dead letters into their table and counters (the caller's transaction); the newest kept."""
        db = self._db
        db.executemany("INSERT INTO dead_letters (at, seq, type, priority, reason, detail, payload)"
                       " VALUES (?,?,?,?,?,?,?)",
                       [(d.at, d.seq, d.type, d.priority, d.reason, d.detail, d.payload) for d in dead])
        db.execute("DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?", (DEAD_LETTERS_KEPT,))
        self._bump(Counter(f"dead.{d.reason}" for d in dead))
        log.warning("records moved to dead letters", extra={
            "records": len(dead), "reasons": ",".join(sorted({d.reason for d in dead})), "first": dead[0].detail})

    def _insert(self, rows: Sequence[Row]) -> int:
        """Insert rows with the next seqs and their chain links (the caller's transaction); the last seq."""
        db = self._db
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
        first = (row[0] if row else 0) + 1
        (head,) = db.execute("SELECT value FROM meta WHERE key='chain_head'").fetchone()
        linked, head = chain(head, first, rows)
        insert_linked(db, linked, self._insert_rows)
        db.execute("UPDATE meta SET value=? WHERE key='chain_head'", (head,))
        counts = Counter(map(_row_priority, rows))
        self._bump({f"pending.{_PRIO_NAME[p]}": n for p, n in counts.items()})
        for p in counts:  # handed to the fresh tail once the transaction commits (_write)
            mine = linked if len(counts) == 1 else [r for r in linked if r[5] == p]
            self._staged.append((p, mine, sum(map(len, map(_payload_of, mine)))))
        return first + len(rows) - 1

    def _drop(self, seqs: Sequence[int]) -> Counter[int]:
        """Delete these records (the caller's transaction), a tombstone in their place; dropped per priority."""
        db = self._db
        gone = [r for i in range(0, len(seqs), 500) for r in db.execute(
            "SELECT seq, prev, ts, type, priority, payload FROM records WHERE seq IN"
            f" ({','.join('?' * len(seqs[i:i + 500]))}) ORDER BY seq", seqs[i:i + 500])]
        db.executemany("DELETE FROM records WHERE seq = ?", [(r[0],) for r in gone])
        if gone:
            self._forget_fresh(gone[0][0], gone[-1][0])
        counts = Counter(r[4] for r in gone)
        for p, n in counts.items():
            self._bump({f"pending.{_PRIO_NAME[p]}": -n, f"dropped.{_PRIO_NAME[p]}": n})
        if gone:
            self._insert(tombstones(gone, self.boot_id, time.monotonic()))
        return counts

    # -- Outbox -----------------------------------------------------------------------------------
    def put(self, records: Sequence[RecordIn], state: tuple[str, bytes] | None = None) -> range:
        """Commit records (and the app's state blob, if given) in one transaction; returns the seqs of
        the records committed (contiguous): one that cannot be stored becomes a dead letter instead.
        Committed means durable (FULL). Raises only if nothing could be committed (a full disk, say)."""
        rows, dead = encode_records(records, self.boot_id, time.monotonic())
        if not rows and not dead and state is None:
            return range(0)

        def insert() -> int:
            db = self._db
            last = self._insert(rows)
            if dead:
                self._bury(dead)
            if state is not None:
                db.execute("INSERT INTO app_state (key, value) VALUES (?, ?)"
                           " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (state[0], bytes(state[1])))
            return last

        for attempt in (1, 2):
            with self._lock:
                self._retry_waiting(now=True)  # deletes first: they free the pages inserts reuse
                try:
                    last = self._write(insert)
                    break
                except sqlite3.OperationalError as exc:
                    if attempt == 2 or not _disk_full(exc):
                        raise
            self.enforce_cap(age=False)  # a full disk lowers the cap: make room, then once more
        self._unchecked += sum(map(len, map(_row_payload, rows))) + 64 * len(rows)
        now = time.monotonic()
        if now >= self._next_cap_check or self._unchecked * 2 > self._margin:  # every second, or near the cap
            try:  # committed: whatever happens now must not make the caller put these records again
                self.check_file()
                self.enforce_cap(age=now >= self._next_age_check)
            except Exception:
                log.exception("outbox cap check failed; retried in a second")
        return range(last - len(rows) + 1, last + 1) if rows else range(0)

    def begin(self, max_records: int) -> list[Pending]:
        """The next records not yet handed out since the last release(), highest priority first; never
        one acked or rejected whose delete is still waiting."""
        with self._fresh_lock:  # the usual case: every priority's tail in memory, no delete waiting
            if not self._waiting and all(self._fresh_ok.values()):
                return self._hand_out(max_records)
        with self._lock:
            self._retry_waiting()
            with self._fresh_lock:
                return self._hand_out(max_records)

    def _hand_out(self, max_records: int) -> list[Pending]:
        """begin()'s work; the caller holds _fresh_lock, and _lock unless every priority is fresh (no read)."""
        out: list[Pending] = []
        for prio in _PRIOS_DOWN:
            while (want := max_records - len(out)) > 0:
                if self._fresh_ok[prio]:  # what put() committed since the last begin: no read back
                    rows = self._fresh[prio]
                    if len(rows) <= want:
                        self._fresh[prio] = []
                    else:
                        rows, self._fresh[prio] = rows[:want], rows[want:]
                    self._fresh_count -= len(rows)
                    self._fresh_bytes = self._fresh_bytes - sum(map(len, map(_payload_of, rows))) \
                        if self._fresh_count else 0
                else:
                    rows = self._db.execute(
                        "SELECT seq, ts, boot_id, mono, type, priority, payload, prev FROM records"
                        " WHERE priority=? AND seq>? ORDER BY seq LIMIT ?", (prio, self._cursor[prio], want + 1),
                    ).fetchall()
                    if len(rows) > want:
                        del rows[want:]
                    else:  # the file has no more of this priority: from now on, the fresh tail has them
                        self._fresh_ok[prio] = True
                if not rows:
                    break
                self._cursor[prio] = rows[-1][0]
                wait = self._waiting_ranges
                out.extend(map(_pending, [r for r in rows if not _covered(wait, r[0])] if wait else rows))
                if len(rows) < want:
                    break
        return out

    def ack(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Delete confirmed records; returns how many. Idempotent: acking an absent seq is a no-op.
        Never raises on a full disk: the delete waits in memory (see the module's docstring)."""
        return self._settle(ranges, None)

    def reject(self, ranges: Iterable[tuple[int, int]], reason: str) -> int:
        """Records the hub refused: out of the outbox into dead letters, counted under `reason`."""
        return self._settle(ranges, _reason_key(reason))

    def _settle(self, ranges: Iterable[tuple[int, int]], reason: str | None) -> int:
        with self._lock:
            todo = subtract_ranges(merge_ranges(ranges), self._waiting_ranges)  # waiting already: counted
            if not todo:
                return 0
            if not self._waiting or time.monotonic() >= self._retry_at:
                try:
                    self._flush_waiting()
                    return self._write(partial(self._delete, todo, reason), relaxed=True)
                except sqlite3.OperationalError as exc:
                    if not _disk_full(exc):
                        raise
                    self._retry_at = time.monotonic() + self.RETRY_S
            n = sum(self._db.execute("SELECT count(*) FROM records WHERE seq BETWEEN ? AND ?", r).fetchone()[0]
                    for r in todo)
            if not self._waiting:
                log.warning("disk full: acked records stay until their delete succeeds; they are not sent again",
                            extra={"path": str(self.path), "records": n})
            with self._fresh_lock:  # seen by begin()'s fast path before it hands out anything more
                self._waiting.append((todo, reason, n))
                self._waiting_ranges = merge_ranges(self._waiting_ranges + todo)
            return n

    def _delete(self, ranges: Ranges, reason: str | None) -> int:
        db = self._db
        counts: Counter[int] = Counter()
        dead: list[DeadLetter] = []
        for lo, hi in ranges:
            if reason is None:  # deleted and counted per priority in one pass (the index on priority, seq)
                for prio in _PRIO_NAME:
                    n = db.execute("DELETE FROM records WHERE priority=? AND seq BETWEEN ? AND ?",
                                   (prio, lo, hi)).rowcount
                    if n > 0:
                        counts[prio] += n
            else:
                for seq, type_, prio, payload in db.execute(
                        "SELECT seq, type, priority, payload FROM records WHERE seq BETWEEN ? AND ?", (lo, hi)):
                    counts[prio] += 1
                    dead.append(_dead_letter(seq, type_, prio, reason, "rejected by the hub", payload))
        if counts:
            if reason is not None:
                db.executemany("DELETE FROM records WHERE seq BETWEEN ? AND ?", ranges)
            for lo, hi in ranges:  # records not handed out yet (not the usual ack): read from the file again
                self._forget_fresh(lo, hi)
            self._bump({f"pending.{_PRIO_NAME[p]}": -n for p, n in counts.items()})
        if dead:
            self._bury(dead)
        db.execute("UPDATE meta SET value = max(value, ?) WHERE key = 'acked_seq'", (ranges[-1][1],))
        return sum(counts.values())

    def _flush_waiting(self) -> None:
        while self._waiting:
            ranges, reason, _ = self._waiting[0]
            self._write(partial(self._delete, ranges, reason), relaxed=True)
            with self._fresh_lock:
                self._waiting.pop(0)
                if self._waiting:
                    continue
                self._waiting_ranges = []
            log.info("waiting deletes done: disk space is back", extra={"path": str(self.path)})

    def _retry_waiting(self, now: bool = False) -> None:
        """Waiting deletes, at most once per RETRY_S unless `now`."""
        if self._waiting and (now or time.monotonic() >= self._retry_at):
            try:
                self._flush_waiting()
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    raise
                self._retry_at = time.monotonic() + self.RETRY_S

    def load_state(self, key: str) -> bytes | None:
        """The app state last committed under `key` by put(), or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM app_state WHERE key=?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def release(self) -> None:
        """Everything handed out and not acked is pending again (after a reconnect or ack timeout)."""
        with self._lock, self._fresh_lock:
            self._cursor = dict.fromkeys(self._cursor, 0)
            self._drop_fresh(_PRIO_NAME)

    def raise_seq_floor(self, seq: int) -> None:
        """The next seq handed out is greater than `seq` (the highest the hub holds for this device), so a
        new or replaced file never reuses one. Lower floors change nothing."""
        seq = int(seq)

        def floor() -> None:
            db = self._db
            db.execute("INSERT INTO sqlite_sequence (name, seq) SELECT 'records', 0"
                       " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name='records')")
            db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name='records' AND seq < ?", (seq, seq))
            db.execute("UPDATE meta SET value = max(value, ?) WHERE key = 'acked_seq'", (seq,))

        with self._lock:
            self._write(floor)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest dead letters, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT seq, type, priority, reason, detail, payload, at FROM dead_letters"
                                    " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [DeadLetter(*r) for r in rows]

    def check_file(self) -> str | None:
        """None while the path still names the file this outbox opened; otherwise what happened to it."""
        try:
            st = os.stat(self.path)
            ident = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            ident = None
        problem = None
        if ident is None:
            problem = (f"outbox {self.path} was deleted or moved under the running agent: its pending records"
                       " exist only until the agent exits; let it drain (pending 0) before restarting it")
        elif ident != self._ident:
            problem = (f"outbox {self.path} was replaced by another file under the running agent (inode"
                       f" {self._ident[1]} -> {ident[1]}): this agent still writes to the old one, whose"
                       " pending records are lost when it exits; let it drain before restarting it")
        if problem and problem != self._file_problem:
            log.error("outbox file lost", extra={"problem": problem})
        self._file_problem = problem
        return problem

    def stats(self) -> OutboxStats:
        problem = self.check_file()
        with self._lock:
            self._retry_waiting()
            st = _read_stats(self._db)
            st.awaiting_delete = sum(n for _, _, n in self._waiting)
        st.file_problem = problem
        return st

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._retry_waiting(now=True)
            finally:
                self._db.close()
                os.close(self._fd)
                self._file_lock.release()

    # -- cap --------------------------------------------------------------------------------------
    def _cap_bytes(self) -> int:
        """max_bytes, lowered while the filesystem runs short: the records may use what the outbox holds
        on disk plus what is free, less the headroom and less what the WAL will take (it grows to about
        wal_autocheckpoint pages plus a transaction, and keeps that size)."""
        fs = os.statvfs(self.path.parent)
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            wal = 0
        wal_max = max(wal, (self._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] + 256) * page)
        share = fs.f_bavail * fs.f_frsize + os.fstat(self._fd).st_size + wal - self.min_free_bytes
        return int(min(self.max_bytes, share - wal_max))

    def enforce_cap(self, age: bool = True) -> dict[int, int]:
        """Apply the size cap and headroom (and the age cap, unless age=False) now; returns records
        dropped per priority."""
        now = time.monotonic()
        self._next_cap_check, self._unchecked = now + 1.0, 0
        dropped: Counter[int] = Counter()
        try:
            with self._lock:
                self._retry_waiting()
            if age:
                self._next_age_check = now + self.AGE_CHECK_S
                self._drop_old(dropped)
            while True:
                with self._lock:
                    used, cap = _used_bytes(self._db), self._cap_bytes()
                    self._margin = cap - used
                    if used <= cap:
                        break
                    prio = self._db.execute("SELECT min(priority) FROM records WHERE priority < ?",
                                            (_ALERT,)).fetchone()[0]
                    if prio is None:
                        if now >= self._warn_at:
                            self._warn_at = now + 60
                            log.warning("outbox over its cap with alerts only; alerts are never dropped",
                                        extra={"used_bytes": used, "cap_bytes": cap})
                        break
                    dropped[prio] += self._write(partial(self._drop_lowest, prio))
                time.sleep(self.YIELD_S)
        except sqlite3.OperationalError as exc:
            if not _disk_full(exc):
                raise
            log.warning("outbox cap could not drop records: disk full", extra={"path": str(self.path)})
        if dropped:
            log.warning("outbox cap dropped records", extra={
                "dropped": {_PRIO_NAME[p]: n for p, n in dropped.items()}, "free_bytes_wanted": self.min_free_bytes})
        return dict(dropped)

    def _drop_lowest(self, prio: int) -> int:
        seqs = [s for (s,) in self._db.execute("SELECT seq FROM records WHERE priority=? ORDER BY seq LIMIT ?",
                                               (prio, self.CHUNK))]
        return self._drop(seqs)[prio]

    def _drop_old(self, dropped: Counter[int]) -> None:
        """Age = monotonic time for records of this boot (a wall clock that jumps forward must not empty
        the outbox), wall-clock time for older boots, never for records stamped before 2020. Scanned from
        the lowest seq, CHUNK rows per transaction, up to the first record that is not old."""
        mono_cut, ts_cut = time.monotonic() - self.max_age_s, time.time() - self.max_age_s
        after, young = 0, False
        while not young:
            if after:
                time.sleep(self.YIELD_S)  # a lock is not fair: let a waiting put or begin have it
            with self._lock:
                rows = self._db.execute("SELECT seq, boot_id, mono, ts, priority FROM records WHERE seq > ?"
                                        " ORDER BY seq LIMIT ?", (after, self.CHUNK)).fetchall()
                old: list[int] = []
                for seq, boot, mono, ts, prio in rows:
                    if prio == _ALERT or (boot != self.boot_id and ts < CLOCKLESS_BEFORE):
                        continue
                    if (mono >= mono_cut) if boot == self.boot_id else (ts >= ts_cut):
                        young = True
                        break
                    old.append(seq)
                if old:
                    dropped.update(self._write(partial(self._drop, old)))
                if len(rows) < self.CHUNK:
                    return
                after = rows[-1][0]


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (also when COMMIT itself fails: a full disk)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self.db.execute("COMMIT")
        finally:
            if self.db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL can)
                self.db.execute("ROLLBACK")


class MemoryOutbox:
    """The Outbox contract in memory: no file, no cap, nothing survives the process. For tests of sync
    and the runtime without SQLite; tests/test_outbox_contract.py holds it to the same contract."""

    def __init__(self, *, device_id: str | None = None, boot: str | None = None) -> None:
        self.device_id = device_id
        self.boot_id = boot or boot_id()
        self._lock = threading.Lock()
        self._records: dict[int, dict[int, Pending]] = {p: {} for p in _PRIO_NAME}  # priority -> seq -> record
        self._cursor = dict.fromkeys(_PRIO_NAME, 0)
        self._last_seq = self._acked_seq = 0
        self._state: dict[str, bytes] = {}
        self._dead: list[DeadLetter] = []
        self._counters: Counter[str] = Counter()
        self._epoch = uuid.uuid4().hex
        self._head = GENESIS

    def put(self, records: Sequence[RecordIn], state: tuple[str, bytes] | None = None) -> range:
        rows, dead = encode_records(records, self.boot_id, time.monotonic())
        with self._lock:
            first = self._last_seq + 1
            linked, self._head = chain(self._head, first, rows)
            for fields in linked:
                self._records[fields[5]][fields[0]] = Pending._make(fields)
            self._last_seq += len(linked)
            self._bury(dead)
            if state is not None:
                self._state[state[0]] = bytes(state[1])
            return range(first, self._last_seq + 1)

    def _bury(self, dead: list[DeadLetter]) -> None:
        self._dead = (self._dead + dead)[-DEAD_LETTERS_KEPT:]
        self._counters.update(d.reason for d in dead)

    def begin(self, max_records: int) -> list[Pending]:
        out: list[Pending] = []
        with self._lock:
            for prio in sorted(self._records, reverse=True):
                got = [r for s, r in self._records[prio].items() if s > self._cursor[prio]][:max_records - len(out)]
                if got:
                    self._cursor[prio] = got[-1].seq
                    out.extend(got)
        return out

    def ack(self, ranges: Iterable[tuple[int, int]]) -> int:
        return len(self._take(ranges))

    def reject(self, ranges: Iterable[tuple[int, int]], reason: str) -> int:
        key = _reason_key(reason)
        gone = self._take(ranges)
        with self._lock:
            self._bury([_dead_letter(r.seq, r.type, r.priority, key, "rejected by the hub", r.payload) for r in gone])
        return len(gone)

    def _take(self, ranges: Iterable[tuple[int, int]]) -> list[Pending]:
        merged = merge_ranges(ranges)
        with self._lock:
            gone = [recs.pop(s) for recs in self._records.values() for s in list(recs) if _covered(merged, s)]
            if merged:
                self._acked_seq = max(self._acked_seq, merged[-1][1])
        return gone

    def release(self) -> None:
        with self._lock:
            self._cursor = dict.fromkeys(self._cursor, 0)

    def raise_seq_floor(self, seq: int) -> None:
        with self._lock:
            self._last_seq = max(self._last_seq, int(seq))
            self._acked_seq = max(self._acked_seq, int(seq))

    def load_state(self, key: str) -> bytes | None:
        return self._state.get(key)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self._dead[::-1][:limit]

    def check_file(self) -> str | None:
        return None

    def stats(self) -> OutboxStats:
        with self._lock:
            by_prio = {_PRIO_NAME[p]: len(recs) for p, recs in self._records.items()}
            firsts = [next(iter(recs.values())) for recs in self._records.values() if recs]
            return OutboxStats(
                pending=sum(by_prio.values()), last_seq=self._last_seq,
                oldest_ts=min(firsts, key=lambda r: r.seq).ts if firsts else None,
                used_bytes=sum(len(r.payload) for recs in self._records.values() for r in recs.values()),
                dropped={}, pending_by_priority=by_prio, dead_letters=dict(self._counters),
                acked_seq=self._acked_seq, device_id=self.device_id, epoch=self._epoch)

    def close(self) -> None:
        pass
