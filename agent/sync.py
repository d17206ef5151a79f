"""Sync: move records from the outbox to the hub, deleting them only on a real acknowledgement.

One thread runs `run()`: an explicit loop over the MQTT link's events (core/mqtt.py), nothing hidden.
The link connects, backs off and reconnects by itself; the sync reacts:
  - Connected: subscribe to our ack and cmd topics, publish a retained "online" status, and treat
    everything in flight as unsent (outbox.release()): it is sent again;
  - Lost: the same release; records still in flight are counted as resent;
  - connected: keep up to `window_batches` batches in flight; an Ack from the hub deletes exactly the
    ranges it names within the batch it names (ack_mode "hub"), its `rejected` ranges are handed to
    outbox.reject() (dead letters, counted), and whatever of the batch it covers neither way is sent
    again at once. In ack_mode "broker" a PUBACK deletes the batch instead, for sites whose own
    consumer replaces our hub (a broker crash can then lose records: see README);
  - a stop: no new batch; the hub's acks for the batches in flight are waited for up to STOP_ACK_WAIT_S (a
    command meanwhile is answered "stopping", not run), then a retained "offline" status;
  - a batch the broker has not even PUBACKed after `ack_timeout_s`: the link is presumed half-open; it
    is dropped and everything in flight is resent after reconnecting;
  - a batch the broker PUBACKed but the hub has not acked after `ack_timeout_s` (hub down, or it
    crashed between receiving and committing): the batch is published again, over the same link, with
    the wait doubling on each attempt up to `max_resend_interval_s`, so a long hub outage does not flood
    the broker. A timeout is never taken as success.
The hub drops duplicates by (device_id, seq), so resending is always safe; but it is not free.

A backlog burst (hundreds of units reconnecting at once, a window each) queues more at the broker than
the hub stores in `ack_timeout_s`: the hub is alive and draining, just behind. A resend then only adds a
copy behind the original in the same queue, and the copies once doubled the hub's work. So that wait
(the doubling one above) counts not from the batch's send but from the later of its send and the last hub
ack on its topic ("lane": /records or /alerts) that acked or rejected something of ours: while such acks
keep coming at least every wait, the batch waits its turn (counted once per attempt in
`hub_resends_deferred`). When they stop (hub down, crashed, stuck) it is resent a wait after the last one.
Lanes are apart because the hub reads /alerts on a session of its own, ahead of the /records backlog: acks
on one say nothing of the other (a lost alert is resent on time while bulk acks flow; a resend of an alert on
/records joins that lane, and once it went on both, its ack counts for neither: which copy was acked?).
Two limits keep a batch the hub really lost (received and never committed, refused by its store, dropped by
a full broker queue) from waiting behind that evidence for ever:
  - passed over: once a batch sent after it on the same lane has been acked, it is resent when no ack of
    its own came within a further wait (`hub_resends_skipped`). The broker keeps a topic's messages from one
    client in order for one subscriber, so a later batch acked first means this one is lost or on another,
    slower hub worker (a shared subscription): the wait lets a slower worker's queue be behind by that much.
    Once nothing later is acked, the acks come only for the few older batches of the window (each flight is
    acked at most once), then stop, and the silence rule above applies.
  - at most `max_resend_interval_s` after its send, whatever the acks: the longest wait between two copies
    of a batch is the same with a draining hub as with a silent one.
A unit none of whose batches the hub has reached yet has no acks to go by. Hub workers say "alive and storing" on
`{prefix}/fleet/hub-alive` (hub/liveness.py: retained, QoS 0, at most every few seconds, only while storing;
`sync.hub_liveness` subscribes). A live HubAlive (not the broker's retained copy, which a dead hub may have left)
whose `stored` rose since the last one heard from that worker counts, for batches on /records, as an ack on their
lane does: they wait while such messages keep coming within the wait (`hub_resends_deferred_alive`), up to
`max_resend_interval_s` as above (a hub that is alive but never got this batch still gets it again). Not for the
alert lane, which the hub reads ahead of any backlog. A malformed one is counted (`hub_alive_refused`) and ignored;
with none heard (an older hub) nothing changes.

The alert lane: ALERT records leave in batches of their own on `{prefix}/{device}/alerts`, which the hub reads on a
session of its own, ahead of the bulk queue the broker holds for it during a backlog burst (hub/service.py). The
outbox hands out ALERT records first; a batch that mixes them with others is sent as two. A resend of an alert batch
alternates between `/records` and `/alerts` (the first resend on `/records`), so a hub or broker ACL older than the
lane still gets it after `ack_timeout_s`; the hub stores (device_id, seq) once whichever topic brought it.
`sync.alert_lane: false` (and ack_mode "broker", whose consumer reads `/records`) sends everything on `/records`.

Health (agent/health.py): every `health_interval_s` of the unit config, at each connect, and soon after
`health_soon()` (a driver went up or down), the sync publishes a fresh Health message, retained, over the
same link. Its clock offset to the hub comes from the acks: the hub stamps each with its clock; the sample
with the shortest round trip since the last message is reported (its error is at most half that round trip).

What the hub acked is deleted from the outbox; when that delete fails (a full disk), the ranges are
kept here and retried every SETTLE_RETRY_S, the link stays up, and those records are never sent again.
The highest seq the hub acked is kept in `{outbox}.sync.json`: an outbox that would hand out seqs at
or below it (a replaced or restored file) has its seq floor raised past it.

Every batch is signed with the device key beside the outbox (`{outbox}.key`, core/signing.py), over its
batch id and its records' chain hashes; a resend is signed again, under the same batch id.
Commands (core/wire.py Command) come on the cmd topic and are answered on cmd/reply. A retained one is
ignored (a stale order left on the broker is no order); one over MAX_COMMAND_BYTES is refused unparsed;
beyond `commands_burst` commands at `commands_per_s` they are refused (rate_limited; model_chunk excepted:
hundreds make one model update, each checked against its offered hash), and a `resend` within
ack_timeout_s of the last one is refused too (each releases the whole window: 20 a second would multiply
the traffic); a replayed or expired one is refused and counted (agent/commands.py).
Every inbound message is bounded before it is parsed (core/inbound.py): an ack over MAX_ACK_BYTES, anything
on a topic the sync did not subscribe to, and malformed acks and commands are refused, counted per cause
(status: sync.refused) and logged at most once a minute per cause. Batch ids are 64 random bits (per start)
and a counter: nobody can guess the id of a batch in flight.
ping, status and resend are answered here; the rest go to the runtime's `commands` hook, which returns the
result, or None when it answers later through `reply()` (config_push: the unit is replaced meanwhile, and the
reply leaves through the new unit's sync).
The session is persistent (clean_session false, a client id stable per install): QoS 1 commands and acks
published while the unit is offline are queued by the broker and delivered when it returns; an expired
command among them is refused then.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from customs_edge.agent.commands import SeenCommands
from customs_edge.agent.config import SyncConfig
from customs_edge.agent.outbox import Outbox, merge_ranges, subtract_ranges
from customs_edge.core.inbound import Refusals, TokenBucket, too_large
from customs_edge.core.jsonfast import dumps
from customs_edge.core.mqtt import (
    Connected,
    Link,
    Lost,
    Message,
    MqttLink,
    NotConnected,
    PubAck,
    Will,
    install_client_id,
)
from customs_edge.core.records import Pending, Priority
from customs_edge.core.signing import DeviceKey
from customs_edge.core.wire import (
    ALERT_LANE,
    MAX_ACK_BYTES,
    MAX_ALIVE_BYTES,
    MAX_BATCH_BYTES,
    MAX_COMMAND_BYTES,
    Ack,
    Command,
    CommandReply,
    Health,
    HubAlive,
    encode_batch,
    hub_alive_topic,
    intersect,
    ranges_of,
    topic,
)

log = logging.getLogger(__name__)


class Sideline(Protocol):
    """Traffic beside the records, run by the sync thread on the same link (an app's `sidelines()`): evidence
    photos sent behind the records, a retained risk list received. `topics()` are subscribed at each connect;
    a message on another topic than ack and cmd is offered to each sideline until one takes it (True);
    `step(link, records_idle)` runs every sync step while connected, `records_idle` True when the outbox is
    drained and no batch is in flight."""

    def topics(self) -> list[str]: ...

    def on_connected(self) -> None: ...

    def on_message(self, msg: Message) -> bool: ...

    def step(self, link: Link, records_idle: bool) -> None: ...


Ranges = list[tuple[int, int]]


@dataclass
class SyncStats:
    connects: int = 0
    connect_failures: int = 0
    batches_sent: int = 0
    records_sent: int = 0
    records_acked: int = 0  # deleted from the outbox after the hub's ack (or the PUBACK, ack_mode broker)
    records_rejected: int = 0  # refused by the hub for good: handed to the outbox's dead letters
    resent_after_reconnect: int = 0
    ack_timeouts: int = 0  # half-open links detected (no PUBACK in time)
    hub_resends: int = 0  # batches published again because the hub did not ack them in time
    hub_resends_skipped: int = 0  # of those: passed over by the hub (a later batch on their lane acked a wait ago)
    hub_resends_deferred: int = 0  # batches past their wait kept waiting (per attempt): the hub's acks kept coming
    hub_resends_deferred_alive: int = 0  # of those: by the hub's liveness alone (no ack on their lane within the wait)
    hub_alive_heard: int = 0  # valid hub liveness messages (HubAlive), retained copies included
    hub_alive_refused: int = 0  # liveness messages too large or malformed: ignored
    partial_acks: int = 0  # hub acks that covered only part of their batch: the rest was sent again
    settle_failures: int = 0  # outbox deletes that failed (disk full): kept, retried, never resent
    bad_messages: int = 0
    health_sent: int = 0
    commands: int = 0  # commands run (or handed to the runtime)
    commands_refused: int = 0  # malformed or failing
    commands_replayed: int = 0  # an id already received: refused
    commands_expired: int = 0  # past their deadline: refused
    commands_retained: int = 0  # retained on the broker: ignored, not answered
    commands_rate_limited: int = 0  # beyond commands_burst at commands_per_s, or a resend too soon: refused
    stale_acks: int = 0  # acks for batches not in flight on this connection, or covering none of it
    hub_acked_seq: int = 0  # highest seq the hub acked for this install (persisted)
    seq_floor_raised: int = 0  # times the outbox was found behind hub_acked_seq and moved past it
    last_ack_mono: float = 0.0


UNPACED_COMMANDS = frozenset({"model_chunk"})  # not counted against commands_per_s (see _on_command)
COMMAND_COUNTERS = ("commands", "commands_refused", "commands_replayed", "commands_expired", "commands_retained",
                    "commands_rate_limited")


@dataclass
class _InFlight:
    ranges: Ranges
    count: int
    sent_at: float
    mid: int
    records: list[Pending]
    pubacked: bool = False
    attempt: int = 0
    lane: str = ""  # the topic of its latest send
    order: int = 0  # of its latest send, among all the sync's sends (resends included)
    passed_at: float | None = None  # when a batch sent after it on its lane was acked (since its latest send)
    deferred: bool = False  # its resend is (was) held back by the hub's acks, this attempt


_seq_of = itemgetter(0)  # of a Pending


def _covers(merged: Ranges, seq: int) -> bool:
    i = bisect.bisect_right(merged, seq, key=lambda r: r[0]) - 1
    return i >= 0 and merged[i][1] >= seq


class Sync:
    IDLE_WAIT_S = 0.25  # longest wait in one step: how soon a stop is noticed (records wake it at once)
    SETTLE_RETRY_S = 1.0  # a failed outbox delete is retried this often
    STATE_SAVE_S = 5.0  # the hub's high-water mark is written at most this often (and on loss and stop)

    def __init__(self, device_id: str, outbox: Outbox, cfg: SyncConfig, *, outbox_path: str | Path,
                 status: Callable[[], dict[str, Any]] | None = None, status_interval_s: float = 30.0,
                 commands: Callable[[Command], dict[str, Any] | None] | None = None, link: Link | None = None,
                 health: Callable[[tuple[float, float] | None], Health] | None = None,
                 health_interval_s: float = 60.0, signing: bool = True, sidelines: Sequence[Sideline] = ()) -> None:
        self.device_id = device_id
        # every batch signed with the device key beside the outbox (made on first start; core/signing.py)
        self.key = DeviceKey.beside(outbox_path) if signing else None
        self.outbox = outbox
        self.cfg = cfg
        self.status_fn = status or (lambda: {})
        self.status_interval_s = status_interval_s
        self.commands = commands
        self.health_fn = health
        self.health_interval_s = health_interval_s
        self.sidelines = list(sidelines)
        self.stats = SyncStats()
        p = cfg.topic_prefix
        self.t_records = topic(p, device_id, "records")
        # ALERT records' batches: the hub's alert lane (none in broker mode: its consumer reads /records)
        self.t_alerts = topic(p, device_id, ALERT_LANE) if cfg.alert_lane and cfg.ack_mode == "hub" else None
        self.t_ack = topic(p, device_id, "ack")
        self.t_status = topic(p, device_id, "status")
        self.t_cmd = topic(p, device_id, "cmd")
        self.t_health = topic(p, device_id, "health")
        # the hub workers' liveness (hub/liveness.py): only a hub that acks makes a unit wait for it
        self.t_alive = hub_alive_topic(p) if cfg.hub_liveness and cfg.ack_mode == "hub" else None
        self.link: Link = link or MqttLink(
            install_client_id(f"ce-{device_id}", Path(outbox_path)), cfg.host, cfg.port,
            keepalive=cfg.keepalive_s, clean_session=False,
            will=Will(self.t_status, dumps({"state": "offline", "device_id": device_id, "ts": None}).encode()),
            **cfg.credentials(), connect_timeout_s=cfg.connect_timeout_s,
            backoff_min_s=cfg.backoff_min_s, backoff_max_s=cfg.backoff_max_s)
        self.wake = self.link.waker  # set by the writer when it committed records
        self._inflight: dict[str, _InFlight] = {}
        self._by_mid: dict[int, str] = {}  # mids awaiting their PUBACK
        self._ids = itertools.count(1)
        self._sends = itertools.count(1)  # _InFlight.order
        self._lane_acked: dict[str, float] = {}  # topic -> when a hub ack last acked or rejected a batch sent on it
        self._alive_stored: dict[str, int] = {}  # hub worker -> `stored` in the last HubAlive heard from it
        self._hub_alive_at = float("-inf")  # when a live HubAlive last showed a worker's `stored` rising
        self._boot = secrets.token_hex(8)  # batch ids: unguessable (an ack naming one is no use without it)
        self.refusals = Refusals(log)  # inbound messages refused, per cause
        self.command_bucket = TokenBucket(cfg.commands_per_s, cfg.commands_burst)
        self._last_resend = float("-inf")
        self._next_status = 0.0
        self._next_health = 0.0
        self.clock: tuple[float, float] | None = None  # (hub clock - ours, round trip), last reported
        self._clock_best: tuple[float, float] | None = None  # the best sample since
        self._more = True  # the outbox may hold unsent records
        self._settle_acked: Ranges = []  # acked by the hub, not yet deleted from the outbox
        self._settle_rejected: Ranges = []  # rejected by the hub, not yet handed to outbox.reject()
        self._settle_at = 0.0
        self._state_file = Path(f"{outbox_path}.sync.json")
        self.seen_commands = SeenCommands(Path(f"{outbox_path}.commands.json"))
        self._replies: list[CommandReply] = []  # answers given later (reply()), published by the loop
        self.stats.hub_acked_seq = self._saved_seq = self._load_state()
        self._next_save = 0.0
        self._check_seq_floor()

    # -- the loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    self.step()
                except Exception:  # a bug, an outbox locked for long: never let sync die
                    log.exception("sync step failed; dropping the link and starting over")
                    self.link.abort("sync step failed")
                    stop.wait(self.IDLE_WAIT_S)
        finally:
            try:
                self._await_acks()
            except Exception:  # a stop goes on whatever the link does meanwhile
                log.exception("waiting for the hub's last acks failed; stopping")
            self._goodbye()

    STOP_ACK_WAIT_S = 1.0  # at a stop: how long the hub's acks for batches already sent are waited for
    STOP_ACK_STEPS = 100  # and in at most this many link steps (a bound that holds whatever the clock does)

    def _await_acks(self) -> None:
        """At a stop, the hub's acks for the batches already sent, for up to STOP_ACK_WAIT_S: what the hub stored
        leaves the outbox now rather than going again after the restart (acked then as a duplicate). No new batch is
        started; a command that arrives meanwhile is answered, not run, so that its sender sends it again."""
        deadline = time.monotonic() + self.STOP_ACK_WAIT_S
        for _ in range(self.STOP_ACK_STEPS):
            left = deadline - time.monotonic()
            if not self._inflight or not self.link.connected or left <= 0:
                return
            for ev in self.link.step(min(left, 0.05)):
                if isinstance(ev, PubAck):
                    self._on_puback(ev.mid)
                elif isinstance(ev, Message):
                    self._on_message(ev, stopping=True)
            self._send_replies()

    def step(self) -> None:
        link = self.link
        busy = link.connected and self._more and len(self._inflight) < self.cfg.window_batches
        for ev in link.step(0.0 if busy else self.IDLE_WAIT_S):
            if isinstance(ev, Message):
                self._on_message(ev)
            elif isinstance(ev, PubAck):
                self._on_puback(ev.mid)
            elif isinstance(ev, Connected):
                self._on_connected()
            else:
                self._on_lost(ev)
        self._settle()  # one delete transaction for every ack this step brought
        if link.connected:
            self._send_replies()
            self._fill_window()
            self._check_deadline(time.monotonic())
            for sl in self.sidelines:
                sl.step(link, not self._more and not self._inflight)
            if time.monotonic() >= self._next_status:
                self._publish_status()
            if self.health_fn is not None and time.monotonic() >= self._next_health:
                self._publish_health(self.health_fn)
        self._save_state()

    def _on_message(self, ev: Message, stopping: bool = False) -> None:
        """An inbound message, by topic. `stopping`: a command is answered, not run (_await_acks)."""
        if ev.topic == self.t_ack:
            self._on_ack(ev.payload)
        elif ev.topic == self.t_cmd and stopping:
            if not ev.retain:
                self.stats.commands_refused += 1
                self.reply(CommandReply(id=_command_id(ev.payload), ok=False,
                                        error="the unit is stopping: send the command again once it is back"))
        elif ev.topic == self.t_cmd:
            self._on_command(ev)
        elif ev.topic == self.t_alive:
            self._on_alive(ev)
        elif not any(sl.on_message(ev) for sl in self.sidelines):  # a sideline's (a risk list), or none's
            self.refusals.refuse("unexpected_topic", "message on a topic the unit did not subscribe to",
                                 topic=ev.topic, bytes=len(ev.payload))

    def _on_connected(self) -> None:
        self.stats.connects += 1
        self._inflight.clear()
        self._by_mid.clear()
        self.outbox.release()
        self._more = True
        self._check_seq_floor()
        try:
            self.link.subscribe(self.t_ack, 1)
            self.link.subscribe(self.t_cmd, 1)
            if self.t_alive is not None:  # QoS 0: a hint, never queued for later
                self.link.subscribe(self.t_alive, 0)
            for sl in self.sidelines:
                for t in sl.topics():
                    self.link.subscribe(t, 1)
                sl.on_connected()
        except NotConnected:
            return  # lost again at once: the Lost event follows in this step
        self._publish_status()
        self._next_health = 0.0
        log.info("broker connected", extra={"broker": f"{self.cfg.host}:{self.cfg.port}",
                                            "client_id": self.link.client_id})

    def _on_lost(self, ev: Lost) -> None:
        if not ev.was_connected:
            self.stats.connect_failures += 1
            return
        n = sum(f.count for f in self._inflight.values())
        self.stats.resent_after_reconnect += n
        self._inflight.clear()
        self._by_mid.clear()
        self.outbox.release()
        self._save_state(force=True)
        if n:
            log.info("records in flight will be sent again", extra={"unacked_records": n})

    # -- sending --------------------------------------------------------------------------------
    def _fill_window(self) -> None:
        while len(self._inflight) < self.cfg.window_batches:
            records = self.outbox.begin(self.cfg.batch_max_records)
            if not records:
                self._more = False
                return
            self._more = len(records) == self.cfg.batch_max_records
            if self._settle_acked or self._settle_rejected:  # answered by the hub: never sent again
                records = [r for r in records if not (_covers(self._settle_acked, r.seq)
                                                      or _covers(self._settle_rejected, r.seq))]
            if records and not self._send(records):
                return

    def _topic(self, records: list[Pending], attempt: int) -> str:
        """The alert lane for a batch of ALERT records (every other resend on /records: an older hub reads that)."""
        lane = self.t_alerts is not None and attempt % 2 == 0 and all(r.priority == Priority.ALERT for r in records)
        return self.t_alerts if lane and self.t_alerts else self.t_records

    def _send(self, records: list[Pending], attempt: int = 0) -> bool:
        if self.t_alerts is not None:  # alerts in batches of their own (the outbox hands them out first)
            alerts = [r for r in records if r.priority == Priority.ALERT]
            if alerts and len(alerts) < len(records):
                rest = [r for r in records if r.priority != Priority.ALERT]
                return self._send(alerts, attempt) and self._send(rest, attempt)
        batch_id = f"{self._boot}-{next(self._ids)}"
        payload = encode_batch(self.device_id, batch_id, records, self.key)
        if len(payload) > MAX_BATCH_BYTES and len(records) > 1:  # the broker disconnects oversized packets
            half = len(records) // 2
            return self._send(records[:half], attempt) and self._send(records[half:], attempt)
        lane = self._topic(records, attempt)
        try:
            mid = self.link.publish(lane, payload, qos=1)
        except NotConnected:
            self.link.abort("publish refused: not connected")
            return False
        self._inflight[batch_id] = _InFlight(ranges_of(list(map(_seq_of, records))), len(records),
                                             time.monotonic(), mid, records, attempt=attempt, lane=lane,
                                             order=next(self._sends))
        self._by_mid[mid] = batch_id
        self.stats.batches_sent += 1
        self.stats.records_sent += len(records)
        return True

    def _check_deadline(self, now: float) -> None:
        timeout = self.cfg.ack_timeout_s
        for batch_id, f in list(self._inflight.items()):
            if not f.pubacked:
                if now - f.sent_at > timeout:
                    self.stats.ack_timeouts += 1
                    log.warning("no PUBACK in time: link presumed half-open, reconnecting",
                                extra={"ack_timeout_s": timeout, "batches_in_flight": len(self._inflight)})
                    self.link.abort(f"no PUBACK within {timeout} s")
                    return
            elif now - f.sent_at > (wait := min(timeout * 2 ** min(f.attempt, 30), self.cfg.max_resend_interval_s)):
                # the hub silent on its lane for a wait, or it passed this batch over, or the cap (module docstring)
                passed = f.passed_at is not None and now - f.passed_at > wait
                acked_at = self._lane_acked.get(f.lane, f.sent_at)
                # the hub's liveness speaks for /records only: the alert lane is read ahead of any backlog
                alive = f.lane == self.t_records and now - self._hub_alive_at <= wait
                if passed or (now - acked_at > wait and not alive) or now - f.sent_at > self.cfg.max_resend_interval_s:
                    self._resend(batch_id, f, passed)
                elif not f.deferred:
                    f.deferred = True
                    self.stats.hub_resends_deferred += 1
                    self.stats.hub_resends_deferred_alive += int(now - acked_at > wait)

    def _resend(self, batch_id: str, f: _InFlight, passed: bool = False) -> None:
        """The broker has the batch, the hub has not confirmed it: publish it again (the hub dedupes)."""
        lane = self._topic(f.records, f.attempt + 1)
        try:
            mid = self.link.publish(lane, encode_batch(self.device_id, batch_id, f.records, self.key), qos=1)
        except NotConnected:
            self.link.abort("publish refused: not connected")
            return
        self._by_mid[mid] = batch_id
        f.mid, f.sent_at, f.pubacked, f.attempt = mid, time.monotonic(), False, f.attempt + 1
        f.lane, f.order, f.passed_at, f.deferred = lane, next(self._sends), None, False
        self.stats.hub_resends += 1
        self.stats.hub_resends_skipped += int(passed)
        if f.attempt == 1 or f.attempt % 10 == 0:
            log.warning("hub has not acked a stored batch; publishing it again",
                        extra={"batch": batch_id, "attempt": f.attempt, "records": f.count, "passed_over": passed})

    # -- receiving ------------------------------------------------------------------------------
    def _on_puback(self, mid: int) -> None:
        batch_id = self._by_mid.pop(mid, None)  # gone once answered: a mid is reused after 65535
        flight = self._inflight.get(batch_id) if batch_id else None
        if batch_id is None or flight is None or flight.mid != mid:
            return
        if self.cfg.ack_mode == "broker":
            del self._inflight[batch_id]
            self._settle_acked = merge_ranges(self._settle_acked + flight.ranges)
        else:
            flight.pubacked = True

    def _on_ack(self, payload: bytes) -> None:
        if self.cfg.ack_mode != "hub":
            return
        if why := too_large(payload, MAX_ACK_BYTES):
            self.stats.bad_messages += 1
            self.refusals.refuse("ack_too_large", "oversized ack ignored unread", topic=self.t_ack, reason=why)
            return
        try:
            ack = Ack.model_validate_json(payload)
        except ValidationError as exc:
            self.stats.bad_messages += 1
            self.refusals.refuse("ack_malformed", "bad ack ignored", error=str(exc).splitlines()[0])
            return
        flight = self._inflight.get(ack.batch)
        # only what we sent in that batch: a stale, retained or stray ack deletes nothing; anything it
        # meant is still unacked here and gets resent, and the hub acks it again
        acked = intersect(flight.ranges, ack.ranges) if flight else []
        rejected = intersect(flight.ranges, ack.rejected) if flight else []
        if flight is None or not (acked or rejected):
            self.stats.stale_acks += 1  # a batch that stays in flight is resent on its timer
            return
        del self._inflight[ack.batch]
        if flight.attempt == 0 or self._topic(flight.records, 0) == self._topic(flight.records, 1):
            self._hub_progress(flight)  # not for an alert batch sent on both lanes: which copy was acked?
        if ack.ts is not None and flight.attempt == 0:  # a resent batch's round trip is ambiguous
            rtt = time.monotonic() - flight.sent_at
            if self._clock_best is None or rtt < self._clock_best[1]:
                self._clock_best = (ack.ts - (time.time() - rtt / 2), rtt)
        if self._by_mid.get(flight.mid) == ack.batch:  # the hub's ack overtook the PUBACK
            del self._by_mid[flight.mid]
        if acked:
            self._settle_acked = merge_ranges(self._settle_acked + acked)
            self.stats.hub_acked_seq = max(self.stats.hub_acked_seq, max(hi for _, hi in acked))
        if rejected:
            self._settle_rejected = merge_ranges(self._settle_rejected + rejected)
        left = subtract_ranges(flight.ranges, merge_ranges(acked + rejected))  # usually none: no per-record pass
        rest = [r for r in flight.records if _covers(left, r.seq)] if left else []
        if rest:
            self.stats.partial_acks += 1
            log.warning("the hub answered for part of a batch; sending the rest again",
                        extra={"batch": ack.batch, "answered": flight.count - len(rest), "rest": len(rest)})
            self._send(rest, attempt=flight.attempt)

    MAX_HUB_WORKERS = 256  # liveness baselines kept (one per hub worker heard); past it, forgotten and started again

    def _on_alive(self, msg: Message) -> None:
        """A hub worker's HubAlive (hub/liveness.py). A live one (not the broker's retained copy, which may be a dead
        hub's) whose `stored` rose since the last heard from that worker says the hub is storing: _check_deadline
        lets a batch on /records wait while that was within its wait. Anything else is only a baseline."""
        if not msg.payload:  # the retained copy cleared on the broker
            return
        if why := too_large(msg.payload, MAX_ALIVE_BYTES):
            self.stats.hub_alive_refused += 1
            self.refusals.refuse("alive_too_large", "oversized hub liveness ignored unread", topic=msg.topic,
                                 reason=why)
            return
        try:
            alive = HubAlive.model_validate_json(msg.payload)
        except ValidationError as exc:
            self.stats.hub_alive_refused += 1
            self.refusals.refuse("alive_malformed", "bad hub liveness ignored", error=str(exc).splitlines()[0])
            return
        self.stats.hub_alive_heard += 1
        last = self._alive_stored.get(alive.hub)
        if last is not None and alive.stored > last and not msg.retain:
            self._hub_alive_at = time.monotonic()
        elif last is None and len(self._alive_stored) >= self.MAX_HUB_WORKERS:
            self._alive_stored.clear()
        self._alive_stored[alive.hub] = alive.stored

    def _hub_progress(self, flight: _InFlight) -> None:
        """The hub answered for `flight`: it is draining its lane; what was sent before it there and is still
        unanswered has been passed over (module docstring)."""
        now = self._lane_acked[flight.lane] = time.monotonic()
        for f in self._inflight.values():
            if f.lane == flight.lane and f.order < flight.order and f.passed_at is None:
                f.passed_at = now

    def _settle(self) -> None:
        """Delete what the hub acked, dead-letter what it rejected. A failure (a full disk) is no link
        failure: the ranges stay here, are retried, and their records are not sent again."""
        if not (self._settle_acked or self._settle_rejected) or time.monotonic() < self._settle_at:
            return
        try:
            if self._settle_acked:
                self.stats.records_acked += self.outbox.ack(self._settle_acked)
                self._settle_acked = []
                self.stats.last_ack_mono = time.monotonic()
            if self._settle_rejected:
                self.stats.records_rejected += self.outbox.reject(self._settle_rejected, "rejected by the hub")
                self._settle_rejected = []
        except Exception as exc:
            self.stats.settle_failures += 1
            self._settle_at = time.monotonic() + self.SETTLE_RETRY_S
            if self.stats.settle_failures == 1 or self.stats.settle_failures % 60 == 0:
                log.warning("outbox delete failed; acked ranges kept and retried, not resent",
                            extra={"error": repr(exc), "failures": self.stats.settle_failures,
                                   "ranges": len(self._settle_acked) + len(self._settle_rejected)})

    def _on_command(self, msg: Message) -> None:
        if msg.retain:
            self.stats.commands_retained += 1
            log.warning("retained command ignored: clear it on the broker (publish an empty retained message)",
                        extra={"topic": msg.topic})
            return
        if why := too_large(msg.payload, MAX_COMMAND_BYTES):  # never parsed: not even for its id
            self.stats.commands_refused += 1
            self.refusals.refuse("command_too_large", "oversized command refused unread", reason=why)
            self.reply(CommandReply(id=None, ok=False, error=f"command too large: {why}"))
            return
        try:
            cmd = Command.model_validate_json(msg.payload)
        except ValidationError as exc:
            err = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors()[:5])
            self.stats.commands_refused += 1
            self.refusals.refuse("command_malformed", "bad command refused", error=err)
            self.reply(CommandReply(id=_command_id(msg.payload), ok=False, error=f"bad command: {err[:1000]}"))
            return
        # model chunks come by the hundred, each checked against its offered hash: paced by the sender's window
        if cmd.cmd not in UNPACED_COMMANDS and not self.command_bucket.take():
            self.stats.commands_rate_limited += 1
            why = (f"rate limited: at most {self.cfg.commands_burst} commands at once and"
                   f" {self.cfg.commands_per_s:g}/s; send it again in {self.command_bucket.wait_s():.1f} s")
            self.refusals.refuse("command_rate_limited", "command refused", reason=why)
            self.reply(CommandReply(id=cmd.id, ok=False, error=why))
            return
        if cmd.cmd == "resend" and (ago := time.monotonic() - self._last_resend) < self.cfg.ack_timeout_s:
            self.stats.commands_rate_limited += 1
            why = (f"rate limited: the last resend was {ago:.1f} s ago; at most one per ack_timeout_s"
                   f" ({self.cfg.ack_timeout_s:g} s), within which unacked batches are sent again anyway")
            self.refusals.refuse("command_rate_limited", "command refused", reason=why)
            self.reply(CommandReply(id=cmd.id, ok=False, error=why))
            return
        refused = self.seen_commands.check(cmd, record=cmd.cmd != "model_chunk")  # chunks are idempotent
        if refused is not None:
            if refused.startswith("replayed"):
                self.stats.commands_replayed += 1
            else:
                self.stats.commands_expired += 1
            log.warning("command refused", extra={"command": cmd.cmd, "id": cmd.id, "reason": refused})
            self.reply(CommandReply(id=cmd.id, ok=False, error=refused))
            return
        self.stats.commands += 1
        try:
            result = self._run_command(cmd)
        except Exception as exc:  # a command must never take the agent down
            self.stats.commands_refused += 1
            self.reply(CommandReply(id=cmd.id, ok=False, error=f"{type(exc).__name__}: {exc}"))
            return
        if result is not None:  # None: the runtime answers later, through reply()
            self.reply(CommandReply(id=cmd.id, ok=True, result=result))

    def adopt(self, old: Sync) -> None:
        """Carry over what a reload must not reset: the seen command ids, the command counters, the answers
        not yet published."""
        self.seen_commands = old.seen_commands
        self.command_bucket, self._last_resend, self.refusals = old.command_bucket, old._last_resend, old.refusals
        for name in COMMAND_COUNTERS:
            setattr(self.stats, name, getattr(old.stats, name))
        self._replies[:0] = old._replies

    def reply(self, reply: CommandReply) -> None:
        """Publish an answer on the reply topic at the next step (any thread); kept until connected."""
        self._replies.append(reply)
        self.wake.set()

    def _send_replies(self) -> None:
        while self._replies:
            try:
                self.link.publish(self.t_cmd + "/reply", self._replies[0].model_dump_json(), qos=1)
            except NotConnected:
                return
            self._replies.pop(0)

    def _run_command(self, cmd: Command) -> dict[str, Any] | None:
        if cmd.cmd == "ping":
            return {"pong": time.time()}
        if cmd.cmd == "status":
            return self.status()
        if cmd.cmd == "resend":
            self._last_resend = time.monotonic()
            self._inflight.clear()
            self._by_mid.clear()
            self.outbox.release()
            self._more = True
            return {"released": True}
        if self.commands:
            return self.commands(cmd)
        raise ValueError(f"unsupported command {cmd.cmd!r}")

    # -- the hub's high-water mark --------------------------------------------------------------
    def _check_seq_floor(self) -> None:
        """An outbox whose highest seq is below what the hub acked is a replaced or restored file: its next
        seqs are already stored at the hub. Move its sequence past them."""
        hwm = self.stats.hub_acked_seq
        if not hwm:
            return
        try:
            last = self.outbox.stats().last_seq
            if last < hwm:
                self.outbox.raise_seq_floor(hwm)
                self.stats.seq_floor_raised += 1
                log.error("outbox is behind the hub (replaced or restored file?): its seqs now continue after"
                          " the hub's", extra={"outbox_last_seq": last, "hub_acked_seq": hwm})
        except Exception:
            log.exception("could not check the outbox against the hub's high-water mark")

    def _load_state(self) -> int:
        try:
            return int(json.loads(self._state_file.read_text())["hub_acked_seq"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("sync state unreadable; the hub's high-water mark starts at 0",
                        extra={"path": str(self._state_file), "error": repr(exc)})
            return 0

    def _save_state(self, force: bool = False) -> None:
        seq = self.stats.hub_acked_seq
        now = time.monotonic()
        if seq == self._saved_seq or (now < self._next_save and not force):
            return
        self._next_save = now + self.STATE_SAVE_S
        tmp = self._state_file.with_name(self._state_file.name + ".tmp")
        try:
            tmp.write_text(dumps({"hub_acked_seq": seq}))
            os.replace(tmp, self._state_file)
            self._saved_seq = seq
        except OSError as exc:  # a full disk: kept in memory, written later
            log.warning("cannot write the sync state", extra={"path": str(self._state_file), "error": str(exc)})

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        ob = self.outbox.stats()
        last_ack = self.stats.last_ack_mono
        sync = {**asdict(self.stats), "last_ack_age_s": time.monotonic() - last_ack if last_ack else None,
                "refused": self.refusals.as_dict()}
        return {"state": "online", "device_id": self.device_id, "ts": time.time(), "client_id": self.link.client_id,
                "outbox": asdict(ob), "sync": sync, **self.status_fn()}

    def _publish_status(self) -> None:
        self._next_status = time.monotonic() + self.status_interval_s
        try:
            self.link.publish(self.t_status, dumps(self.status()), qos=1, retain=True)
        except NotConnected:
            pass

    def health_soon(self) -> None:
        """Publish a health message at the next step (any thread: a driver went up or down)."""
        self._next_health = 0.0
        self.wake.set()

    def _publish_health(self, sample: Callable[[tuple[float, float] | None], Health]) -> None:
        # the deadline first: a health_soon() from now on is seen by this sample or causes the next one
        self._next_health = time.monotonic() + self.health_interval_s
        self.clock = self._clock_best or self.clock
        self._clock_best = None
        try:
            payload = sample(self.clock).model_dump_json()
        except Exception:  # a failing sample must cost the health message, never the sync
            log.exception("health sample failed")
            return
        try:
            self.link.publish(self.t_health, payload, qos=1, retain=True)
        except NotConnected:
            return
        self.stats.health_sent += 1

    def _goodbye(self) -> None:
        if self.link.connected:
            try:
                self.link.publish(self.t_status, dumps({"state": "offline", "device_id": self.device_id,
                                                        "ts": time.time()}), qos=1, retain=True)
            except NotConnected:
                pass
            self.link.disconnect(flush_s=1.0)
        self.link.close()
        self._settle_at = 0.0
        self._settle()
        self._save_state(force=True)


def _command_id(payload: bytes) -> str | None:
    """The id of a command that failed validation, when it has a readable one: its error reply echoes it."""
    try:
        cid = json.loads(payload).get("id")
    except (ValueError, AttributeError, RecursionError):  # RecursionError: "[[[[..." nested past the stack
        return None
    return cid if isinstance(cid, str) and 0 < len(cid) <= 64 else None
