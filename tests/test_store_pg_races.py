"""Hub workers racing on one PostgreSQL (hub/store_pg.py), each interleaving forced with a lock an admin connection
holds (or a worker's transaction left open), never hoped for: health messages and records of several devices never
deadlock; a worker that waited for another's device lock sees that worker's rows, whatever the server's default
isolation level; commits are durable before acks even where synchronous_commit was turned off; a status that meets a
broken connection costs the burst nothing else."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from customs_edge.core.records import Pending
from customs_edge.core.wire import encode_batch
from customs_edge.hub import intake
from customs_edge.hub import store as sqlite_store
from customs_edge.hub.store_pg import PgHubStore
from tests.conftest import wait_for

pytestmark = pytest.mark.postgres


def batch(seqs: list[int], device: str, batch_id: str = "b") -> intake.Incoming:
    recs = [Pending(s, 1.0, "boot-a", float(s), "t", 1, json.dumps({"s": s})) for s in seqs]
    return intake.parse(f"customs-edge/v1/{device}/records", encode_batch(device, batch_id, recs))


def waiting(admin: Any, st: PgHubStore) -> bool:
    """Whether the worker's backend waits for a lock."""
    row = admin.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                        (st.db.info.backend_pid,)).fetchone()
    return row is not None and row[0] == "Lock"


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # reported by the test
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_health_with_a_refused_count_never_deadlocks_a_worker_storing_records(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """put_health locks each device's row once, in device order, a refused count with its device's messages: a
    refused count for device a after b's message (a second pass) waited for a, held by a worker storing records
    of a and b that waited for b: a deadlock PostgreSQL broke by failing one of them."""
    monkeypatch.setattr(sqlite_store, "HEALTH_KEPT", 1)
    one, two = PgHubStore(pg_url), PgHubStore(pg_url)
    one.set_status("a", "online")
    one.put_health([("b", 1.0, "{}"), ("c", 1.0, "{}"), ("c", 2.0, "{}")], {})
    with psycopg.connect(pg_url, autocommit=True) as admin, psycopg.connect(pg_url) as holder:
        holder.execute("SELECT 1 FROM health WHERE device_id = 'c' FOR UPDATE")  # c's kept row: its trim waits
        health, h_out = in_thread(lambda: one.put_health([("b", 2.0, "{}"), ("c", 3.0, "{}")], {"a": 1}))
        wait_for(lambda: waiting(admin, one), 10, "the health worker waiting for the trim of c")
        records, r_out = in_thread(lambda: two.store([batch([1], "a"), batch([1], "b")]))
        wait_for(lambda: waiting(admin, two), 10, "the records worker waiting for device b")
        holder.commit()
        health.join(30)
        records.join(30)
    assert "error" not in h_out and "error" not in r_out, (h_out, r_out)
    assert h_out["result"] == 2 and [s.stored for s in r_out["result"]] == [1, 1]
    assert [(d.device_id, d.health_refused) for d in one.fleet()] == [("a", 1), ("b", 0), ("c", 0)]
    one.close()
    two.close()


@pytest.mark.parametrize("level", ["repeatable read", "serializable"])
def test_a_redelivery_waiting_for_the_device_lock_sees_the_first_workers_rows(pg_url: str, level: str) -> None:
    """The comparison under the device lock needs each statement's own snapshot (READ COMMITTED). With a server
    whose default is stricter (ALTER DATABASE ... SET default_transaction_isolation), the redelivery's snapshot
    was taken before it waited: it found nothing held, its insert broke the primary key, and a record already stored
    was refused (not acked) instead of counted a redelivery."""
    with psycopg.connect(pg_url, autocommit=True) as admin:
        dbname = admin.info.dbname
        admin.execute(f"ALTER DATABASE {dbname} SET default_transaction_isolation = '{level}'")
        first, second = PgHubStore(pg_url), PgHubStore(pg_url)
        b = batch([1, 2, 3], "d1")
        with first.db.transaction():  # the first worker's transaction, held open while the resend arrives
            (s1,) = first.store([b])
            again, out = in_thread(lambda: second.store([b]))
            wait_for(lambda: waiting(admin, second), 10, "the second worker waiting for the device lock")
        again.join(30)
    assert "error" not in out, out
    (s2,) = out["result"]
    assert (s1.stored, s2.stored, s2.duplicates, s2.ranges) == (3, 0, 3, [(1, 3)])
    (d,) = second.stats()
    assert (d.stored, d.duplicates, d.received) == (3, 3, 6)
    first.close()
    second.close()


def test_a_status_meeting_a_broken_connection_costs_neither_the_bursts_records_nor_its_counts(
        pg_url: str, tmp_path: Path) -> None:
    """A database restart or failover: the status message that meets the broken connection first raised out of the
    hub's handle(), so the burst's records went unstored and unacked (resent later) and its health messages and
    refusal counts were dropped uncounted. The status update is informational: it fails alone, counted."""
    from customs_edge.hub.service import Hub, HubConfig
    from tests.fleet import rec, records_msg

    hub = Hub(HubConfig(port=1, db=tmp_path / "hub.db", postgres=pg_url))
    prefix = "customs-edge/v1"
    status = json.dumps({"state": "online", "device_id": "u1", "ts": 1.0}).encode()
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (hub.store.db.info.backend_pid,))
    records = records_msg("u1", "b", [rec(1)]).encode()
    outs = hub.handle([(f"{prefix}/u1/status", status), (f"{prefix}/u1/records", records),
                       (f"{prefix}/u1/records", b"[")])
    assert [json.loads(o.payload)["batch"] for o in outs] == ["b"]
    assert hub.store.refused() == {"malformed": 1} and hub.store.stats()[0].stored == 1
    assert hub.refusals.counts["status_store_failed"] == 1
    hub.store.close()


def test_acks_wait_for_a_durable_commit_even_where_the_database_turned_synchronous_commit_off(pg_url: str) -> None:
    """An ack is sent once store() returned: with synchronous_commit off (a database or role setting, a common
    ingest tweak) COMMIT returns before the WAL is flushed, and a server crash loses records already acked. The hub's
    sessions turn it back on; a stronger setting (remote_apply, for a synchronous standby) is kept."""
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {admin.info.dbname} SET synchronous_commit = off")
        st = PgHubStore(pg_url)
        assert st.db.execute("SHOW synchronous_commit").fetchone() == ("on",)
        st.close()
        admin.execute(f"ALTER DATABASE {admin.info.dbname} SET synchronous_commit = remote_apply")
        st = PgHubStore(pg_url)
        assert st.db.execute("SHOW synchronous_commit").fetchone() == ("remote_apply",)
        st.close()
