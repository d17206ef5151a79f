"""The hub's store: SQLite, one row per (device_id, seq), so a redelivered record is stored once.

Each record of a batch is compared with what the hub holds for its (device_id, seq): none, stored; the
same (ts, boot, mono, type, prio, payload), a redelivery, dropped and counted; other content, a conflict:
its seq was handed out twice (an outbox file restored from an old image, an outbox with
synchronous=NORMAL that lost its last commits to a power cut, two units configured with one device_id).
A conflict is kept in `conflicts`, counted per device, and acked: nothing the hub acks is ever discarded.
Records that failed validation (hub/intake.py) are counted per device and traced in `rejected`.
Health messages (core/wire.py Health) are kept per device in `health`: the latest and the HEALTH_KEPT before
it; health messages refused (malformed, another device's) are counted in devices.health_refused.

A seq more than `max_seq_jump` past the highest the hub holds for its device (one record at 2**63-1 would
report 9.2e18 gaps) is suspect, not truth: the record is quarantined whole in `suspect`, counted per device,
named in the ack's rejected ranges (the unit dead-letters it, so it never blocks a batch), and left out of
max_seq, gaps and `verify`. Its resend (the ack was lost) is named rejected again, not kept or counted again;
another content under that seq is kept and counted (new_suspects).

Acks are published only after the transaction that stored the records has committed with
synchronous=FULL: an acked record survives a power cut of the hub.

The WAL is copied into the database file (checkpointed) by a thread of the store's own (`_Checkpointer`), on its
own connection, kicked after each commit: one long call that runs without the GIL while the hub parses the next
messages, where SQLite's own checkpoint ran inside the writer's COMMIT (bench/hub.py's ingest spent ~12 % of the
hub's samples there). A checkpoint never changes what is durable (the commit's fsync of the WAL did that). The
WAL starts over only when a transaction begins with all of it copied, which back-to-back transactions rarely
leave room for: the writer's own autocheckpoint at WAL_MAX_PAGES copies what the thread has not yet, and the
next transaction starts the WAL over.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from customs_edge.core.errors import CustomsEdgeError
from customs_edge.core.signing import GENESIS, TOMBSTONE_TYPE, batch_message, record_hash
from customs_edge.core.signing import verify as verify_signature
from customs_edge.core.wire import ranges_of
from customs_edge.hub.intake import Incoming, Row

# A record's columns, in records and conflicts. Part of schema v1: never edit, add a migration.
_RECORD_COLUMNS = """
        device_id   TEXT    NOT NULL,
        seq         INTEGER NOT NULL,
        ts          REAL    NOT NULL,
        boot_id     TEXT    NOT NULL,
        mono        REAL    NOT NULL,
        type        TEXT    NOT NULL,
        priority    INTEGER NOT NULL,
        payload     TEXT    NOT NULL,
        received_at REAL    NOT NULL"""

SCHEMA: list[str] = [
    f"""
    CREATE TABLE records ({_RECORD_COLUMNS},
        PRIMARY KEY (device_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE conflicts ({_RECORD_COLUMNS},
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
    # v2: per-record validation (a trace of what was rejected), conflicts found by comparing content
    f"""
    ALTER TABLE devices ADD COLUMN rejected INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE rejected (
        device_id   TEXT    NOT NULL,
        seq         INTEGER,            -- NULL: the record had no usable seq
        batch       TEXT    NOT NULL,
        reason      TEXT    NOT NULL,
        raw         TEXT    NOT NULL,   -- the record as received, truncated
        received_at REAL    NOT NULL
    );
    CREATE UNIQUE INDEX rejected_by_seq ON rejected (device_id, seq);
    -- any other content for a stored seq is a conflict: (boot_id, mono) no longer identify one
    CREATE TABLE conflicts_v2 ({_RECORD_COLUMNS});
    INSERT INTO conflicts_v2 SELECT * FROM conflicts;
    DROP TABLE conflicts;
    ALTER TABLE conflicts_v2 RENAME TO conflicts;
    CREATE INDEX conflicts_by_seq ON conflicts (device_id, seq);
    CREATE TABLE refused (kind TEXT PRIMARY KEY, batches INTEGER NOT NULL) WITHOUT ROWID;
    """,
    # v3: health telemetry
    """
    CREATE TABLE health (
        device_id   TEXT NOT NULL,
        ts          REAL NOT NULL,  -- the unit's clock
        received_at REAL NOT NULL,
        payload     TEXT NOT NULL   -- the Health message as validated
    );
    CREATE INDEX health_by_device ON health (device_id, ts);
    ALTER TABLE devices ADD COLUMN health_refused INTEGER NOT NULL DEFAULT 0;
    """,
    # v4: the hash chain (core/signing.py): each record's link to its predecessor and its own chain hash,
    # computed on arrival from what the signature covered; NULL for unchained records (older agents)
    """
    ALTER TABLE records ADD COLUMN prev TEXT;
    ALTER TABLE records ADD COLUMN h TEXT;
    ALTER TABLE rejected ADD COLUMN prev TEXT;
    ALTER TABLE rejected ADD COLUMN h TEXT;
    """,
    # v5: what the console filters on: a unit's type and site (from its retained status), and alerts newest first
    """
    ALTER TABLE devices ADD COLUMN unit_type TEXT;
    ALTER TABLE devices ADD COLUMN site TEXT;
    CREATE INDEX records_alerts ON records (received_at) WHERE priority = 3 OR type = 'driver_fault';
    CREATE INDEX records_lot_report ON records (ts) WHERE type = 'lot_report';
    CREATE INDEX records_lane_summary ON records (ts) WHERE type = 'lane_summary';
    CREATE INDEX records_ore_analysis ON records (ts) WHERE type = 'ore_analysis';
    CREATE INDEX records_identification ON records (ts) WHERE type = 'identification';
    """,
    # v6: records quarantined as suspect (an implausible seq jump), kept whole, out of records, gaps and verify
    f"""
    CREATE TABLE suspect ({_RECORD_COLUMNS},
        batch  TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX suspect_by_seq ON suspect (device_id, seq);
    ALTER TABLE devices ADD COLUMN suspect INTEGER NOT NULL DEFAULT 0;
    """,
    # v7: the signatures of batches verified on arrival, with the (seq, chain hash) pairs each covers (JSON, in the
    # order signed): `hub verify --keys` proves the stored history against them, so an edit of this database that
    # recomputes the chain hashes is found too
    """
    CREATE TABLE signatures (
        device_id   TEXT NOT NULL,
        batch       TEXT NOT NULL,
        sig         TEXT NOT NULL,
        hashes      TEXT NOT NULL,
        received_at REAL NOT NULL,
        PRIMARY KEY (device_id, batch, sig)
    ) WITHOUT ROWID;
    """,
]

MAX_SEQ_JUMP = 10**9  # default: 1.6 years of a unit making 20 records/s with none of them reaching the hub

ROWS_PER_INSERT = 64  # records rows per INSERT statement (9 values each and 2 shared; SQLite takes 32766)
_NO_LINK = (None, None)


@functools.lru_cache(maxsize=ROWS_PER_INSERT)
def _insert_sql(n: int) -> str:
    """INSERT of n records rows of one device: ?1 its device_id and ?2 received_at, shared; then per row seq, ts,
    boot_id, mono, type, priority, payload, prev, h."""
    return ("INSERT INTO records (device_id, seq, ts, boot_id, mono, type, priority, payload, received_at, prev, h)"
            " VALUES " + ",".join("(?1,{},?2,?{},?{})".format(",".join(f"?{a + k}" for k in range(7)), a + 7, a + 8)
                                  for a in range(3, 3 + 9 * n, 9)))

WAL_MAX_PAGES = 4000  # wal_autocheckpoint (SQLite's default 1000): ~16 MB of WAL at 4 KiB pages
log = logging.getLogger(__name__)

HEALTH_KEPT = 1440  # health messages kept per device: a day at the default interval

Content = tuple[float, str, float, str, int, str]  # a Row without its seq: what a redelivery repeats exactly


class StoreError(CustomsEdgeError):
    """The hub's database cannot be used as asked (a read-only open of a missing or foreign file)."""


@dataclass
class Stored:
    device_id: str
    batch: str
    ranges: list[tuple[int, int]]  # every record the hub now holds: stored, redelivered or in conflict
    rejected: list[tuple[int, int]]  # records that failed validation, those an ack can name
    stored: int
    duplicates: int
    conflicts: list[int]  # seqs of this batch newly kept in `conflicts`
    device_conflicts: int  # the device's conflicts so far
    boots: tuple[list[str], list[str]]  # of those conflicts: the stored versions' boots, the new ones'
    suspect: list[int] = field(default_factory=list)  # seqs newly quarantined (an implausible jump), also in `rejected`
    suspect_resent: list[int] = field(default_factory=list)  # seqs quarantined before with this content: in `rejected`


@dataclass
class FleetRow:
    device_id: str
    status: str | None  # online / offline (the last will) / ? (an unreadable status), None: never heard
    last_seen: float | None  # the hub's clock: the last records or health message received
    health: str | None  # the latest Health message (JSON), None: none received
    health_refused: int


@dataclass
class DeviceStats:
    device_id: str
    received: int  # = stored + duplicates + conflicts + rejected
    duplicates: int
    conflicts: int  # records that reused a stored seq with other content: kept in `conflicts`
    rejected: int  # records that failed validation: traced in `rejected`
    stored: int
    max_seq: int  # the highest seq received, stored or rejected
    gaps: int  # seqs up to max_seq the hub never received (neither stored nor rejected)
    last_seen: float | None
    status: str | None
    suspect: int = 0  # records quarantined for an implausible seq jump: in `suspect`, not in max_seq or gaps


@dataclass
class Verdict:
    """`hub verify` for one device: ok, or the first seq where its stored history is incomplete or altered."""

    device_id: str
    records: int = 0  # chained records proven
    dropped: int = 0  # seqs the device's outbox cap dropped, named by its tombstones
    rejected: int = 0  # seqs the hub refused on validation (their links kept)
    unchained: int = 0  # records of older agents, without a chain link
    signed_batches: int = 0  # with the device's key: kept batch signatures verified
    signed: int = 0  # with the device's key: stored records whose chain hash a verified signature covers
    unsigned: int = 0  # with the device's key: chained records before its first signed batch (none after may be)
    bad_seq: int | None = None
    reason: str = ""

    def bad(self, seq: int, reason: str) -> Verdict:
        self.bad_seq, self.reason = seq, reason
        return self


class HubStore:
    def __init__(self, path: str | Path, synchronous: str = "FULL", *, readonly: bool = False,
                 max_seq_jump: int = MAX_SEQ_JUMP) -> None:
        self.path = Path(path)
        self.max_seq_jump = max_seq_jump
        self._checkpointer: _Checkpointer | None = None
        if readonly:
            self.db = self._open_readonly()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self.db.execute("PRAGMA busy_timeout=5000")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        for v in range(version, len(SCHEMA)):
            self.db.executescript("BEGIN;" + SCHEMA[v] + f";PRAGMA user_version={v + 1};COMMIT;")
        self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_MAX_PAGES}")
        self._checkpointer = _Checkpointer(self.path)

    def _open_readonly(self) -> sqlite3.Connection:
        """For `hub stats`: never creates, upgrades or writes a file (a mistyped path is an error, not a new file)."""
        try:
            db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the hub database {self.path} ({exc}): check the path given with --db") \
                from None
        if version != len(SCHEMA):
            db.close()
            raise StoreError(f"{self.path} is not a hub database" if version == 0 else
                             f"{self.path} has schema version {version}, this hub {len(SCHEMA)}: "
                             + ("start the hub once to upgrade it" if version < len(SCHEMA) else "use a newer CLI"))
        return db

    def store(self, batches: Iterable[Incoming], refused: Mapping[str, int] | None = None) -> list[Stored]:
        """Store many batches in one transaction (group commit), with the counts of messages refused whole
        since the last call. Returns what to ack for each batch."""
        now = time.time()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            out = [self._store(b, now) for b in batches]
            db.executemany("INSERT INTO refused VALUES (?,?) ON CONFLICT(kind) DO UPDATE SET"
                           " batches = batches + excluded.batches", [(k, n) for k, n in (refused or {}).items() if n])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if self._checkpointer is not None:
            self._checkpointer.kick()
        return out

    def _store(self, b: Incoming, now: float) -> Stored:
        b, suspect, resent = self._quarantine(b, now)
        new, fresh, dup, first = classify(b, self._held)
        # Plain INSERTs: the comparison above decided. A constraint failing here (a NaN where NOT NULL) raises,
        # and nothing of the batch is acked; it is never taken for a duplicate.
        self._insert_records(b.device_id, now, new, b.links)
        self.db.executemany("INSERT INTO conflicts VALUES (?,?,?,?,?,?,?,?,?)",
                            [(b.device_id, *r, now) for r in fresh])
        self.db.executemany(
            "INSERT INTO rejected VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(device_id, seq) DO UPDATE SET"
            " batch = excluded.batch, reason = excluded.reason, raw = excluded.raw, received_at = excluded.received_at,"
            " prev = excluded.prev, h = excluded.h",
            [(b.device_id, r.seq, b.batch, r.reason, r.raw, now, *b.links.get(r.seq or 0, (None, None)))
             for r in b.rejected])
        (conflicts,) = self.db.execute(
            "INSERT INTO devices (device_id, received, duplicates, conflicts, rejected, stored, max_seq, first_seen,"
            " last_seen) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET"
            " received = received + excluded.received, duplicates = duplicates + excluded.duplicates,"
            " conflicts = conflicts + excluded.conflicts, rejected = rejected + excluded.rejected,"
            " stored = stored + excluded.stored, max_seq = max(max_seq, excluded.max_seq),"
            " last_seen = excluded.last_seen RETURNING conflicts",
            (b.device_id, len(b.rows) + len(b.rejected), dup, len(fresh), len(b.rejected), len(new),
             highest_seq(b), now, now)).fetchone()
        if suspect:
            self.db.execute("UPDATE devices SET suspect = suspect + ? WHERE device_id = ?", (len(suspect), b.device_id))
        if b.sig is not None:
            self.db.execute("INSERT OR IGNORE INTO signatures VALUES (?,?,?,?,?)",
                            (b.device_id, b.batch, b.sig, signed_text(b), now))
        return stored_result(b, new, fresh, dup, first, conflicts, suspect, resent)

    def _insert_records(self, device_id: str, now: float, rows: list[Row],
                        links: dict[int, tuple[str | None, str]]) -> None:
        """INSERT one device's rows into `records`, ROWS_PER_INSERT to a statement: SQLite's per-statement work
        (opening the table's and each index's cursors, resetting the program) is shared by that many rows, and
        the device_id and received_at are bound once for them."""
        get = links.get
        for i in range(0, len(rows), ROWS_PER_INSERT):
            chunk = rows[i:i + ROWS_PER_INSERT]
            values: list[Any] = [device_id, now]
            for r in chunk:
                values += r
                values += get(r[0], _NO_LINK)
            self.db.execute(_insert_sql(len(chunk)), values)

    def _quarantine(self, b: Incoming, now: float) -> tuple[Incoming, list[int], list[int]]:
        """quarantine() against the device's highest seq held (or stored earlier in this transaction), the suspect
        rows not held yet (new_suspects) kept in `suspect`. Returns the batch without them, the seqs newly
        quarantined and those quarantined before with the same content (a resend)."""
        if not b.rows and not b.rejected:
            return b, [], []
        (known,) = self.db.execute("SELECT coalesce(max(max_seq), 0) FROM devices WHERE device_id = ?",
                                   (b.device_id,)).fetchone()
        b, suspect, why = quarantine(b, known, self.max_seq_jump)
        if not suspect:
            return b, [], []
        suspect, resent = new_suspects(suspect, self._held("suspect", b.device_id, suspect), {})
        self.db.executemany("INSERT INTO suspect VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            [(b.device_id, *r, now, b.batch, why) for r in suspect])
        return b, [r[0] for r in suspect], resent

    def _held(self, table: str, device_id: str, rows: list[Row]) -> list[tuple[int, Content]]:
        """(seq, content) of every row `table` holds for these rows' seqs."""
        seqs = sorted({r[0] for r in rows})
        out: list[tuple[int, Content]] = []
        if seqs and seqs[-1] - seqs[0] < 2 * len(seqs):  # dense, as batches are: one range scan, not an IN list
            wanted = set(seqs)
            return [(seq, (ts, boot, mono, type_, prio, payload)) for seq, ts, boot, mono, type_, prio, payload in
                    self.db.execute("SELECT seq, ts, boot_id, mono, type, priority, payload FROM " + table +
                                    " WHERE device_id=? AND seq BETWEEN ? AND ?", (device_id, seqs[0], seqs[-1]))
                    if seq in wanted]
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            out += [(seq, (ts, boot, mono, type_, prio, payload)) for seq, ts, boot, mono, type_, prio, payload in
                    self.db.execute("SELECT seq, ts, boot_id, mono, type, priority, payload FROM " + table +
                                    f" WHERE device_id=? AND seq IN ({','.join('?' * len(chunk))})",
                                    (device_id, *chunk))]
        return out

    def set_status(self, device_id: str, status: str, unit_type: str | None = None, site: str | None = None) -> None:
        """A unit's state from its retained status; its type and site when the status names them (a will
        does not: the last known ones stay)."""
        self.db.execute(
            "INSERT INTO devices (device_id, status, first_seen, last_seen, unit_type, site) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT(device_id) DO UPDATE SET status = excluded.status,"
            " unit_type = coalesce(excluded.unit_type, unit_type), site = coalesce(excluded.site, site)",
            (device_id, status, time.time(), time.time(), unit_type, site))

    def put_health(self, messages: Iterable[tuple[str, float, str]], refused: Mapping[str, int]) -> int:
        """Keep health messages (device_id, the unit's ts, payload) and count refused ones per device, in one
        transaction. A message already held (the retained copy, delivered again at each subscribe) is skipped;
        a device keeps its HEALTH_KEPT latest. Returns how many were new."""
        now = time.time()
        db = self.db
        new = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for device_id, ts, payload in messages:
                if db.execute("SELECT 1 FROM health WHERE device_id=? AND ts=?", (device_id, ts)).fetchone():
                    continue
                new += 1
                db.execute("INSERT INTO health VALUES (?,?,?,?)", (device_id, ts, now, payload))
                db.execute("DELETE FROM health WHERE device_id=?1 AND rowid <= (SELECT rowid FROM health WHERE"
                           " device_id=?1 ORDER BY rowid DESC LIMIT 1 OFFSET ?2)", (device_id, HEALTH_KEPT))
                db.execute("INSERT INTO devices (device_id, first_seen, last_seen) VALUES (?1,?2,?2)"
                           " ON CONFLICT(device_id) DO UPDATE SET last_seen = excluded.last_seen", (device_id, now))
            db.executemany("INSERT INTO devices (device_id, health_refused, first_seen) VALUES (?,?,?) ON CONFLICT"
                           "(device_id) DO UPDATE SET health_refused = health_refused + excluded.health_refused",
                           [(d, n, now) for d, n in refused.items() if n])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return new

    def health_history(self, device_id: str, limit: int = HEALTH_KEPT + 1) -> list[tuple[float, str]]:
        """(received_at, payload) of a device's health messages, newest first."""
        return self.db.execute("SELECT received_at, payload FROM health WHERE device_id=? ORDER BY rowid DESC"
                               " LIMIT ?", (device_id, limit)).fetchall()

    def fleet(self) -> list[FleetRow]:
        rows = self.db.execute(
            "SELECT d.device_id, d.status, d.last_seen, d.health_refused, (SELECT payload FROM health h WHERE"
            " h.device_id = d.device_id ORDER BY rowid DESC LIMIT 1) FROM devices d ORDER BY d.device_id").fetchall()
        return [FleetRow(d, status, seen, payload, refused) for d, status, seen, refused, payload in rows]

    def stats(self) -> list[DeviceStats]:
        rows = self.db.execute(
            "SELECT device_id, received, duplicates, conflicts, rejected, stored, max_seq, last_seen, status,"
            " (SELECT count(*) FROM rejected r WHERE r.device_id = d.device_id AND r.seq IS NOT NULL AND NOT EXISTS"
            "  (SELECT 1 FROM records x WHERE x.device_id = r.device_id AND x.seq = r.seq)), suspect"
            " FROM devices d ORDER BY device_id").fetchall()
        return [DeviceStats(d, rcv, dup, cf, rj, st, mx, max(0, mx - st - rj_seqs), seen, status, sus)
                for d, rcv, dup, cf, rj, st, mx, seen, status, rj_seqs, sus in rows]

    def refused(self) -> dict[str, int]:
        """Records messages refused whole, by kind (malformed, device_mismatch, store_failed)."""
        return dict(self.db.execute("SELECT kind, batches FROM refused ORDER BY kind").fetchall())

    def gap_ranges(self, device_id: str, limit: int = 20) -> list[tuple[int, int]]:
        """Seq ranges below the highest seq received that the hub never received (neither stored nor rejected)."""
        rows = self.db.execute(
            "SELECT prev + 1, seq - 1 FROM (SELECT seq, coalesce(lag(seq) OVER (ORDER BY seq), 0) AS prev FROM"
            " (SELECT seq FROM records WHERE device_id = ?1 UNION SELECT seq FROM rejected WHERE device_id = ?1"
            " AND seq IS NOT NULL)) WHERE seq > prev + 1 LIMIT ?2", (device_id, limit)).fetchall()
        return [(a, b) for a, b in rows]

    def verify(self, device_id: str, key: Ed25519PublicKey | None = None, all_signed: bool = False) -> Verdict:
        """Walk the device's chain from seq 1: every record's content must hash to the link its successor
        carries, and every seq up to the highest received must be stored, rejected (with its link) or in a
        dropped run a tombstone names with matching end hashes. With the device's registered `key`, the kept
        batch signatures too (check_signatures). The first seq where that fails is named."""
        v = Verdict(device_id)
        runs: dict[int, tuple[int, str | None, str]] = {}
        for (payload,) in self.db.execute("SELECT payload FROM records WHERE device_id=? AND type=?",
                                          (device_id, TOMBSTONE_TYPE)):
            for lo, hi, prev, last in json.loads(payload).get("runs", []):
                runs[lo] = (hi, prev, last)
        rows = self.db.execute(
            "SELECT seq, ts, type, priority, payload, prev, h, 1 FROM records WHERE device_id=?1 UNION ALL"
            " SELECT seq, 0, '', 0, '', prev, h, 0 FROM rejected r WHERE device_id=?1 AND seq IS NOT NULL AND NOT"
            " EXISTS (SELECT 1 FROM records x WHERE x.device_id=?1 AND x.seq=r.seq) ORDER BY seq", (device_id,))
        (max_seq,) = self.db.execute("SELECT coalesce(max(max_seq), 0) FROM devices WHERE device_id=?",
                                     (device_id,)).fetchone()
        v = walk_chain(v, runs, rows, max_seq)
        if key is None or v.bad_seq is not None:
            return v
        sigs = self.db.execute("SELECT batch, sig, hashes FROM signatures WHERE device_id=?", (device_id,))
        chained = (seq for (seq,) in self.db.execute(
            "SELECT seq FROM records WHERE device_id=? AND prev IS NOT NULL ORDER BY seq", (device_id,)))
        return check_signatures(v, key, sigs, lambda lo, hi: dict(self.db.execute(
            "SELECT seq, h FROM records WHERE device_id=?1 AND seq BETWEEN ?2 AND ?3 AND h IS NOT NULL",
            (device_id, lo, hi))), chained, all_signed)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()  # first: the writer's close, the last, checkpoints and removes the WAL
            self._checkpointer = None
        self.db.close()


class _Checkpointer:
    """PASSIVE checkpoints of one SQLite file in a thread of their own (see the module's docstring), one after each
    `kick()`; kicks while one runs make one more. A failed checkpoint is logged and counted: the writer's own
    autocheckpoint still bounds the WAL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = 0
        self.failures = 0
        self._cond = threading.Condition()
        self._pending = self._busy = self._stop = False
        self._thread = threading.Thread(target=self._run, name="hub-wal-checkpoint", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        with self._cond:
            self._pending = True
            self._cond.notify_all()

    def idle(self) -> bool:
        """No checkpoint running or asked for."""
        with self._cond:
            return not (self._pending or self._busy)

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:  # no thread: the writer's own autocheckpoint alone bounds the WAL
            self.failures += 1
            log.warning("WAL checkpoint thread of %s not started (%s): the writer checkpoints at %d pages instead",
                        self.path, exc, WAL_MAX_PAGES)
            return
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending or self._stop)
                    if self._stop:
                        return
                    self._pending, self._busy = False, True
                done = False
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    done = True
                except sqlite3.Error as exc:
                    self.failures += 1
                    if self.failures == 1 or self.failures % 1000 == 0:
                        log.warning("WAL checkpoint of %s failed (%s; %d so far)", self.path, exc, self.failures)
                with self._cond:
                    self._busy = False
                    self.checkpoints += done
                    self._cond.notify_all()
        finally:
            db.close()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)


def classify(b: Incoming, held_in: Callable[[str, str, list[Row]], list[tuple[int, Content]]]
             ) -> tuple[list[Row], list[Row], int, dict[int, Content]]:
    """A batch against what the store holds (`held_in(table, device_id, rows)`): the rows to store, the rows to
    keep in `conflicts`, the count of redeliveries, and the version each seq was first stored as (at least each
    seq of a conflict)."""
    first = dict(held_in("records", b.device_id, b.rows))  # the version each seq was stored as
    if not first and len({r[0] for r in b.rows}) == len(b.rows):  # the usual batch: all new, no seq twice
        return b.rows, [], 0, first
    held = {seq: {content} for seq, content in first.items()}
    new: list[Row] = []
    clash: list[Row] = []
    dup = 0
    for row in b.rows:
        if row[0] not in held:
            held[row[0]] = {row[1:]}
            first[row[0]] = row[1:]
            new.append(row)
        elif row[1:] in held[row[0]]:
            dup += 1
        else:
            clash.append(row)
    fresh: list[Row] = []
    if clash:  # kept apart once: a conflicting record resent is a redelivery of it
        for seq, content in held_in("conflicts", b.device_id, clash):
            held[seq].add(content)
        for row in clash:
            if row[1:] in held[row[0]]:
                dup += 1
            else:
                held[row[0]].add(row[1:])
                fresh.append(row)
    return new, fresh, dup, first


def quarantine(b: Incoming, known: int, max_seq_jump: int) -> tuple[Incoming, list[Row], str]:
    """Records whose seq jumps more than max_seq_jump past `known` (the device's highest held) or past the batch's
    own plausible seqs below it are suspect; a rejected record's implausible seq is unnamed (traced, never counted
    as received up to it). Returns the batch without the suspect rows, those rows, and why (their `reason`)."""
    if not b.rows and not b.rejected:
        return b, [], ""
    highest = max([r[0] for r in b.rows] + [r.seq or 0 for r in b.rejected])
    if highest - known <= max_seq_jump:
        return b, [], ""  # the usual case
    limit, keep, suspect = known + max_seq_jump, [], []
    for row in sorted(b.rows):
        if row[0] > limit:
            suspect.append(row)
        else:
            keep.append(row)
            limit = max(limit, row[0] + max_seq_jump)
    why = f"seq more than {max_seq_jump} past the device's highest ({known}): quarantined as suspect"
    rejected = [r if (r.seq or 0) <= limit else replace(r, seq=None, reason=f"seq {r.seq}: {why}; {r.reason}")
                for r in b.rejected]
    return replace(b, rows=keep, rejected=rejected), suspect, why


def new_suspects(suspect: list[Row], held: Iterable[tuple[int, Content]], seen: dict[int, set[Content]]
                 ) -> tuple[list[Row], list[int]]:
    """Of one device's quarantined rows, those to keep in `suspect` and count, and the seqs of the others: a row
    `suspect` already holds with the same content (`held`: (seq, content) as the table holds them, compared as
    classify() compares records) is a resend after a lost ack (the unit dead-letters it on the ack that names it),
    neither kept nor counted again. Another content under a suspect seq is another record quarantined: kept (it is
    evidence) and counted, as each version of a conflict is; its own resend is a resend then. `seen`: the
    device's (seq -> contents) kept earlier in the same transaction, updated."""
    for seq, content in held:
        seen.setdefault(seq, set()).add(content)
    keep: list[Row] = []
    resent: list[int] = []
    for row in suspect:
        contents = seen.setdefault(row[0], set())
        if row[1:] in contents:
            resent.append(row[0])
        else:
            contents.add(row[1:])
            keep.append(row)
    return keep, resent


def highest_seq(b: Incoming) -> int:
    """The highest seq a batch names (stored or rejected): what the device's max_seq becomes at least."""
    return max([r[0] for r in b.rows] + [r.seq for r in b.rejected if r.seq is not None], default=0)


def stored_result(b: Incoming, new: list[Row], fresh: list[Row], dup: int, first: dict[int, Content],
                  conflicts: int, suspect: list[int] | None = None, resent: list[int] | None = None) -> Stored:
    """`suspect`: seqs newly quarantined, `resent`: quarantined before (new_suspects); both named as rejected in
    the ack so the unit dead-letters them."""
    named = [r.seq for r in b.rejected if r.seq is not None]
    if suspect or resent:
        named = sorted({*named, *(suspect or []), *(resent or [])})
    return Stored(b.device_id, b.batch, ranges_of([r[0] for r in b.rows]), ranges_of(named),
                  len(new), dup, [r[0] for r in fresh], conflicts,
                  (sorted({first[r[0]][1] for r in fresh}), sorted({r[2] for r in fresh})), suspect or [],
                  resent or [])


def signed_text(b: Incoming) -> str:
    """A batch's signed (seq, chain hash) pairs as kept in `signatures.hashes`."""
    return json.dumps(b.signed, separators=(",", ":"))


def check_signatures(v: Verdict, key: Ed25519PublicKey, sigs: Iterable[tuple[str, str, str]],
                     held: Callable[[int, int], dict[int, str]], chained: Iterable[int], every: bool = False
                     ) -> Verdict:
    """`hub verify` with the device's registered key, after the chain walk: each kept signature (batch, sig, its
    (seq, hash) pairs) must verify under the key, which proves those hashes the device's; a stored record whose chain
    hash (already proven to be its content's) is among them is signed. Every chained record from the first seq a
    kept signature names on must be signed: one added, or altered with every hash after it recomputed, is not.
    With `every`, every chained record must be (a device registered from its first record: deleting its kept
    signatures is found too; otherwise the records before the first kept one count as `unsigned`).
    `held(lo, hi)`: seq -> chain hash of the stored records in that range."""
    covered: list[tuple[int, int]] = []
    first: int | None = None
    forged: tuple[int, str] | None = None  # the failing signature that names the lowest seq
    for batch, sig, text in sigs:
        pairs = [(int(q), str(h)) for q, h in json.loads(text)]
        if not pairs:
            continue
        low = min(q for q, _ in pairs)
        if not verify_signature(key, sig, batch_message(v.device_id, batch, [h for _, h in pairs])):
            if forged is None or low < forged[0]:
                forged = (low, f"the kept signature of batch {batch!r} does not verify under the device's registered"
                               " key: the signature or the hashes kept with it were altered in this database")
            continue
        v.signed_batches += 1
        first = low if first is None else min(first, low)
        have = held(low, max(q for q, _ in pairs))
        covered += ranges_of([q for q, h in pairs if have.get(q) == h])  # ranges: a few per batch, not a seq each
    if forged is not None:
        return v.bad(*forged)
    spans: list[tuple[int, int]] = []
    for lo, hi in sorted(covered):  # merged
        if spans and lo <= spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], max(hi, spans[-1][1]))
        else:
            spans.append((lo, hi))
    i = 0
    for seq in chained:
        while i < len(spans) and spans[i][1] < seq:
            i += 1
        if i < len(spans) and spans[i][0] <= seq:
            v.signed += 1
        elif first is not None and seq >= first:
            return v.bad(seq, "no kept signature covers it, though the device's signed history began at seq"
                              f" {first}: added, or altered with the hashes after it recomputed, in this database")
        elif every:
            return v.bad(seq, "no kept signature covers it (--all-signed: every record of a registered device must be"
                              " signed): added, altered, or its batch signature deleted, in this database")
        else:
            v.unsigned += 1
    return v


def walk_chain(v: Verdict, runs: dict[int, tuple[int, str | None, str]], rows: Iterable[tuple[Any, ...]],
               max_seq: int) -> Verdict:
    """The chain walk of `verify`, over (seq, ts, type, priority, payload, prev, h, stored) in seq order."""
    head: str | None = GENESIS
    expect = 1
    for seq, ts, type_, prio, payload, prev, h, stored in rows:
        while expect < seq and expect in runs:  # a dropped run, named by a tombstone
            hi, tprev, last = runs[expect]
            if head is not None and tprev != head:
                return v.bad(expect, f"the tombstone of seqs {expect}-{hi} does not link to seq {expect - 1}")
            v.dropped += hi - expect + 1
            head, expect = last, hi + 1
        if prev is None:  # an unchained record of an older agent: only before the chain began
            if v.records or v.rejected or v.dropped:
                return v.bad(seq, "its chain link was removed (an unchained record after the chain began)")
            v.unchained += 1
            head, expect = None, seq + 1
            continue
        if expect < seq and not (head is None and prev == GENESIS):
            return v.bad(expect, f"seqs {expect}-{seq - 1} are missing and no tombstone names them")
        if head is not None and prev != head:
            return v.bad(seq, f"its link does not match seq {seq - 1}: one of them was altered")
        if stored:
            computed = record_hash(prev, seq, ts, type_, prio, payload)
            if computed != h:
                return v.bad(seq, "its content does not match its chain hash: altered in this database")
            v.records += 1
        else:
            v.rejected += 1
        head, expect = h if not stored else computed, seq + 1
    if max_seq >= expect:
        return v.bad(expect, f"seqs {expect}-{max_seq} were received and are no longer stored")
    return v
