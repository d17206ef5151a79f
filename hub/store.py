"""The hub's store: SQLite, one row per (device_id, seq), so a redelivered record is stored once.

A record whose (device_id, seq) is already stored but whose (boot_id, mono) differ is not a redelivery:
its seq was handed out twice (an outbox file restored from an old image, an outbox with
synchronous=NORMAL that lost its last commits to a power cut, two units configured with one device_id).
It is kept in `conflicts`, counted per device, and acked: nothing the hub acks is ever discarded.

Acks are published only after the transaction that stored the records has committed with
synchronous=FULL: an acked record survives a power cut of the hub.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from customs_edge.core.jsonfast import dumps
from customs_edge.core.wire import Batch, ranges_of

SCHEMA: list[str] = [
    """
    CREATE TABLE records (
        device_id   TEXT    NOT NULL,
        seq         INTEGER NOT NULL,
        ts          REAL    NOT NULL,
        boot_id     TEXT    NOT NULL,
        mono        REAL    NOT NULL,
        type        TEXT    NOT NULL,
        priority    INTEGER NOT NULL,
        payload     TEXT    NOT NULL,
        received_at REAL    NOT NULL,
        PRIMARY KEY (device_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE conflicts (
        device_id   TEXT    NOT NULL,
        seq         INTEGER NOT NULL,
        ts          REAL    NOT NULL,
        boot_id     TEXT    NOT NULL,
        mono        REAL    NOT NULL,
        type        TEXT    NOT NULL,
        priority    INTEGER NOT NULL,
        payload     TEXT    NOT NULL,
        received_at REAL    NOT NULL,
        PRIMARY KEY (device_id, seq, boot_id, mono)
    ) WITHOUT ROWID;
    CREATE TABLE devices (
        device_id  TEXT PRIMARY KEY,
        received   INTEGER NOT NULL DEFAULT 0,
        duplicates INTEGER NOT NULL DEFAULT 0,
        conflicts  INTEGER NOT NULL DEFAULT 0,
        stored     INTEGER NOT NULL DEFAULT 0,
        max_seq    INTEGER NOT NULL DEFAULT 0,
        first_seen REAL,
        last_seen  REAL,
        status     TEXT
    );
    """,
]


@dataclass
class Stored:
    batch: Batch
    ranges: list[tuple[int, int]]
    stored: int
    duplicates: int


@dataclass
class DeviceStats:
    device_id: str
    received: int
    duplicates: int
    conflicts: int  # records that reused a stored seq with other content: kept in `conflicts`
    stored: int
    max_seq: int
    gaps: int  # seqs below max_seq that the hub does not have
    last_seen: float | None
    status: str | None


class HubStore:
    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self.db.execute("PRAGMA busy_timeout=5000")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        for v in range(version, len(SCHEMA)):
            self.db.executescript("BEGIN;" + SCHEMA[v] + f";PRAGMA user_version={v + 1};COMMIT;")

    def store(self, batches: Iterable[Batch]) -> list[Stored]:
        """Store many batches in one transaction (group commit). Returns what to ack for each."""
        now = time.time()
        out: list[Stored] = []
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for b in batches:
                before = db.total_changes
                db.executemany(
                    "INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?)",
                    [(b.device_id, r.seq, r.ts, r.boot, r.mono, r.type, r.prio, dumps(r.payload), now)
                     for r in b.records])
                stored = db.total_changes - before
                dup = len(b.records) - stored
                conflicts = self._conflicts(b, now) if dup else 0
                dup -= conflicts
                max_seq = max((r.seq for r in b.records), default=0)
                db.execute(
                    "INSERT INTO devices (device_id, received, duplicates, conflicts, stored, max_seq, first_seen,"
                    " last_seen) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET"
                    " received = received + excluded.received, duplicates = duplicates + excluded.duplicates,"
                    " conflicts = conflicts + excluded.conflicts,"
                    " stored = stored + excluded.stored, max_seq = max(max_seq, excluded.max_seq),"
                    " last_seen = excluded.last_seen",
                    (b.device_id, len(b.records), dup, conflicts, stored, max_seq, now, now))
                out.append(Stored(b, ranges_of([r.seq for r in b.records]), stored, dup))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def _conflicts(self, b: Batch, now: float) -> int:
        """Of a batch's records the PK turned away, keep those that are not the stored record."""
        seqs = [r.seq for r in b.records]
        stored: dict[int, tuple[str, float]] = {}
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            stored.update((seq, (boot, mono)) for seq, boot, mono in self.db.execute(
                f"SELECT seq, boot_id, mono FROM records WHERE device_id=? AND seq IN ({','.join('?' * len(chunk))})",
                (b.device_id, *chunk)))
        clash = [r for r in b.records if r.seq in stored and stored[r.seq] != (r.boot, r.mono)]
        before = self.db.total_changes
        self.db.executemany(
            "INSERT OR IGNORE INTO conflicts VALUES (?,?,?,?,?,?,?,?,?)",
            [(b.device_id, r.seq, r.ts, r.boot, r.mono, r.type, r.prio, dumps(r.payload), now) for r in clash])
        return self.db.total_changes - before  # a conflict resent again is a plain duplicate

    def set_status(self, device_id: str, status: str) -> None:
        self.db.execute(
            "INSERT INTO devices (device_id, status, first_seen, last_seen) VALUES (?,?,?,?)"
            " ON CONFLICT(device_id) DO UPDATE SET status = excluded.status",
            (device_id, status, time.time(), time.time()))

    def stats(self) -> list[DeviceStats]:
        rows = self.db.execute(
            "SELECT device_id, received, duplicates, conflicts, stored, max_seq, last_seen, status FROM devices"
            " ORDER BY device_id").fetchall()
        return [DeviceStats(d, rcv, dup, cf, st, mx, max(0, mx - st), seen, status)
                for d, rcv, dup, cf, st, mx, seen, status in rows]

    def gap_ranges(self, device_id: str, limit: int = 20) -> list[tuple[int, int]]:
        """Missing seq ranges below the highest seq seen."""
        rows = self.db.execute(
            "SELECT prev + 1, seq - 1 FROM (SELECT seq, coalesce(lag(seq) OVER (ORDER BY seq), 0) AS prev"
            " FROM records WHERE device_id = ?) WHERE seq > prev + 1 LIMIT ?", (device_id, limit)).fetchall()
        return [(a, b) for a, b in rows]

    def close(self) -> None:
        self.db.close()
