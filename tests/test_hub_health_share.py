"""Health messages on the hub workers' shared subscription (real mosquitto, hub workers in this process): each health
message reaches one worker, so it is stored once and a refused one counted once across the workers; a persistent
session that still holds the plain health subscription of an earlier run drops it."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from customs_edge.hub.brokers import Mosquitto
from tests.conftest import wait_for
from tests.fleet import HubThread, subscribed_at_broker
from tests.test_health import PREFIX, health_msg
from tests.test_sync import Client

pytestmark = pytest.mark.broker

VALID = 8  # health messages of two units, then one malformed among them


def publish_health(op: Client) -> None:
    for i in range(VALID):
        if i == 3:
            op.pub(f"{PREFIX}/dev-a/health", b"{not json")
        device = "dev-a" if i % 2 else "dev-b"
        op.pub(f"{PREFIX}/{device}/health", health_msg(device, ts=1.7e9 + i).model_dump_json())


def drained(op: Client, hubs: list[HubThread]) -> None:
    """Every worker has handled what the broker handed it of the health messages published before: a status (plain,
    QoS 1: every worker gets it, after the messages queued for it before) is counted by each, then each worker is
    stopped, which ends the burst it was handling."""
    op.pub(f"{PREFIX}/probe/status", b"{barrier")
    wait_for(lambda: all(h.hub.refusals.counts["status_malformed"] for h in hubs), 10, "the status at each worker")
    for h in hubs:
        h.stop()


def deliver_health(op: Client, hubs: list[HubThread]) -> None:
    """publish_health() to the workers once the broker has their subscriptions, drained(); then all closed."""
    try:
        subscribed_at_broker(op, hubs)
        publish_health(op)
        drained(op, hubs)
    finally:
        op.close()
        for h in hubs:
            h.stop()


def sqlite_counts(dbs: list[Path]) -> tuple[int, int]:
    """Health rows and refused health messages counted, summed over the workers' SQLite files."""
    rows = refused = 0
    for db in dbs:
        with sqlite3.connect(db) as c:
            rows += c.execute("SELECT count(*) FROM health").fetchone()[0]
            refused += c.execute("SELECT coalesce(sum(health_refused), 0) FROM devices").fetchone()[0]
    return rows, refused


def earlier_run(port: int, client_id: str) -> None:
    """A persistent session left at the broker as a hub of the earlier code left it: health subscribed plainly."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=paho.MQTTv311)
    acks: list[int] = []
    c.on_subscribe = lambda _c, _u, mid, *_: acks.append(mid)
    c.connect("127.0.0.1", port)
    c.loop_start()
    _, mid = c.subscribe(f"{PREFIX}/+/health", 1)
    wait_for(lambda: mid in acks, 10, "the SUBACK")
    c.disconnect()
    c.loop_stop()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_each_health_message_reaches_one_worker_and_a_refused_one_is_counted_once(
        tmp_path: Path, mosquitto: Mosquitto, request: pytest.FixtureRequest, backend: str) -> None:
    """Three workers in one share group (each with a SQLite file of its own, or on one PostgreSQL): every worker
    received every health message, and a malformed one was counted three times."""
    pg: dict[str, Any] = {"postgres": request.getfixturevalue("pg_url")} if backend == "postgres" else {}
    dbs = [tmp_path / f"w{i}.db" for i in range(3)]
    hubs = [HubThread(mosquitto.port, db, client_id=f"hub-w{i}", **pg).start() for i, db in enumerate(dbs)]
    deliver_health(Client(mosquitto.port), hubs)
    assert sum((h.hub.health_refused for h in hubs), Counter()) == {"malformed": 1}
    if backend == "sqlite":
        assert sqlite_counts(dbs) == (VALID, 1)
        return
    import psycopg

    with psycopg.connect(pg["postgres"]) as c:
        assert c.execute("SELECT count(*), count(DISTINCT (device_id, ts)) FROM health").fetchone() == (VALID, VALID)
        assert c.execute("SELECT sum(health_refused) FROM devices").fetchone() == (1,)


def test_a_plain_health_subscription_kept_from_an_earlier_run_is_dropped(tmp_path: Path,
                                                                        mosquitto: Mosquitto) -> None:
    """Persistent sessions (SQLite's default) that subscribed to health plainly in an earlier run keep that
    subscription at the broker: without dropping it each worker still got every health message."""
    for i in range(2):
        earlier_run(mosquitto.port, f"hub-w{i}")
    dbs = [tmp_path / f"w{i}.db" for i in range(2)]
    hubs = [HubThread(mosquitto.port, db, client_id=f"hub-w{i}").start() for i, db in enumerate(dbs)]
    assert not hubs[0].hub.link.clean_session
    deliver_health(Client(mosquitto.port), hubs)
    assert sum((h.hub.health_refused for h in hubs), Counter()) == {"malformed": 1}
    assert sqlite_counts(dbs) == (VALID, 1)


def test_a_retained_refused_health_message_is_not_counted_again_at_each_subscribe(tmp_path: Path,
                                                                                  mosquitto: Mosquitto) -> None:
    """The broker hands a retained health message to every worker at each subscribe: a refused one was counted by
    each worker at each start (2 workers, 2 starts: 4). Its retained copies are logged as their own cause, not
    counted in the store; the same message published live is counted once."""
    op = Client(mosquitto.port)
    op.c.publish(f"{PREFIX}/dev-a/health", b"{not json", qos=1, retain=True).wait_for_publish(5)
    dbs = [tmp_path / f"w{i}.db" for i in range(2)]
    try:
        for _start in range(2):
            hubs = [HubThread(mosquitto.port, db, client_id=f"hub-w{i}").start() for i, db in enumerate(dbs)]
            wait_for(lambda hubs=hubs: all(h.hub.refusals.counts["health_malformed_retained"] == 1 for h in hubs),
                     10, "the retained copy at each worker")
            subscribed_at_broker(op, hubs)
            drained(op, hubs)
            assert sum((h.hub.health_refused for h in hubs), Counter()) == {}
        assert sqlite_counts(dbs) == (0, 0)
        hubs = [HubThread(mosquitto.port, db, client_id=f"hub-w{i}").start() for i, db in enumerate(dbs)]
        subscribed_at_broker(op, hubs)
        op.pub(f"{PREFIX}/dev-a/health", b"{not json")  # live: one worker takes it and counts it
        drained(op, hubs)
    finally:
        op.c.publish(f"{PREFIX}/dev-a/health", b"", qos=1, retain=True).wait_for_publish(5)  # the retained copy gone
        op.close()
    assert sum((h.hub.health_refused for h in hubs), Counter()) == {"malformed": 1}
    assert sqlite_counts(dbs) == (0, 1)
