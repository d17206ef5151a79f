"""`customs-edge hub fleet [--db F] [--json]`: every unit the hub knows, from its database, read-only.

One line per device, at most WIDTH columns: online/offline (the status the unit publishes, offline also
by its last will), when the hub last heard from it, its backlog and the age of its oldest unsent record,
drivers down of drivers and their faults, agent version, config hash and model versions (from its latest
health message). `--json` prints the same with the whole latest health message, for scripts.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from customs_edge.core import logs
from customs_edge.core.wire import Health
from customs_edge.hub.store import FleetRow, HubStore

WIDTH = 100
COLUMNS = [("device", 18, "<"), ("state", 7, "<"), ("seen", 5, ">"), ("backlog", 8, ">"), ("oldest", 6, ">"),
           ("drv down", 8, ">"), ("faults", 6, ">"), ("agent", 7, "<"), ("config", 8, "<"), ("models", 0, "<")]


def age(seconds: float | None) -> str:
    """3 -> "3s", 150 -> "2m", 7300 -> "2h", 200000 -> "2d"; None -> "-"."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _latest(row: FleetRow) -> Health | None:
    return Health.model_validate_json(row.health) if row.health else None


def cells(row: FleetRow, now: float) -> list[str]:
    h = _latest(row)
    down = [role for role, d in h.drivers.items() if not d.up] if h else []
    return [logs.escape(row.device_id), logs.escape(row.status or "-"),
            age(None if row.last_seen is None else now - row.last_seen),
            str(h.outbox_pending) if h else "-", age(h.oldest_unsent_age_s) if h else "-",
            f"{len(down)}/{len(h.drivers)}" if h else "-",
            str(sum(d.faults for d in h.drivers.values())) if h else "-",
            logs.escape(h.agent_version) if h else "-", h.config_hash[:8] if h else "-",
            ",".join(f"{logs.escape(n)}@{logs.escape(v)}" for n, v in sorted(h.models.items())) if h else "-"]


def table(rows: list[FleetRow], now: float) -> list[str]:
    def line(values: list[str]) -> str:
        used = sum(w + 1 for _, w, _ in COLUMNS[:-1])
        parts = [f"{_fit(v, w or WIDTH - used):{a}{w}}" for v, (_, w, a) in zip(values, COLUMNS, strict=True)]
        return " ".join(parts).rstrip()

    return [line([name for name, _, _ in COLUMNS])] + [line(cells(r, now)) for r in rows]


def as_json(rows: list[FleetRow], now: float) -> dict[str, Any]:
    return {"now": now, "devices": {r.device_id: {**asdict(r), "health": json.loads(r.health) if r.health else None}
                                    for r in rows}}


def cmd_fleet(db: str, want_json: bool) -> int:
    store = HubStore(db, readonly=True)  # a mistyped --db is an error, never a new empty database
    try:
        rows, now = store.fleet(), time.time()
    finally:
        store.close()
    if want_json:
        print(json.dumps(as_json(rows, now), indent=2))
    else:
        print("\n".join(table(rows, now)))
    return 0
