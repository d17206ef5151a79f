"""A batch id holding a NUL character: PostgreSQL's text cannot keep one (SQLite's can), and the store keeps the batch
id of rejected and quarantined records. The hub refuses such a message whole at intake, on either store (a clear,
counted refusal): on PostgreSQL its insert failed the burst's transaction, so every burst holding it (the unit resends
it) fell back to one transaction per batch, and the batch was refused as `store_failed`, while SQLite stored it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from customs_edge.core.wire import Ack
from customs_edge.hub.service import Hub, HubConfig
from tests.fleet import rec, records_msg

PREFIX = "customs-edge/v1"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    h = Hub(HubConfig(port=1, db=tmp_path / "hub.db", postgres=url, max_seq_jump=1000))
    yield h
    h.store.close()


@pytest.mark.parametrize("records", [[rec(1), rec(2, boot="a\x00b")],  # a rejected record: its batch id is traced
                                     [rec(1), rec(5000)]],  # a quarantined one: its batch id is kept in `suspect`
                         ids=["rejected", "suspect"])
def test_a_nul_in_the_batch_id_is_refused_whole_on_either_store(hub: Hub, records: list[dict[str, Any]]) -> None:
    bad = records_msg("dev-n", "b\x00x", records)
    good = records_msg("dev-o", "ok", [rec(1)])
    outs = hub.handle([(f"{PREFIX}/dev-n/records", bad), (f"{PREFIX}/dev-o/records", good)])
    acks = [Ack.model_validate_json(o.payload) for o in outs]
    assert [a.batch for a in acks] == ["ok"] and acks[0].ranges == [(1, 1)]  # the other unit's batch, one transaction
    assert hub.refused == {"malformed": 1} and hub.store.refused() == {"malformed": 1}
    assert [d.device_id for d in hub.store.stats()] == ["dev-o"]
