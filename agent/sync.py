"""Sync: move records from the outbox to the hub, deleting them only on a real acknowledgement.

One thread owns the MQTT link and runs `run()`: an explicit loop, nothing hidden.
  - not connected: connect, and on failure wait a jittered exponential backoff;
  - on connect: subscribe to our ack and cmd topics, publish a retained "online" status, and treat
    everything in flight as unsent (outbox.release()): it is sent again;
  - connected: keep up to `window_batches` batches in flight; an Ack from the hub deletes exactly the
    ranges it names (ack_mode "hub"); in ack_mode "broker" a PUBACK deletes the batch instead, for sites
    whose own consumer replaces our hub (a broker crash can then lose records: see README);
  - a batch the broker has not even PUBACKed after `ack_timeout_s`: the link is presumed half-open; it
    is dropped and everything in flight is resent after reconnecting;
  - a batch the broker PUBACKed but the hub has not acked after `ack_timeout_s` (hub down, or it
    crashed between receiving and committing): the batch is published again, over the same link, with
    the wait doubling on each attempt up to `max_resend_interval_s`, so a long hub outage does not flood
    the broker. A timeout is never taken as success.
The hub drops duplicates by (device_id, seq), so resending is always safe.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.outbox import Outbox
from customs_edge.core.jsonfast import dumps
from customs_edge.core.mqtt import Backoff, MqttLink, NotConnected, Will
from customs_edge.core.records import Pending
from customs_edge.core.wire import Ack, Command, CommandReply, encode_batch, intersect, ranges_of, topic

log = logging.getLogger(__name__)


@dataclass
class SyncStats:
    connects: int = 0
    connect_failures: int = 0
    batches_sent: int = 0
    records_sent: int = 0
    records_acked: int = 0
    resent_after_reconnect: int = 0
    ack_timeouts: int = 0  # half-open links detected (no PUBACK in time)
    hub_resends: int = 0  # batches published again because the hub did not ack them in time
    bad_messages: int = 0
    stale_acks: int = 0  # acks for batches not in flight on this connection: ignored
    last_ack_mono: float = 0.0


@dataclass
class _InFlight:
    ranges: list[tuple[int, int]]
    count: int
    sent_at: float
    mid: int
    records: list[Pending]
    pubacked: bool = False
    attempt: int = 0


class Sync:
    def __init__(self, device_id: str, outbox: Outbox, cfg: SyncConfig, *,
                 status: Callable[[], dict[str, Any]] | None = None, status_interval_s: float = 30.0,
                 commands: Callable[[Command], dict[str, Any]] | None = None) -> None:
        self.device_id = device_id
        self.outbox = outbox
        self.cfg = cfg
        self.status_fn = status or (lambda: {})
        self.status_interval_s = status_interval_s
        self.commands = commands
        self.stats = SyncStats()
        self.wake = threading.Event()  # set by the writer when it committed records
        p = cfg.topic_prefix
        self.t_records = topic(p, device_id, "records")
        self.t_ack = topic(p, device_id, "ack")
        self.t_status = topic(p, device_id, "status")
        self.t_cmd = topic(p, device_id, "cmd")
        self.link = MqttLink(
            f"ce-agent-{device_id}", cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_session=True,
            will=Will(self.t_status, dumps({"state": "offline", "device_id": device_id, "ts": None}).encode()),
            username=cfg.username, password=cfg.password, connect_timeout_s=cfg.connect_timeout_s)
        self._backoff = Backoff(cfg.backoff_min_s, cfg.backoff_max_s)
        self._next_attempt = 0.0
        self._inflight: dict[str, _InFlight] = {}
        self._by_mid: dict[int, str] = {}
        self._ids = itertools.count(1)
        self._boot = f"{int(time.time()):x}"
        self._was_connected = False
        self._next_status = 0.0
        self._more = True  # the outbox may hold unsent records

    # -- the loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    self.step()
                except Exception:  # an outbox locked for long, a full disk: never let sync die
                    log.exception("sync step failed; dropping the link and starting over")
                    self.link.abort()
                    stop.wait(self._backoff.next())
        finally:
            self._goodbye()

    def step(self) -> None:
        now = time.monotonic()
        link = self.link
        if link.idle:
            if self._was_connected:
                self._on_lost()
            if now < self._next_attempt:
                self.wake.wait(min(0.05, self._next_attempt - now))
                return
            try:
                link.connect()
            except OSError as exc:
                self._connect_failed(str(exc))
                return
        busy = self._more and link.connected and len(self._inflight) < self.cfg.window_batches
        link.step(0.0 if busy else 0.01)
        if link.idle:
            if not self._was_connected:
                self._connect_failed(link.last_error)
            return
        if not link.connected:
            return
        if not self._was_connected:
            self._on_connected()
        self._drain_inbox()
        self._fill_window()
        self._check_deadline(time.monotonic())
        if time.monotonic() >= self._next_status:
            self._publish_status()

    def _connect_failed(self, why: str) -> None:
        self.stats.connect_failures += 1
        delay = self._backoff.next()
        self._next_attempt = time.monotonic() + delay
        log.warning("broker connect failed", extra={"broker": f"{self.cfg.host}:{self.cfg.port}",
                                                    "error": why, "retry_in_s": round(delay, 2)})

    def _on_connected(self) -> None:
        self._was_connected = True
        self.stats.connects += 1
        self._backoff.reset()
        self._inflight.clear()
        self._by_mid.clear()
        self.outbox.release()
        self._more = True
        self.link.subscribe(self.t_ack, 1)
        self.link.subscribe(self.t_cmd, 1)
        self._publish_status()
        log.info("broker connected", extra={"broker": f"{self.cfg.host}:{self.cfg.port}"})

    def _on_lost(self) -> None:
        self._was_connected = False
        n = sum(f.count for f in self._inflight.values())
        self.stats.resent_after_reconnect += n
        self._inflight.clear()
        self._by_mid.clear()
        self.outbox.release()
        self._next_attempt = time.monotonic() + self._backoff.next()
        log.warning("broker connection lost", extra={"error": self.link.last_error, "unacked_records": n})

    # -- sending --------------------------------------------------------------------------------
    def _fill_window(self) -> None:
        self.wake.clear()
        while len(self._inflight) < self.cfg.window_batches:
            records = self.outbox.begin(self.cfg.batch_max_records)
            if not records:
                self._more = False
                return
            self._more = len(records) == self.cfg.batch_max_records
            batch_id = f"{self._boot}-{next(self._ids)}"
            try:
                mid = self.link.publish(self.t_records, encode_batch(self.device_id, batch_id, records), qos=1)
            except NotConnected:
                self.link.abort()
                return
            self._inflight[batch_id] = _InFlight(ranges_of([r.seq for r in records]), len(records),
                                                 time.monotonic(), mid, records)
            self._by_mid[mid] = batch_id
            self.stats.batches_sent += 1
            self.stats.records_sent += len(records)

    def _check_deadline(self, now: float) -> None:
        timeout = self.cfg.ack_timeout_s
        for batch_id, f in list(self._inflight.items()):
            if not f.pubacked:
                if now - f.sent_at > timeout:
                    self.stats.ack_timeouts += 1
                    log.warning("no PUBACK in time: link presumed half-open, reconnecting",
                                extra={"ack_timeout_s": timeout, "batches_in_flight": len(self._inflight)})
                    self.link.abort()
                    return
            elif now - f.sent_at > min(timeout * 2 ** min(f.attempt, 30), self.cfg.max_resend_interval_s):
                self._resend(batch_id, f)

    def _resend(self, batch_id: str, f: _InFlight) -> None:
        """The broker has the batch, the hub has not confirmed it: publish it again (the hub dedupes)."""
        try:
            mid = self.link.publish(self.t_records, encode_batch(self.device_id, batch_id, f.records), qos=1)
        except NotConnected:
            self.link.abort()
            return
        self._by_mid.pop(f.mid, None)
        self._by_mid[mid] = batch_id
        f.mid, f.sent_at, f.pubacked, f.attempt = mid, time.monotonic(), False, f.attempt + 1
        self.stats.hub_resends += 1
        if f.attempt == 1 or f.attempt % 10 == 0:
            log.warning("hub has not acked a stored batch; publishing it again",
                        extra={"batch": batch_id, "attempt": f.attempt, "records": f.count})

    # -- receiving ------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        inbox = self.link.inbox
        if inbox.pubacks:
            mids, inbox.pubacks = inbox.pubacks, []
            for mid in mids:
                batch_id = self._by_mid.get(mid)
                flight = self._inflight.get(batch_id) if batch_id else None
                if batch_id is None or flight is None:
                    continue
                if self.cfg.ack_mode == "broker":
                    del self._by_mid[mid], self._inflight[batch_id]
                    self._acked(flight.ranges)
                else:
                    flight.pubacked = True
        if inbox.messages:
            msgs, inbox.messages = inbox.messages, []
            acked: list[tuple[int, int]] = []
            for t, payload in msgs:
                if t == self.t_ack:
                    acked += self._on_ack(payload)
                elif t == self.t_cmd:
                    self._on_command(payload)
            if acked:
                self._acked(acked)  # one delete transaction for every ack that arrived together

    def _on_ack(self, payload: bytes) -> list[tuple[int, int]]:
        if self.cfg.ack_mode != "hub":
            return []
        try:
            ack = Ack.model_validate_json(payload)
        except ValidationError as exc:
            self.stats.bad_messages += 1
            log.warning("bad ack ignored", extra={"error": str(exc).splitlines()[0]})
            return []
        flight = self._inflight.pop(ack.batch, None)
        if flight is None:
            # not a batch of this connection (a stale, retained or stray ack): delete nothing; anything
            # it meant is still unacked here and gets resent, and the hub acks it again.
            self.stats.stale_acks += 1
            return []
        self._by_mid.pop(flight.mid, None)
        return intersect(flight.ranges, ack.ranges)  # only what we sent in that batch

    def _acked(self, ranges: list[tuple[int, int]]) -> None:
        self.stats.records_acked += self.outbox.ack(ranges)
        self.stats.last_ack_mono = time.monotonic()

    def _on_command(self, payload: bytes) -> None:
        reply_topic = self.t_cmd + "/reply"
        try:
            cmd = Command.model_validate_json(payload)
        except ValidationError as exc:
            err = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors())
            reply = CommandReply(id=None, ok=False, error=f"bad command: {err}")
        else:
            try:
                reply = CommandReply(id=cmd.id, ok=True, result=self._run_command(cmd))
            except Exception as exc:  # a command must never take the agent down
                reply = CommandReply(id=cmd.id, ok=False, error=f"{type(exc).__name__}: {exc}")
        try:
            self.link.publish(reply_topic, reply.model_dump_json(), qos=1)
        except NotConnected:
            pass

    def _run_command(self, cmd: Command) -> dict[str, Any]:
        if cmd.cmd == "ping":
            return {"pong": time.time()}
        if cmd.cmd == "status":
            return self.status()
        if cmd.cmd == "resend":
            self._inflight.clear()
            self._by_mid.clear()
            self.outbox.release()
            self._more = True
            return {"released": True}
        if self.commands:
            return self.commands(cmd)
        raise ValueError(f"unsupported command {cmd.cmd!r}")

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        ob = self.outbox.stats()
        return {"state": "online", "device_id": self.device_id, "ts": time.time(),
                "outbox": asdict(ob), "sync": asdict(self.stats), **self.status_fn()}

    def _publish_status(self) -> None:
        self._next_status = time.monotonic() + self.status_interval_s
        try:
            self.link.publish(self.t_status, dumps(self.status()), qos=1, retain=True)
        except NotConnected:
            pass

    def _goodbye(self) -> None:
        if self.link.connected:
            try:
                self.link.publish(self.t_status, dumps({"state": "offline", "device_id": self.device_id,
                                                        "ts": time.time()}), qos=1, retain=True)
            except NotConnected:
                pass
            self.link.disconnect(flush_s=1.0)
        else:
            self.link.abort()
