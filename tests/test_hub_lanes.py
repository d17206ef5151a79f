"""Per-lane figures at the hub from the gate's records: confirmed rate and field PPV from fever_confirmation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from customs_edge.core.records import Pending
from customs_edge.core.wire import encode_batch
from customs_edge.hub import intake
from customs_edge.hub.lanes import lane_stats, wilson
from customs_edge.hub.storage import open_store
from tests.cmdtools import cli


def lane(device: str, screened: int, alerts: list[str], confirmations: list[tuple[str, bool, float]]
         ) -> list[tuple[str, str, dict[str, Any]]]:
    out = [(device, "screening", {"screening": f"s{i}"}) for i in range(screened)]
    out += [(device, "fever_alert", {"screening": a}) for a in alerts]
    out += [(device, "fever_confirmation", {"screening": s, "confirmed": ok, "at": at}) for s, ok, at in confirmations]
    return out


def test_lane_figures_from_alerts_and_confirmations() -> None:
    recs = lane("gate-01", 2000, ["a1", "a2", "a3", "a4", "a5"],
                [("a1", True, 1.0), ("a2", False, 2.0), ("a3", True, 3.0), ("a3", False, 4.0),  # re-measured
                 ("zz", True, 5.0)])  # an alert this hub does not hold
    recs += lane("gate-02", 10, [], [])
    a, b = lane_stats(recs)
    assert (a.device_id, a.screened, a.alerts, a.followed_up, a.confirmed, a.not_confirmed) == \
        ("gate-01", 2000, 5, 3, 1, 2)
    assert a.confirmations_unmatched == 1 and a.followed_up_share == 0.6
    assert a.confirmed_rate == 0.0005 and a.field_ppv == round(1 / 3, 4)
    assert a.field_ppv_ci95 == wilson(1, 3)
    assert b.alerts == 0 and b.field_ppv is None and b.field_ppv_ci95 is None and b.confirmed_rate == 0.0


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_hub_stats_lanes_reads_the_hub_database(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                request: pytest.FixtureRequest, backend: str) -> None:
    db = str(tmp_path / "hub.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = open_store(db)
    rows = [("gate-01", seq, "screening" if seq <= 8 else "fever_alert" if seq <= 10 else "fever_confirmation",
             {"screening": f"id{seq}"} if seq <= 10 else {"screening": "id9", "confirmed": True, "at": 1.0})
            for seq in range(1, 12)]
    recs = [Pending(s, 1.0, "b", float(s), t, 1, json.dumps(p)) for _, s, t, p in rows]
    store.store([intake.parse("customs-edge/v1/gate-01/records", encode_batch("gate-01", "b1", recs))])
    store.close()
    code, out, _ = cli(capsys, "hub", "stats", "--lanes", "--db", db, "--json")
    assert code == 0
    g = json.loads(out)["lanes"]["gate-01"]
    assert (g["screened"], g["alerts"], g["followed_up"], g["confirmed"], g["field_ppv"]) == (8, 2, 1, 1, 1.0)
    code, out, _ = cli(capsys, "hub", "stats", "--lanes", "--db", db)
    assert code == 0 and "gate-01" in out and "field PPV" in out
