"""A unit's stop (agent/sync.py `_await_acks`): the hub's acks for batches already sent are waited for, briefly, so
that what the hub stored leaves the outbox before the process ends instead of going again after the restart.
Against a scripted link (tests/fakes.py); the stop is set before run() starts, so run() does only its stop path."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from customs_edge.agent.sync import Sync
from customs_edge.core.mqtt import Message
from tests.fakes import FakeLink, MemOutbox
from tests.test_sync_machine import batch_of, connect, hub_ack, make

T_CMD = "customs-edge/v1/dev/cmd"


def stopped(sync: Sync) -> None:
    stop = threading.Event()
    stop.set()
    sync.run(stop)


def sent(tmp_path: Path, records: int) -> tuple[Sync, FakeLink, MemOutbox]:
    sync, link, ob = make(tmp_path, records)
    connect(sync, link)
    for p in link.batches():
        link.puback(p.mid)
    sync.step()
    return sync, link, ob


def test_the_hubs_acks_that_come_during_a_stop_delete_what_they_name(tmp_path: Path) -> None:
    """Two batches in flight when the unit stops; the hub's acks arrive after the stop began. Without the wait
    they were never read: 20 records stayed in the outbox to be sent again after the restart."""
    sync, link, ob = sent(tmp_path, 20)
    hub_ack(link, batch_of(link, 1), [(1, 10)])
    hub_ack(link, batch_of(link, 11), [(11, 20)])
    stopped(sync)
    assert ob.records == {} and len(link.batches()) == 2  # deleted, nothing sent again
    assert link.published[-1].topic.endswith("/status") and b'"offline"' in link.published[-1].payload


def test_a_stop_waits_for_nothing_when_nothing_is_in_flight_and_a_bounded_while_the_hub_is_silent(
        tmp_path: Path) -> None:
    sync, link, ob = make(tmp_path, 0)
    connect(sync, link)
    steps = link.steps
    stopped(sync)
    assert link.steps == steps  # no batch in flight: no wait at all
    sync, link, ob = sent(tmp_path, 5)
    steps = link.steps
    stopped(sync)  # the hub never answers: the stop still ends (the test's clock does not move: the step bound)
    assert 0 < link.steps - steps <= Sync.STOP_ACK_STEPS and len(ob.records) == 5  # kept for the next start


def test_a_command_during_the_stop_is_answered_not_run(tmp_path: Path) -> None:
    sync, link, ob = sent(tmp_path, 10)
    link.deliver(T_CMD, json.dumps({"v": 1, "id": "c1", "cmd": "ping", "ts": 1.7e9, "expires": 4e9}))
    link._next.append(Message(T_CMD, b'{"retained": "ignored"}', True))
    hub_ack(link, batch_of(link, 1), [(1, 10)])
    stopped(sync)
    replies = [json.loads(p.payload) for p in link.published if p.topic == T_CMD + "/reply"]
    assert replies == [{**replies[0], "id": "c1", "ok": False}] and "stopping" in replies[0]["error"]
    assert sync.stats.commands_refused == 1 and ob.records == {}
