"""The outbox: every record is committed to SQLite before it counts as read, and leaves only when the
sync confirms delivery (by default: the hub's end-to-end ack).

Identity: `seq` is an AUTOINCREMENT rowid, so it is monotonic per device and never reused, across
restarts and after deletions. Schema version lives in PRAGMA user_version; MIGRATIONS[i] upgrades
version i to i+1.

Cap policy (the size cap is checked at most once a second, the age cap, a table scan, at most every
ten minutes; both on open):
  1. records older than max_age_days are dropped, except ALERT records. Within the current boot, age
     is measured on the monotonic clock (a wall clock that jumps forward must not empty the outbox);
     records of earlier boots by their wall-clock stamp, except those stamped before 2020 (a Pi
     without an RTC boots in 1970: its first records must not look ancient);
  2. while the file's used pages exceed max_mb, the oldest records of the lowest priority present
     (below ALERT) are dropped, 500 at a time;
  3. ALERT records are never dropped; if alerts alone exceed the cap, the cap is exceeded and a
     warning is logged.
Every drop is counted per priority in the `counters` table, which survives restarts.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from customs_edge.core.jsonfast import dumps
from customs_edge.core.records import Pending, Priority, RecordIn

log = logging.getLogger(__name__)

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
    # 1 -> 2: app state (App.snapshot()), written in the same transaction as the records it belongs to
    """
    CREATE TABLE app_state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    """,
]


def boot_id() -> str:
    """The kernel's boot id (changes on every boot): with `mono` it orders records even when the
    wall clock is wrong, as on a Pi without an RTC before NTP syncs."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return str(uuid.uuid4())


@dataclass
class OutboxStats:
    pending: int
    last_seq: int  # highest seq ever given out: records produced
    oldest_ts: float | None
    used_bytes: int
    dropped: dict[str, int]


class Outbox(Protocol):
    """What sync and the runtime need; tests/test_outbox_contract.py runs against every implementation."""

    def put(self, records: Sequence[RecordIn], state: tuple[str, bytes] | None = None) -> range: ...
    def load_state(self, key: str) -> bytes | None: ...
    def begin(self, max_records: int) -> list[Pending]: ...
    def ack(self, ranges: Iterable[tuple[int, int]]) -> int: ...
    def release(self) -> None: ...
    def stats(self) -> OutboxStats: ...
    def close(self) -> None: ...


class SqliteOutbox:
    def __init__(self, path: str | Path, *, synchronous: str = "FULL", max_mb: float = 256,
                 max_age_days: float = 30, boot: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.max_age_s = max_age_days * 86400
        self.boot_id = boot or boot_id()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._sync_full = synchronous == "FULL"
        self._db.execute(f"PRAGMA synchronous={'FULL' if self._sync_full else 'NORMAL'}")
        self._migrate()
        self._cursor = {int(p): 0 for p in Priority}
        self._next_cap_check = self._next_age_check = 0.0
        self.enforce_cap()

    # -- schema -----------------------------------------------------------------------------------
    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this agent knows")
        for v in range(version, len(MIGRATIONS)):
            self._db.executescript("BEGIN;" + MIGRATIONS[v] + f";PRAGMA user_version={v + 1};COMMIT;")
            log.info("outbox migrated", extra={"path": str(self.path), "version": v + 1})

    def _tx(self) -> _Tx:
        return _Tx(self._db)

    # -- Outbox -----------------------------------------------------------------------------------
    def put(self, records: Sequence[RecordIn], state: tuple[str, bytes] | None = None) -> range:
        """Commit records, and the app state `(key, blob)` they leave behind, in one transaction; returns
        their seqs. Committed means durable (FULL)."""
        if not records and state is None:
            return range(0)
        mono = time.monotonic()
        rows = [(r.ts, self.boot_id, mono, r.type, int(r.priority), dumps(r.payload)) for r in records]
        with self._lock, self._tx():
            self._db.executemany(
                "INSERT INTO records (ts, boot_id, mono, type, priority, payload) VALUES (?,?,?,?,?,?)", rows)
            last = self._db.execute("SELECT last_insert_rowid()").fetchone()[0]
            if state is not None:
                self._db.execute("INSERT INTO app_state (key, value) VALUES (?, ?)"
                                 " ON CONFLICT(key) DO UPDATE SET value = excluded.value", state)
        if not rows:
            return range(0)
        now = time.monotonic()
        if now >= self._next_cap_check:
            self.enforce_cap(age=now >= self._next_age_check)
        return range(last - len(rows) + 1, last + 1)

    def begin(self, max_records: int) -> list[Pending]:
        """The next records not yet handed out since the last release(), highest priority first."""
        out: list[Pending] = []
        with self._lock:
            for prio in sorted(self._cursor, reverse=True):
                want = max_records - len(out)
                if want <= 0:
                    break
                rows = self._db.execute(
                    "SELECT seq, ts, boot_id, mono, type, priority, payload FROM records"
                    " WHERE priority=? AND seq>? ORDER BY seq LIMIT ?", (prio, self._cursor[prio], want),
                ).fetchall()
                if rows:
                    self._cursor[prio] = rows[-1][0]
                    out.extend(Pending(*r) for r in rows)
        return out

    def ack(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Delete confirmed records. Idempotent: acking an absent seq is a no-op.

        Deletes commit without an fsync of their own (synchronous=NORMAL for this transaction; the next
        put's FULL commit syncs the WAL): a delete lost to a power cut only means a resend, which the hub
        drops as a duplicate. Puts are never relaxed."""
        with self._lock:
            if self._sync_full:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._tx():
                    before = self._db.total_changes
                    self._db.executemany("DELETE FROM records WHERE seq BETWEEN ? AND ?", list(ranges))
                    return self._db.total_changes - before
            finally:
                if self._sync_full:
                    self._db.execute("PRAGMA synchronous=FULL")

    def load_state(self, key: str) -> bytes | None:
        """The app state last committed under `key` by put(), or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM app_state WHERE key=?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def release(self) -> None:
        """Everything handed out and not acked is pending again (after a reconnect or ack timeout)."""
        with self._lock:
            self._cursor = dict.fromkeys(self._cursor, 0)

    def stats(self) -> OutboxStats:
        with self._lock:
            db = self._db
            pending, oldest = db.execute("SELECT count(*), min(ts) FROM records").fetchone()
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()
            dropped = dict(db.execute("SELECT name, value FROM counters WHERE name LIKE 'dropped.%'").fetchall())
            return OutboxStats(pending=pending, last_seq=row[0] if row else 0, oldest_ts=oldest,
                               used_bytes=self._used_bytes(), dropped=dropped)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- cap --------------------------------------------------------------------------------------
    def _used_bytes(self) -> int:
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        count = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((count - free) * page)

    AGE_CHECK_S = 600.0

    def enforce_cap(self, age: bool = True) -> dict[int, int]:
        """Apply the size cap (and the age cap, unless age=False) now; returns records dropped per priority."""
        self._next_cap_check = time.monotonic() + 1.0
        dropped: dict[int, int] = {}
        with self._lock:
            if age:
                self._next_age_check = time.monotonic() + self.AGE_CHECK_S
                dropped = self._drop_old()
            while self._used_bytes() > self.max_bytes:
                row = self._db.execute(
                    "SELECT min(priority) FROM records WHERE priority < ?", (int(Priority.ALERT),)).fetchone()
                if row[0] is None:
                    log.warning("outbox over its cap with alerts only; alerts are never dropped",
                                extra={"used_bytes": self._used_bytes(), "cap_bytes": self.max_bytes})
                    break
                with self._tx():
                    cur = self._db.execute(
                        "DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE priority=?"
                        " ORDER BY seq LIMIT 500)", (row[0],))
                    dropped[row[0]] = dropped.get(row[0], 0) + cur.rowcount
            if dropped:
                with self._tx():
                    self._db.executemany(
                        "INSERT INTO counters (name, value) VALUES (?, ?)"
                        " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        [(f"dropped.{Priority(p).name.lower()}", n) for p, n in dropped.items()])
                log.warning("outbox cap dropped records", extra={"dropped": dropped})
        return dropped

    def _drop_old(self) -> dict[int, int]:
        """Age = monotonic time for records of this boot (a wall clock that jumps forward must not empty
        the outbox), wall-clock time for older boots, never for records stamped before 2020."""
        args = {"boot": self.boot_id, "mono_cut": time.monotonic() - self.max_age_s,
                "ts_cut": time.time() - self.max_age_s, "alert": int(Priority.ALERT)}
        old = ("priority < :alert AND ((boot_id = :boot AND mono < :mono_cut)"
               " OR (boot_id != :boot AND ts < :ts_cut AND ts > 1577836800))")
        with self._tx():
            dropped = dict(self._db.execute(
                f"SELECT priority, count(*) FROM records WHERE {old} GROUP BY priority", args).fetchall())
            self._db.execute(f"DELETE FROM records WHERE {old}", args)
        return dropped


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
