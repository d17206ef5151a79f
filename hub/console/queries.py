"""What the console reads from the hub's database: opened read-only (the hub is its only writer), one
connection per server thread. Every query here is served by an index (hub/store.py schema v5), so the
alerts page costs the same with 10^3 or 10^6 records stored."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from customs_edge.hub.storage import is_postgres

CHOICES_TTL_S = 30.0
SILENT_AFTER_S = 300.0  # a unit heard from longer ago than this stands out on the fleet page
INDEXED = ("lot_report", "lane_summary", "ore_analysis", "identification")  # each with its partial index records_<kind>


@dataclass(frozen=True)
class AlertRow:
    device_id: str
    seq: int
    ts: float  # the unit's clock
    type: str
    payload: dict[str, Any]
    received_at: float
    unit_type: str | None
    site: str | None

    @property
    def key(self) -> tuple[str, int]:
        return self.device_id, self.seq


@dataclass(frozen=True)
class Filters:
    site: str | None = None
    unit_type: str | None = None
    device: str | None = None
    kind: str | None = None
    state: str | None = None  # new / acknowledged / disposed: applied by the caller (the console's own file)


ALERT_WHERE = "(r.priority = 3 OR r.type = 'driver_fault')"  # the partial index records_alerts' condition


class HubReader:
    """The hub's store read-only: a SQLite file or a PostgreSQL URL (hub/store_pg.py's schema mirrors the
    SQLite one, partial indexes included); the queries are written once, with `?` placeholders."""

    def __init__(self, target: str | Path) -> None:
        self.target = str(target)
        self.postgres = is_postgres(self.target)
        self._health_order = "id" if self.postgres else "rowid"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._choices: tuple[float, dict[str, list[str]] | None] = (0.0, None)

    @property
    def db(self) -> _Db:
        db: _Db | None = getattr(self._local, "db", None)
        if db is None:
            if self.postgres:
                db = _PgDb(self.target)
            else:
                con = sqlite3.connect(Path(self.target).resolve().as_uri() + "?mode=ro", uri=True,
                                      isolation_level=None, check_same_thread=False)
                con.execute("PRAGMA busy_timeout=5000")
                db = con
            self._local.db = db
        return db

    def alerts(self, f: Filters, *, limit: int = 100, after: float | None = None,
               before: float | None = None) -> list[AlertRow]:
        sql = [f"SELECT r.device_id, r.seq, r.ts, r.type, r.payload, r.received_at, d.unit_type, d.site FROM records r"
               f" LEFT JOIN devices d ON d.device_id = r.device_id WHERE {ALERT_WHERE}"]
        args: list[Any] = []
        for cond, value in (("r.device_id = ?", f.device), ("r.type = ?", f.kind), ("d.site = ?", f.site),
                            ("d.unit_type = ?", f.unit_type), ("r.received_at > ?", after),
                            ("r.received_at < ?", before)):
            if value is not None and value != "":
                sql.append(f"AND {cond}")
                args.append(value)
        sql.append("ORDER BY r.received_at DESC LIMIT ?")
        args.append(limit)
        return [AlertRow(d, s, ts, t, _obj(p), rcv, ut, site)
                for d, s, ts, t, p, rcv, ut, site in self.db.execute(" ".join(sql), args)]

    def alert(self, device_id: str, seq: int) -> AlertRow | None:
        rows = self.db.execute(
            "SELECT r.device_id, r.seq, r.ts, r.type, r.payload, r.received_at, d.unit_type, d.site FROM records r"
            f" LEFT JOIN devices d ON d.device_id = r.device_id WHERE r.device_id = ? AND r.seq = ? AND {ALERT_WHERE}",
            (device_id, seq)).fetchall()
        if not rows:
            return None
        d, s, ts, t, p, rcv, ut, site = rows[0]
        return AlertRow(d, s, ts, t, _obj(p), rcv, ut, site)

    def record(self, device_id: str, seq: int, kind: str) -> AlertRow | None:
        """One record of a kind, by its identity."""
        rows = self.db.execute(
            "SELECT r.device_id, r.seq, r.ts, r.type, r.payload, r.received_at, d.unit_type, d.site FROM records r"
            " LEFT JOIN devices d ON d.device_id = r.device_id WHERE r.device_id = ? AND r.seq = ? AND r.type = ?",
            (device_id, seq, kind)).fetchall()
        if not rows:
            return None
        d, s, ts, t, p, rcv, ut, site = rows[0]
        return AlertRow(d, s, ts, t, _obj(p), rcv, ut, site)

    def choices(self) -> dict[str, list[str]]:
        """The values the alert filters offer: sites, unit types, devices, kinds; read again after CHOICES_TTL_S
        (the kinds walk every alert: ~0.1 s at 10^4 alerts, too much for every page)."""
        with self._lock:
            at, cached = self._choices
            if cached is not None and time.monotonic() - at < CHOICES_TTL_S:
                return cached
        fresh = self._read_choices()
        with self._lock:
            self._choices = (time.monotonic(), fresh)
        return fresh

    def _read_choices(self) -> dict[str, list[str]]:
        devs = self.db.execute("SELECT device_id, unit_type, site FROM devices ORDER BY device_id").fetchall()
        kinds = [k for (k,) in self.db.execute(f"SELECT DISTINCT r.type FROM records r WHERE {ALERT_WHERE}"
                                                " AND r.received_at > 0 ORDER BY 1")]
        return {"site": sorted({s for _, _, s in devs if s}), "unit_type": sorted({t for _, t, _ in devs if t}),
                "device": [d for d, _, _ in devs], "kind": kinds}

    def latest_alert_at(self) -> float:
        row = self.db.execute(f"SELECT max(r.received_at) FROM records r WHERE {ALERT_WHERE}").fetchone()
        return float(row[0] or 0.0)

    def fleet(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT d.device_id, d.status, d.last_seen, d.unit_type, d.site, d.stored, (SELECT payload FROM health h"
            f" WHERE h.device_id = d.device_id ORDER BY {self._health_order} DESC LIMIT 1) FROM devices d"
            " ORDER BY d.device_id")
        out = []
        for device_id, status, seen, unit_type, site, stored, health in rows:
            out.append({"device_id": device_id, "status": status, "last_seen": seen, "unit_type": unit_type,
                        "site": site, "stored": stored, "health": _obj(health) if health else None})
        return out

    def series(self, kind: str, since: float, device: str | None = None, limit: int = 5000) -> list[AlertRow]:
        """Records of one of the console's indexed kinds (lot_report, lane_summary, ore_analysis) since a time
        on the unit's clock, oldest first."""
        sql = ("SELECT r.device_id, r.seq, r.ts, r.type, r.payload, r.received_at, d.unit_type, d.site FROM records r"
               f" LEFT JOIN devices d ON d.device_id = r.device_id WHERE r.type = {_kind(kind)} AND r.ts >= ?")
        args: list[Any] = [since]
        if device:
            sql += " AND r.device_id = ?"
            args.append(device)
        sql += " ORDER BY r.ts LIMIT ?"
        args.append(limit)
        return [AlertRow(d, s, ts, t, _obj(p), rcv, ut, site) for d, s, ts, t, p, rcv, ut, site in
                self.db.execute(sql, args)]

    def latest(self, kind: str, limit: int) -> list[AlertRow]:
        """The newest records of one of the console's indexed kinds, newest first."""
        return [AlertRow(d, s, ts, t, _obj(p), rcv, ut, site) for d, s, ts, t, p, rcv, ut, site in self.db.execute(
            "SELECT r.device_id, r.seq, r.ts, r.type, r.payload, r.received_at, d.unit_type, d.site FROM records r"
            f" LEFT JOIN devices d ON d.device_id = r.device_id WHERE r.type = {_kind(kind)} ORDER BY r.ts DESC"
            " LIMIT ?", (limit,))]

    def confirmations(self, since: float) -> list[AlertRow]:
        return [a for a in self.alerts(Filters(kind="fever_confirmation"), limit=10000) if a.ts >= since]


class _Db(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = ..., /) -> Any: ...


class _PgDb:
    """A read-only PostgreSQL connection that takes the SQLite queries' `?` placeholders."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.con = self._connect()

    def _connect(self) -> Any:
        import psycopg

        con = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10, application_name="customs-edge-console")
        con.execute("SET default_transaction_read_only = on")
        return con

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        import psycopg

        try:
            return self.con.execute(sql.replace("?", "%s"), tuple(args))
        except psycopg.OperationalError:
            if not self.con.broken:
                raise
            self.con = self._connect()  # the server restarted: once more, on a new connection
            return self.con.execute(sql.replace("?", "%s"), tuple(args))


def _kind(kind: str) -> str:
    """A kind as an SQL literal (the partial index is used only when the query names its kind literally)."""
    if kind not in INDEXED:
        raise ValueError(f"not an indexed kind: {kind!r}")
    return f"'{kind}'"


def _obj(text: str) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except ValueError:
        return {"_raw": text[:200]}
    return v if isinstance(v, dict) else {"value": v}
