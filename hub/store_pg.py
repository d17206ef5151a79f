"""The hub's store in PostgreSQL (psycopg 3): what hub/store.py keeps in SQLite, for several hub workers at once.

Same tables, same meaning, same answers (tests/test_store_contract.py runs one suite over both stores).
What changes is that several workers, each on its own connection, store batches at the same time:
  - exactly once: `records` has PRIMARY KEY (device_id, seq). A batch is compared with what the database
    holds (hub/store.py classify) under a transaction-scoped advisory lock per device, taken in device_id
    order, so two workers handed the same batch (a resend after an ack timeout, while the first worker is
    still storing it) compare and insert one after the other: the second finds the first's rows committed
    and counts a redelivery (every transaction is READ COMMITTED whatever the server's default: a snapshot
    taken before the lock wait would miss them). The inserts are plain: if anything slipped past the lock, the
    primary key refuses the row, the transaction rolls back and nothing of it is acked (the agent resends; the
    resend is a redelivery then). ON CONFLICT DO NOTHING would instead hide a conflicting record as a duplicate.
  - deadlocks: advisory locks in device order, batches and health messages processed in device order, so
    two transactions never wait on each other in a cycle (if PostgreSQL still breaks one, it fails whole and
    the hub stores its batches one by one).
  - acks follow the commit: `store()` returns after COMMIT, with synchronous_commit on (the server's
    default; a session finding it off turns it on), so an acked record is in PostgreSQL's WAL on disk (and on a
    synchronous standby if the server is set up with one: docs/scale.md).
  - health messages: each reaches one worker (the records' share group), but the broker's retained copy reaches
    every worker at its subscribe: UNIQUE (device_id, ts) keeps one copy.
  - numbers: PostgreSQL's double precision takes NaN and infinities, SQLite's REAL NOT NULL refuses NaN;
    CHECK constraints refuse both here, so a record the store cannot keep is never acked on either.
The schema is created on first use by whichever worker gets there first (under an advisory lock) and its
version kept in `hub_schema`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from customs_edge.core.signing import TOMBSTONE_TYPE
from customs_edge.hub import store as _sqlite
from customs_edge.hub.intake import Incoming, Row
from customs_edge.hub.store import (
    HEALTH_KEPT,
    MAX_SEQ_JUMP,
    Content,
    DeviceStats,
    FleetRow,
    Stored,
    StoreError,
    Verdict,
    check_signatures,
    classify,
    highest_seq,
    new_suspects,
    quarantine,
    signed_text,
    stored_result,
    walk_chain,
)

_COPY_TYPES = ["text", "int8", "float8", "text", "float8", "text", "int4", "text", "float8"]  # a record's columns

log = logging.getLogger(__name__)

SCHEMA_LOCK = 0x637573746F6D73  # advisory lock key while the schema is created or upgraded ("customs")

_FINITE = "CHECK ({0} > '-Infinity' AND {0} < 'Infinity')"  # NaN sorts above Infinity in PostgreSQL
_RECORD_COLUMNS = f"""
        device_id   TEXT             NOT NULL,
        seq         BIGINT           NOT NULL,
        ts          DOUBLE PRECISION NOT NULL {_FINITE.format('ts')},
        boot_id     TEXT             NOT NULL,
        mono        DOUBLE PRECISION NOT NULL {_FINITE.format('mono')},
        type        TEXT             NOT NULL,
        priority    INTEGER          NOT NULL,
        payload     TEXT             NOT NULL,
        received_at DOUBLE PRECISION NOT NULL"""

SCHEMA: list[str] = [
    f"""
    CREATE TABLE records ({_RECORD_COLUMNS},
        prev TEXT,
        h    TEXT,
        PRIMARY KEY (device_id, seq)
    );
    CREATE TABLE conflicts ({_RECORD_COLUMNS});
    CREATE INDEX conflicts_by_seq ON conflicts (device_id, seq);
    CREATE TABLE devices (
        device_id      TEXT PRIMARY KEY,
        received       BIGINT NOT NULL DEFAULT 0,
        duplicates     BIGINT NOT NULL DEFAULT 0,
        conflicts      BIGINT NOT NULL DEFAULT 0,
        stored         BIGINT NOT NULL DEFAULT 0,
        max_seq        BIGINT NOT NULL DEFAULT 0,
        first_seen     DOUBLE PRECISION,
        last_seen      DOUBLE PRECISION,
        status         TEXT,
        rejected       BIGINT NOT NULL DEFAULT 0,
        health_refused BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE rejected (
        device_id   TEXT             NOT NULL,
        seq         BIGINT,
        batch       TEXT             NOT NULL,
        reason      TEXT             NOT NULL,
        raw         TEXT             NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        prev        TEXT,
        h           TEXT
    );
    CREATE UNIQUE INDEX rejected_by_seq ON rejected (device_id, seq);
    CREATE TABLE refused (kind TEXT PRIMARY KEY, batches BIGINT NOT NULL);
    CREATE TABLE health (
        id          BIGSERIAL PRIMARY KEY,
        device_id   TEXT             NOT NULL,
        ts          DOUBLE PRECISION NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        payload     TEXT             NOT NULL,
        UNIQUE (device_id, ts)
    );
    """,
    # v2 (SQLite's v5): what the console filters on: a unit's type and site, and alerts newest first
    """
    ALTER TABLE devices ADD COLUMN unit_type TEXT;
    ALTER TABLE devices ADD COLUMN site TEXT;
    CREATE INDEX records_alerts ON records (received_at) WHERE priority = 3 OR type = 'driver_fault';
    CREATE INDEX records_lot_report ON records (ts) WHERE type = 'lot_report';
    CREATE INDEX records_lane_summary ON records (ts) WHERE type = 'lane_summary';
    CREATE INDEX records_ore_analysis ON records (ts) WHERE type = 'ore_analysis';
    CREATE INDEX records_identification ON records (ts) WHERE type = 'identification';
    """,
    # v3 (SQLite's v6): records quarantined as suspect (an implausible seq jump), kept whole, out of records, gaps
    # and verify
    f"""
    CREATE TABLE suspect ({_RECORD_COLUMNS},
        batch  TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX suspect_by_seq ON suspect (device_id, seq);
    ALTER TABLE devices ADD COLUMN suspect BIGINT NOT NULL DEFAULT 0;
    """,
    # v4 (SQLite's v7): the signatures of batches verified on arrival, with the (seq, chain hash) pairs each covers
    """
    CREATE TABLE signatures (
        device_id   TEXT             NOT NULL,
        batch       TEXT             NOT NULL,
        sig         TEXT             NOT NULL,
        hashes      TEXT             NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (device_id, batch, sig)
    );
    """,
]


def _connect(dsn: str, *, writer: bool = True) -> Any:
    import psycopg  # an optional dependency: `pip install 'customs-edge[postgres]'`

    try:
        db = psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="customs-edge-hub")
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to the hub database ({str(exc).strip().splitlines()[0]}): check the"
                         " PostgreSQL URL given with --db (postgresql://USER@HOST:PORT/DBNAME)") from None
    # every transaction BEGINs READ COMMITTED, whatever the server's or database's default: store() compares under
    # the device locks, so each statement must see what the worker it waited for committed (a snapshot taken at the
    # lock statement, as REPEATABLE READ and SERIALIZABLE take it, misses that worker's rows)
    db.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    # acks follow a durable commit: with synchronous_commit off (a server, database or role setting) COMMIT returns
    # before the WAL is flushed and a crash of the server loses acked records. Turned back on for this session; the
    # other settings (local, remote_write, remote_apply) flush locally at least and are kept
    try:
        if writer and db.execute("SHOW synchronous_commit").fetchone() == ("off",):
            db.execute("SET synchronous_commit = on")
            log.warning("synchronous_commit is off for the hub database %s: turned on for the hub's sessions (an"
                        " acked record must survive a crash of the server)", redact(dsn))
    except psycopg.Error as exc:
        db.close()
        raise StoreError(f"cannot set up a session on the hub database ({str(exc).strip().splitlines()[0]})") from None
    return db


def redact(dsn: str) -> str:
    """The URL without its password, for messages and logs."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:
        return "(an unreadable conninfo)"
    if "password" in parts:
        parts["password"] = "***"
    return make_conninfo("", **parts)


class PgHubStore:
    def __init__(self, dsn: str, *, readonly: bool = False, max_seq_jump: int = MAX_SEQ_JUMP) -> None:
        self.dsn = dsn
        self.max_seq_jump = max_seq_jump
        self.db = _connect(dsn, writer=not readonly)
        if readonly:
            self.db.execute("SET default_transaction_read_only = on")
            version = self._version()
            if version != len(SCHEMA):
                self.db.close()
                raise StoreError(f"{redact(dsn)} is not a hub database" if version == 0 else
                                 f"{redact(dsn)} has schema version {version}, this hub {len(SCHEMA)}: "
                                 + ("start the hub once to upgrade it" if version < len(SCHEMA)
                                    else "use a newer CLI"))
            return
        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            self.db.execute("CREATE TABLE IF NOT EXISTS hub_schema (version INTEGER NOT NULL)")
            version = self._version()
            if version > len(SCHEMA):
                raise StoreError(f"{redact(dsn)} has schema version {version}, this hub {len(SCHEMA)}:"
                                 " upgrade this hub")
            for v in range(version, len(SCHEMA)):
                self.db.execute(SCHEMA[v])
            self.db.execute("DELETE FROM hub_schema")
            self.db.execute("INSERT INTO hub_schema VALUES (%s)", (len(SCHEMA),))

    def _version(self) -> int:
        if self.db.execute("SELECT to_regclass('hub_schema')").fetchone()[0] is None:
            return 0
        row = self.db.execute("SELECT max(version) FROM hub_schema").fetchone()
        return int(row[0] or 0)

    def _reconnect(self) -> None:
        """After the server restarted or the connection broke: a new connection (the failed call raised)."""
        if self.db.closed or self.db.broken:
            self.db = _connect(self.dsn)

    def store(self, batches: Iterable[Incoming], refused: Mapping[str, int] | None = None) -> list[Stored]:
        """Store many batches in one transaction (group commit), with the counts of messages refused whole
        since the last call. Returns what to ack for each batch, in the order given, once committed.

        Set-based: a burst of many small batches (500 units sending a record each) costs a handful of
        statements, not a handful per batch: one lock statement, one read of what the database holds for every
        (device_id, seq) of the burst, one COPY per table and one upsert of the device counters."""
        self._reconnect()
        todo = list(batches)
        now = time.time()
        with self.db.transaction():
            devices = sorted({b.device_id for b in todo})
            if devices:
                self.db.execute("SELECT pg_advisory_xact_lock(hashtextextended(d, 0)) FROM unnest(%b::text[]) d",
                                (devices,))
            todo, suspect, resent = self._quarantine(todo, devices, now)
            held = self._held_all(todo)  # (device_id, seq) -> content, as committed
            burst: dict[tuple[str, int], list[Content]] = {}  # conflicts kept by this burst, per (device_id, seq)

            def held_in(table: str, device_id: str, rows: list[Row]) -> list[tuple[int, Content]]:
                if table == "records":
                    return [(r[0], held[(device_id, r[0])]) for r in rows if (device_id, r[0]) in held]
                return self._held(table, device_id, rows) + [
                    (seq, c) for seq in {r[0] for r in rows} for c in burst.get((device_id, seq), [])]

            parts = []
            later = Counter(b.device_id for b in todo)  # batches of each device still to classify
            for i, b in enumerate(todo):  # in arrival order, as the SQLite store: a later batch sees an earlier one's
                new, fresh, dup, first = classify(b, held_in)
                later[b.device_id] -= 1
                if later[b.device_id]:
                    held.update({(b.device_id, r[0]): r[1:] for r in new})
                for r in fresh:
                    burst.setdefault((b.device_id, r[0]), []).append(r[1:])
                parts.append((b, new, fresh, dup, first, suspect[i], resent[i]))
            self._copy("records", [(b.device_id, *r, now, *b.links.get(r[0], (None, None))) for b, new, *_ in parts
                                   for r in new])
            self._copy("conflicts", [(b.device_id, *r, now) for b, _, fresh, *_ in parts for r in fresh])
            rejected = [(b.device_id, r.seq, b.batch, r.reason, r.raw, now, *b.links.get(r.seq or 0, (None, None)))
                        for b in todo for r in b.rejected]
            if rejected:
                with self.db.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO rejected VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (device_id, seq)"
                        " DO UPDATE SET batch = excluded.batch, reason = excluded.reason, raw = excluded.raw,"
                        " received_at = excluded.received_at, prev = excluded.prev, h = excluded.h", rejected)
            sigs = [(b.device_id, b.batch, b.sig, signed_text(b), now) for b in todo if b.sig is not None]
            if sigs:
                with self.db.cursor() as cur:
                    cur.executemany("INSERT INTO signatures VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING", sigs)
            totals = self._count(parts, now)
            counts = sorted((k, n) for k, n in (refused or {}).items() if n)
            if counts:
                with self.db.cursor() as cur:
                    cur.executemany("INSERT INTO refused VALUES (%s, %s) ON CONFLICT (kind) DO UPDATE SET"
                                    " batches = refused.batches + excluded.batches", counts)
        out = []
        # the device's conflicts as they stood after each batch
        for b, new, fresh, dup, first, sus, again in reversed(parts):
            out.append(stored_result(b, new, fresh, dup, first, totals[b.device_id], sus, again))
            totals[b.device_id] -= len(fresh)
        return out[::-1]

    def _quarantine(self, batches: list[Incoming], devices: list[str], now: float
                    ) -> tuple[list[Incoming], list[list[int]], list[list[int]]]:
        """hub/store.py quarantine() of each batch, in arrival order, against its device's highest seq held (under
        this transaction's device locks) or named by an earlier batch of the burst; the suspect rows not held yet
        (new_suspects: in `suspect`, or kept by an earlier batch of the burst) kept in `suspect`. Returns the
        batches without them, each batch's newly quarantined seqs and its seqs quarantined before (a resend)."""
        known: dict[str, int] = {}
        if devices:
            known = {d: int(m) for d, m in self.db.execute(
                "SELECT device_id, max_seq FROM devices WHERE device_id = ANY(%b::text[])", (devices,)).fetchall()}
        out: list[Incoming] = []
        found: list[tuple[Incoming, list[Row], str]] = []
        for b in batches:
            b, suspect, why = quarantine(b, known.get(b.device_id, 0), self.max_seq_jump)
            known[b.device_id] = max(known.get(b.device_id, 0), highest_seq(b))
            out.append(b)
            found.append((b, suspect, why))
        keys = sorted({(b.device_id, r[0]) for b, suspect, _ in found for r in suspect})
        held: dict[str, list[tuple[int, Content]]] = {}
        if keys:  # what `suspect` holds for these seqs (committed: read under the device locks)
            for d, seq, ts, boot, mono, type_, prio, payload in self.db.execute(
                    "SELECT s.device_id, s.seq, s.ts, s.boot_id, s.mono, s.type, s.priority, s.payload FROM suspect s"
                    " JOIN unnest(%b::text[], %b::bigint[]) k(device_id, seq) ON s.device_id = k.device_id AND"
                    " s.seq = k.seq", ([d for d, _ in keys], [q for _, q in keys])):
                held.setdefault(d, []).append((int(seq), (ts, boot, mono, type_, prio, payload)))
        seen: dict[str, dict[int, set[Content]]] = {}
        kept: list[tuple[Any, ...]] = []
        seqs: list[list[int]] = []
        resent: list[list[int]] = []
        for b, suspect, why in found:
            keep, again = new_suspects(suspect, held.pop(b.device_id, []), seen.setdefault(b.device_id, {}))
            kept += [(b.device_id, *r, now, b.batch, why) for r in keep]
            seqs.append([r[0] for r in keep])
            resent.append(again)
        if kept:
            with self.db.cursor() as cur:
                cur.executemany("INSERT INTO suspect VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", kept)
        return out, seqs, resent

    def _held_all(self, batches: list[Incoming]) -> dict[tuple[str, int], Content]:
        """(device_id, seq) -> content of every row `records` holds for a seq of these batches. A device whose seqs
        are dense, as an agent's batches are, is read by its range (one index descent, two numbers sent); the
        others by their keys."""
        wanted: dict[str, set[int]] = {}
        for b in batches:
            wanted.setdefault(b.device_id, set()).update(r[0] for r in b.rows)
        spans: list[tuple[str, int, int]] = []
        keys: list[tuple[str, int]] = []
        for d, seqs in sorted(wanted.items()):
            if seqs and max(seqs) - min(seqs) < 2 * len(seqs):
                spans.append((d, min(seqs), max(seqs)))
            else:
                keys += sorted((d, q) for q in seqs)
        cols = "r.device_id, r.seq, r.ts, r.boot_id, r.mono, r.type, r.priority, r.payload"
        rows: list[tuple[Any, ...]] = []
        if spans:
            rows += self.db.execute(
                f"SELECT {cols} FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) k(device_id, lo, hi) JOIN records r"
                " ON r.device_id = k.device_id AND r.seq BETWEEN k.lo AND k.hi",
                ([d for d, _, _ in spans], [lo for _, lo, _ in spans], [hi for *_, hi in spans])).fetchall()
        if keys:
            rows += self.db.execute(
                f"SELECT {cols} FROM records r JOIN unnest(%b::text[], %b::bigint[]) k(device_id, seq) ON"
                " r.device_id = k.device_id AND r.seq = k.seq", ([d for d, _ in keys], [q for _, q in keys])).fetchall()
        return {(d, seq): (ts, boot, mono, type_, prio, payload)
                for d, seq, ts, boot, mono, type_, prio, payload in rows if seq in wanted[d]}

    def _copy(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        """Rows of several devices into `records` (with prev and h) or `conflicts` in one binary COPY: the
        values travel as they are (a float's every bit), with no SQL to parse per row. Constraints hold as for
        an INSERT: a second row for a (device_id, seq) or a non-finite number fails the transaction."""
        if not rows:
            return
        links = table == "records"
        cols = "device_id, seq, ts, boot_id, mono, type, priority, payload, received_at" + (", prev, h" * links)
        with self.db.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(_COPY_TYPES + (["text", "text"] if links else []))
            for row in rows:
                cp.write_row(row)

    def _count(self, parts: list[tuple[Incoming, list[Row], list[Row], int, dict[int, Content], list[int], list[int]]],
               now: float) -> dict[str, int]:
        """One upsert of every device's counters; returns each device's conflicts after it."""
        per: dict[str, list[int]] = {}
        for b, new, fresh, dup, _, sus, _ in parts:
            c = per.setdefault(b.device_id, [0, 0, 0, 0, 0, 0, 0])
            for k, v in enumerate((len(b.rows) + len(b.rejected), dup, len(fresh), len(b.rejected), len(new))):
                c[k] += v
            c[5] = max(c[5], highest_seq(b))
            c[6] += len(sus)
        if not per:
            return {}
        devices = sorted(per)  # row locks in device order
        cols = list(zip(*(per[d] for d in devices), strict=True))
        rows = self.db.execute(
            "INSERT INTO devices AS d (device_id, received, duplicates, conflicts, rejected, stored, max_seq,"
            " suspect, first_seen, last_seen) SELECT u.*, %s, %s FROM unnest(%b::text[], %b::bigint[], %b::bigint[],"
            " %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[]) u ON CONFLICT (device_id) DO"
            " UPDATE SET received = d.received + excluded.received, duplicates = d.duplicates + excluded.duplicates,"
            " conflicts = d.conflicts + excluded.conflicts, rejected = d.rejected + excluded.rejected,"
            " stored = d.stored + excluded.stored, max_seq = greatest(d.max_seq, excluded.max_seq),"
            " suspect = d.suspect + excluded.suspect, last_seen = excluded.last_seen RETURNING device_id, conflicts",
            (now, now, devices, *[list(c) for c in cols])).fetchall()
        return {d: int(n) for d, n in rows}

    def _held(self, table: str, device_id: str, rows: list[Row]) -> list[tuple[int, Content]]:
        """(seq, content) of every row `table` holds for these rows' seqs."""
        seqs = sorted({r[0] for r in rows})
        cur = self.db.execute("SELECT seq, ts, boot_id, mono, type, priority, payload FROM " + table +
                              " WHERE device_id = %s AND seq = ANY(%b::bigint[])", (device_id, seqs))
        return [(seq, (ts, boot, mono, type_, prio, payload)) for seq, ts, boot, mono, type_, prio, payload in cur]

    def set_status(self, device_id: str, status: str, unit_type: str | None = None, site: str | None = None) -> None:
        """A unit's state from its retained status; its type and site when the status names them (a will
        does not: the last known ones stay)."""
        self._reconnect()
        self.db.execute(
            "INSERT INTO devices AS d (device_id, status, first_seen, last_seen, unit_type, site)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (device_id) DO UPDATE SET status = excluded.status,"
            " unit_type = coalesce(excluded.unit_type, d.unit_type), site = coalesce(excluded.site, d.site)",
            (device_id, status, time.time(), time.time(), unit_type, site))

    def put_health(self, messages: Iterable[tuple[str, float, str]], refused: Mapping[str, int]) -> int:
        """Keep health messages (device_id, the unit's ts, payload) and count refused ones per device, in one
        transaction; a message already held (the retained copy every worker gets at its subscribe) is kept once.
        Returns how many were new here."""
        self._reconnect()
        now = time.time()
        new = 0
        per: dict[str, list[tuple[float, str]]] = {}  # each device's messages, in arrival order
        for device_id, ts, payload in messages:
            per.setdefault(device_id, []).append((ts, payload))
        counts = {d: n for d, n in refused.items() if n}
        with self.db.transaction():
            # one pass in device order, a device's refused count with its messages: every row of one device locked
            # before the next device's, as store() locks them (a second pass for the counts locked device a after
            # b, while a worker storing a's and b's records held a and waited for b: a deadlock)
            for device_id in sorted(per.keys() | counts.keys()):
                for ts, payload in per.get(device_id, []):
                    if self.db.execute("INSERT INTO health (device_id, ts, received_at, payload) VALUES"
                                       " (%s, %s, %s, %s) ON CONFLICT (device_id, ts) DO NOTHING RETURNING id",
                                       (device_id, ts, now, payload)).fetchone() is None:
                        continue
                    new += 1
                    self.db.execute("DELETE FROM health WHERE device_id = %s AND id <= (SELECT id FROM health WHERE"
                                    " device_id = %s ORDER BY id DESC LIMIT 1 OFFSET %s)",
                                    (device_id, device_id, _sqlite.HEALTH_KEPT))
                    self.db.execute("INSERT INTO devices (device_id, first_seen, last_seen) VALUES (%s, %s, %s)"
                                    " ON CONFLICT (device_id) DO UPDATE SET last_seen = excluded.last_seen",
                                    (device_id, now, now))
                if device_id in counts:
                    self.db.execute("INSERT INTO devices AS d (device_id, health_refused, first_seen) VALUES"
                                    " (%s, %s, %s) ON CONFLICT (device_id) DO UPDATE SET"
                                    " health_refused = d.health_refused + excluded.health_refused",
                                    (device_id, counts[device_id], now))
        return new

    def health_history(self, device_id: str, limit: int = HEALTH_KEPT + 1) -> list[tuple[float, str]]:
        """(received_at, payload) of a device's health messages, newest first."""
        return [(r[0], r[1]) for r in self.db.execute(
            "SELECT received_at, payload FROM health WHERE device_id = %s ORDER BY id DESC LIMIT %s",
            (device_id, limit))]

    def fleet(self) -> list[FleetRow]:
        rows = self.db.execute(
            "SELECT d.device_id, d.status, d.last_seen, d.health_refused, (SELECT payload FROM health h WHERE"
            " h.device_id = d.device_id ORDER BY id DESC LIMIT 1) FROM devices d ORDER BY d.device_id COLLATE \"C\""
        ).fetchall()
        return [FleetRow(d, status, seen, payload, int(refused)) for d, status, seen, refused, payload in rows]

    def stats(self) -> list[DeviceStats]:
        rows = self.db.execute(
            "SELECT device_id, received, duplicates, conflicts, rejected, stored, max_seq, last_seen, status,"
            " (SELECT count(*) FROM rejected r WHERE r.device_id = d.device_id AND r.seq IS NOT NULL AND NOT EXISTS"
            "  (SELECT 1 FROM records x WHERE x.device_id = r.device_id AND x.seq = r.seq)), suspect"
            " FROM devices d ORDER BY device_id COLLATE \"C\"").fetchall()
        return [DeviceStats(d, int(rcv), int(dup), int(cf), int(rj), int(st), int(mx),
                            max(0, int(mx) - int(st) - int(rj_seqs)), seen, status, int(sus))
                for d, rcv, dup, cf, rj, st, mx, seen, status, rj_seqs, sus in rows]

    def refused(self) -> dict[str, int]:
        """Records messages refused whole, by kind (malformed, device_mismatch, store_failed)."""
        return {k: int(n) for k, n in self.db.execute(
            "SELECT kind, batches FROM refused ORDER BY kind COLLATE \"C\"").fetchall()}

    def gap_ranges(self, device_id: str, limit: int = 20) -> list[tuple[int, int]]:
        """Seq ranges below the highest seq received that the hub never received (neither stored nor rejected)."""
        rows = self.db.execute(
            "SELECT prev + 1, seq - 1 FROM (SELECT seq, coalesce(lag(seq) OVER (ORDER BY seq), 0) AS prev FROM"
            " (SELECT seq FROM records WHERE device_id = %(d)s UNION SELECT seq FROM rejected WHERE device_id = %(d)s"
            " AND seq IS NOT NULL) s) w WHERE seq > prev + 1 ORDER BY seq LIMIT %(n)s",
            {"d": device_id, "n": limit}).fetchall()
        return [(int(a), int(b)) for a, b in rows]

    def verify(self, device_id: str, key: Ed25519PublicKey | None = None, all_signed: bool = False) -> Verdict:
        """As hub/store.py HubStore.verify: walk the device's chain from seq 1, then with the device's registered
        key check the kept batch signatures (one transaction, one snapshot)."""
        v = Verdict(device_id)
        runs: dict[int, tuple[int, str | None, str]] = {}
        with self.db.transaction():
            self.db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            for (payload,) in self.db.execute("SELECT payload FROM records WHERE device_id = %s AND type = %s",
                                              (device_id, TOMBSTONE_TYPE)):
                for lo, hi, prev, last in json.loads(payload).get("runs", []):
                    runs[lo] = (hi, prev, last)
            (max_seq,) = self.db.execute("SELECT coalesce(max(max_seq), 0) FROM devices WHERE device_id = %s",
                                         (device_id,)).fetchone()
            with self.db.cursor(name="verify") as cur:  # server-side: a long history is not loaded at once
                cur.itersize = 5000
                cur.execute(
                    "SELECT seq, ts, type, priority, payload, prev, h, 1 FROM records WHERE device_id = %(d)s"
                    " UNION ALL SELECT seq, 0, '', 0, '', prev, h, 0 FROM rejected r WHERE device_id = %(d)s AND seq"
                    " IS NOT NULL AND NOT EXISTS (SELECT 1 FROM records x WHERE x.device_id = %(d)s AND"
                    " x.seq = r.seq) ORDER BY seq", {"d": device_id})
                v = walk_chain(v, runs, cur, int(max_seq))
            if key is None or v.bad_seq is not None:
                return v
            with self.db.cursor(name="sigs") as sigs, self.db.cursor(name="chained") as cur:  # server-side
                sigs.itersize, cur.itersize = 50, 20000
                sigs.execute("SELECT batch, sig, hashes FROM signatures WHERE device_id = %s", (device_id,))
                cur.execute("SELECT seq FROM records WHERE device_id = %s AND prev IS NOT NULL ORDER BY seq",
                            (device_id,))
                return check_signatures(v, key, sigs, lambda lo, hi: {int(q): h for q, h in self.db.execute(
                    "SELECT seq, h FROM records WHERE device_id = %s AND seq BETWEEN %s AND %s AND h IS NOT NULL",
                    (device_id, lo, hi))}, (int(q) for (q,) in cur), all_signed)

    def close(self) -> None:
        self.db.close()

