"""Per-lane screening figures from the records a hub stores: how many fever alerts were followed up with a
clinical thermometer, how many were confirmed, and from those the field PPV (`customs-edge hub stats --lanes`).

Reads the gate's `screening`, `fever_alert` and `fever_confirmation` records (docs/gate.md) of each device
(one device = one lane). Figures per lane:
  screened          screening records
  alerts            fever_alert records
  followed_up       alerts with a fever_confirmation (an officer measured again), and its share of alerts
  confirmed         confirmations at or above the unit's confirm_fever_c (38.0 °C by default)
  confirmed_rate    confirmed / screened: the febrile travellers the lane found (Lianyungang reported
                    0.35 % alarms and 0.15 % confirmed)
  field_ppv         confirmed / followed_up, with its 95 % Wilson interval: the share of alarms that are
                    fevers, measured in the field rather than assumed from a prevalence
A screening confirmed twice counts once (the last confirmation by `at`). Unconfirmed alerts are reported,
never guessed: the PPV is computed over followed-up alerts only.

The figures are computed from records (`lane_stats`), so they do not depend on how a store keeps them;
`gate_records` reads them from the hub's database, SQLite or PostgreSQL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

GATE_TYPES = ("screening", "fever_alert", "fever_confirmation")


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """95 % Wilson score interval for a proportion (Wilson 1927); None when n == 0."""
    if n <= 0:
        return None
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


@dataclass
class LaneStats:
    device_id: str
    screened: int = 0
    alerts: int = 0
    followed_up: int = 0
    confirmed: int = 0
    not_confirmed: int = 0
    confirmations_unmatched: int = 0  # for a screening whose alert this hub does not hold (yet)
    followed_up_share: float | None = None
    confirmed_rate: float | None = None
    field_ppv: float | None = None
    field_ppv_ci95: tuple[float, float] | None = None
    _alert_ids: set[str] = field(default_factory=set, repr=False)
    _confirm: dict[str, tuple[float, bool]] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def lane_stats(records: Iterable[tuple[str, str, dict[str, Any]]]) -> list[LaneStats]:
    """(device_id, type, payload) of gate records -> one LaneStats per device, sorted by device."""
    lanes: dict[str, LaneStats] = {}
    for device, rtype, p in records:
        lane = lanes.setdefault(device, LaneStats(device))
        if rtype == "screening":
            lane.screened += 1
        elif rtype == "fever_alert":
            lane.alerts += 1
            if isinstance(p.get("screening"), str):
                lane._alert_ids.add(p["screening"])
        elif rtype == "fever_confirmation" and isinstance(p.get("screening"), str):
            at = p.get("at")
            at = float(at) if isinstance(at, int | float) else 0.0
            prev = lane._confirm.get(p["screening"])
            if prev is None or at >= prev[0]:
                lane._confirm[p["screening"]] = (at, bool(p.get("confirmed")))
    for lane in lanes.values():
        matched = {k: v for k, v in lane._confirm.items() if k in lane._alert_ids}
        lane.confirmations_unmatched = len(lane._confirm) - len(matched)
        lane.followed_up = len(matched)
        lane.confirmed = sum(1 for _, ok in matched.values() if ok)
        lane.not_confirmed = lane.followed_up - lane.confirmed
        lane.followed_up_share = round(lane.followed_up / lane.alerts, 4) if lane.alerts else None
        lane.confirmed_rate = round(lane.confirmed / lane.screened, 6) if lane.screened else None
        lane.field_ppv = round(lane.confirmed / lane.followed_up, 4) if lane.followed_up else None
        lane.field_ppv_ci95 = wilson(lane.confirmed, lane.followed_up)
    return [lanes[k] for k in sorted(lanes)]


def gate_records(db: Any) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """The gate records of a hub database (`records`; a sqlite3 or psycopg connection: the query has no
    parameters), payloads parsed; unparseable ones skipped."""
    kinds = ",".join(f"'{t}'" for t in GATE_TYPES)  # constants of this module
    for device, rtype, payload in db.execute(f"SELECT device_id, type, payload FROM records WHERE type IN ({kinds})"):
        try:
            p = json.loads(payload)
        except (TypeError, ValueError):
            continue
        if isinstance(p, dict):
            yield device, rtype, p
