"""The hub's end-to-end guarantee, seen from both sides of it: an ack is published only after the transaction
holding its batch has committed (a reader on another connection already sees every record it names), each
device's batches are acked in the order they came, and a batch the store refuses is never acked. Whatever
overlaps the hub's stages (hub/service.py; bench/hub_overlap.py measured such designs) must keep these."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from customs_edge.core.mqtt import MqttLink
from customs_edge.hub.brokers import Mosquitto
from customs_edge.hub.intake import Incoming
from customs_edge.hub.store import Stored
from tests.conftest import wait_for
from tests.fleet import HubThread, hub_seqs, rec, records_msg
from tests.test_hub_parser import bulk
from tests.test_hub_service import Operator

pytestmark = pytest.mark.broker

PREFIX = "customs-edge/v1"


class Recorded:
    """The hub with its store's commits and its links' publishes written to one log, in the order they happen."""

    def __init__(self, port: int, db: Path, fail_device: str | None = None, parse_process: bool = False) -> None:
        self.hub = HubThread(port, db, client_id="hub-order", parse_process=parse_process)
        self.log: list[tuple[str, str, str]] = []  # ("committed" | "published", device_id, batch)
        self.lock = threading.Lock()
        store = self.hub.hub.store
        real_store = store.store

        def recorded_store(batches: Iterable[Incoming], refused: Mapping[str, int] | None = None) -> list[Stored]:
            batches = list(batches)
            if fail_device is not None and any(b.device_id == fail_device for b in batches):
                raise sqlite3.OperationalError("disk I/O error (the test's)")
            out = real_store(batches, refused)  # returns once COMMIT has
            with self.lock:
                self.log += [("committed", b.device_id, b.batch) for b in batches]
            return out

        store.store = recorded_store  # type: ignore[method-assign]
        for link in (self.hub.hub.link, self.hub.hub.lane):
            assert link is not None
            self._record_publishes(link)

    def _record_publishes(self, link: MqttLink) -> None:
        real_publish = link.publish

        def recorded_publish(topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int:
            if topic.endswith("/ack"):
                with self.lock:
                    self.log.append(("published", topic.split("/")[-2], json.loads(payload)["batch"]))
            return real_publish(topic, payload, qos=qos, retain=retain)

        link.publish = recorded_publish  # type: ignore[method-assign]

    def events(self, kind: str) -> list[tuple[str, str]]:
        with self.lock:
            return [(d, b) for k, d, b in self.log if k == kind]


@pytest.mark.parametrize("parse_process", [False, True], ids=["parse-in-worker", "parse-process"])
def test_an_ack_never_precedes_the_commit_of_its_batch(tmp_path: Path, mosquitto: Mosquitto,
                                                       parse_process: bool) -> None:
    db = tmp_path / "hub.db"
    hub = Recorded(mosquitto.port, db, parse_process=parse_process)
    hub.hub.start()
    op = Operator(mosquitto.port)
    unseen: list[tuple[str, int]] = []  # acked records a reader on its own connection did not find at the ack

    def on_ack(_c: Any, _u: Any, m: Any) -> None:
        device_id, ack = m.topic.split("/")[-2], json.loads(m.payload)
        held = set(hub_seqs(db, device_id)[0])
        unseen.extend((device_id, s) for lo, hi in ack["ranges"] for s in range(lo, hi + 1) if s not in held)
        op.got.append((m.topic, bytes(m.payload), bool(m.retain)))

    op.c.on_message = on_ack
    try:
        op.sub(f"{PREFIX}/+/ack")
        sent: dict[str, list[str]] = {}
        for k in range(4):  # bulk batches of three devices, interleaved, and alert batches on the lane
            for d in ("dev-a", "dev-b", "dev-c"):
                op.c.publish(f"{PREFIX}/{d}/records", bulk(d, k), 1)  # over the parse process's MIN_BYTES
                sent.setdefault(d, []).append(f"{d}-{k}")
            if k < 2:
                op.c.publish(f"{PREFIX}/dev-z/alerts", records_msg("dev-z", f"dev-z-{k}", [rec(k + 1, prio=3)]), 1)
                sent.setdefault("dev-z", []).append(f"dev-z-{k}")
        total = sum(map(len, sent.values()))
        wait_for(lambda: len(op.got) >= total, 20, f"{total} acks")
        published = hub.events("published")
        assert sorted(published) == sorted((d, b) for d, bs in sent.items() for b in bs)  # each acked once
        with hub.lock:
            log = list(hub.log)
        for i, (kind, d, b) in enumerate(log):
            if kind == "published":
                assert ("committed", d, b) in log[:i], f"ack of {b} published before its commit: {log}"
        for d, batches in sent.items():  # each device's batches acked in the order they were sent
            assert [b for dev, b in published if dev == d] == batches
        assert unseen == []
        parser = hub.hub.hub.parser
        assert (parser is not None and parser.parsed == 12) == parse_process  # the bulk batches parsed by the child
    finally:
        op.close()
        hub.hub.stop()


def test_a_batch_the_store_refuses_is_not_acked_and_the_others_are(tmp_path: Path, mosquitto: Mosquitto) -> None:
    db = tmp_path / "hub.db"
    hub = Recorded(mosquitto.port, db, fail_device="dev-bad")
    hub.hub.start()
    op = Operator(mosquitto.port)
    try:
        op.sub(f"{PREFIX}/+/ack")
        op.pub(f"{PREFIX}/dev-bad/records", records_msg("dev-bad", "bad-1", [rec(1), rec(2)]))
        op.pub(f"{PREFIX}/dev-ok/records", records_msg("dev-ok", "ok-1", [rec(1), rec(2)]))  # after it, in order
        wait_for(lambda: op.json(f"{PREFIX}/dev-ok/ack"), 20, "the good batch's ack")
        assert [a["ranges"] for a in op.json(f"{PREFIX}/dev-ok/ack")] == [[[1, 2]]]
        assert hub.hub.hub.refused["store_failed"] == 1  # counted, and in the store too
        assert hub.hub.hub.store.refused() == {"store_failed": 1}
        assert op.json(f"{PREFIX}/dev-bad/ack") == [] and ("dev-bad", "bad-1") not in hub.events("published")
        assert hub_seqs(db, "dev-bad") == ([], 0)
    finally:
        op.close()
        hub.hub.stop()


def test_with_the_alert_lane_what_the_hub_reads_ahead_of_its_store_stays_bounded(tmp_path: Path,
                                                                                  mosquitto: Mosquitto) -> None:
    """With the lane, a bulk store takes a slice of what was read (about BULK_TXN_S of the store's rate). Before, each
    step read on regardless: with a store slower than the link, the broker's whole backlog moved into the hub's
    memory (and out of the broker's queue, which keeps it across a hub crash)."""
    hub = HubThread(mosquitto.port, tmp_path / "hub.db", client_id="hub-bound")
    h = hub.hub
    assert h.lane is not None
    h.PENDING_MAX_BYTES = 256 * 1024  # type: ignore[misc]
    h.BULK_TXN_MIN_BYTES = 16 * 1024  # type: ignore[misc]
    held: list[int] = []  # bytes read and not yet stored, at each store
    real_store = h.store.store
    slow = threading.Event()

    def slow_store(batches: Iterable[Incoming], refused: Mapping[str, int] | None = None) -> list[Stored]:
        held.append(sum(len(p) for _, p in h._pending))
        slow.wait(0.02)  # a store slower than the link (a slow disk): the broker must keep the rest
        return real_store(batches, refused)

    h.store.store = slow_store  # type: ignore[method-assign]
    op = Operator(mosquitto.port)
    n, size = 240, 0
    try:
        hub.start()
        wait_for(h.ready.is_set, 10, "the hub subscribed")
        for i in range(n):
            msg = records_msg("dev-b", f"b{i}", [rec(i * 20 + k + 1, payload={"x": "y" * 2000}) for k in range(20)])
            size = len(msg)
            op.c.publish(f"{PREFIX}/dev-b/records", msg, qos=1)
        wait_for(lambda: len(hub_seqs(tmp_path / "hub.db", "dev-b")[0]) == n * 20, 60, "every record stored")
    finally:
        op.close()
        hub.stop()
    # one step reads at most BULK_READS packets past the bound
    assert held and max(held) <= h.PENDING_MAX_BYTES + h.BULK_READS * size, (max(held), n * size)
