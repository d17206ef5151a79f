"""The hub service: subscribe (shared), store, then ack. One thread, an explicit loop.

Several hubs may run against one broker: they join the same shared-subscription group, and the broker
hands each records message to one of them. Each hub acks only what it stored itself. With `postgres` the
workers store into one PostgreSQL (hub/store_pg.py) and, by default, hold clean sessions: mosquitto keeps
handing a share of the group's messages to a persistent session whose worker died, where they wait unseen
until it returns; with clean sessions a dead worker's share goes to the live ones, and whatever it had
received but not acked is resent by its agents after their ack timeout. Health messages go to the same group
(one hub stores and counts each); status messages are subscribed plainly (every hub sets them, idempotently); a
health message that is not a valid Health of the device its topic names is counted (`health_refused`, and per
device in the store) and ignored.

Inbound bounds (core/inbound.py): each message's size is checked on its raw bytes before it is parsed
(records MAX_MESSAGE_BYTES, status MAX_STATUS_BYTES, health MAX_HEALTH_BYTES); a message on any topic other
than `{prefix}/{device}/records|alerts|status|health|photos` is refused as `unexpected_topic`. Refusals are counted per
cause (`refused`, also in the store) and logged at most once a minute per cause: a flood never fills the
journal. The hub subscribes to no replies or commands: those topics are operators'.

The alert lane: a unit sends its ALERT records in batches of their own on `{prefix}/{device}/alerts` (agent/sync.py),
and the hub reads that topic on a second MQTT session (client id `{client_id}-alerts`, share group `{group}-alerts`),
stepped before the bulk link in the same loop and stored in a transaction of its own before the next bulk one.
The broker keeps one queue per session: during a backlog burst it holds hundreds of thousands of records for the
bulk session, and a new alert queued behind them waited tens of seconds; on the lane it waits at most for the
bulk transaction in progress (sized from the store's recent rate to last about BULK_TXN_S). Both topics go
through the same intake, store and acks: (device_id, seq) is stored once whichever topic brought it, and alerts
on `/records` (older agents, the agent's resends) are stored as before. With a client certificate the broker
makes the certificate's name the client id (configs/broker: use_username_as_clientid), so the lane needs a
certificate of its own (`alerts_tls_cert`); without one, or with `alert_lane: false`, the bulk session reads
`/alerts` too (share group `{group}`: every hub of a group should run the lane, or none, else an alert reaches
one hub of each kind).

A burst is stored in a worker thread while this thread keeps servicing the MQTT link (keepalive pings,
reading what arrives next): a long store (a slow disk, a big backlog) never costs the hub its connection.
Messages that arrive meanwhile are handled in the next burst; past PENDING_MAX_BYTES of them nothing more is
read until the store is done (the broker holds the rest).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import ConfigDict, Field, ValidationError, model_validator

from customs_edge.core.inbound import Refusals, too_large
from customs_edge.core.mqtt import (
    BrokerSettings,
    Connected,
    Event,
    Lost,
    Message,
    MqttLink,
    NotConnected,
    Tls,
    install_client_id,
    step_links,
)
from customs_edge.core.records import Priority
from customs_edge.core.signing import load_registry
from customs_edge.core.wire import (
    ALERT_LANE,
    MAX_HEALTH_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_STATUS_BYTES,
    Ack,
    Alert,
    Health,
    Status,
    ranges_of,
    topic,
)
from customs_edge.hub import intake, liveness, parser, pings
from customs_edge.hub.photos import HEADER_MAX, MAX_PHOTO_BYTES, PhotoArchive
from customs_edge.hub.storage import HubStorage, open_store
from customs_edge.hub.store import MAX_SEQ_JUMP, Stored

log = logging.getLogger(__name__)


DEFAULT_DB = Path("/var/lib/customs-edge-hub/hub.db")  # systemd/customs-edge-hub.service's StateDirectory


class HubConfig(BrokerSettings):  # username, password (secret), tls_ca, tls_cert, tls_key, tls_server_name
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(1883, gt=0, lt=65536)
    topic_prefix: str = "customs-edge/v1"
    share_group: str | None = Field("hubs", description="MQTT shared-subscription group; null: plain")
    client_id: str | None = Field(None, description="default ce-hub-{host}-{hash of machine id and db path}:"
                                  " one per hub file, so two hubs on one host never take each other's session")
    db: Path = DEFAULT_DB
    postgres: str | None = Field(None, description="PostgreSQL URL (postgresql://USER@HOST:PORT/DBNAME): store"
                                 " there instead of the SQLite file `db`; several hub workers may share it"
                                 " (hub/store_pg.py, docs/scale.md)")
    photos_dir: Path | None = Field(None, description="evidence photos; default {db}.photos. Workers on one"
                                    " PostgreSQL: a directory they all reach")
    clean_session: bool | None = Field(None, description="default: persistent with SQLite (one hub: the broker"
                                       " queues for it while it restarts), clean with PostgreSQL (workers in a"
                                       " share group: the broker then hands messages only to live workers)")
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    keepalive_s: int = Field(10, ge=2, le=600, description="at most the broker's max_keepalive (600 s shipped)")
    keys: Path | None = Field(None, description="key registry, `DEVICE_ID ed25519:BASE64` lines: a registered"
                              " device's batches must carry its valid signature (restart the hub after an edit)")
    require_signatures: bool = Field(False, description="refuse batches of devices the registry does not list")
    max_seq_jump: int = Field(MAX_SEQ_JUMP, ge=1, description="a record whose seq is more than this past its"
                              " device's highest is quarantined as suspect (table `suspect`), not stored")
    alert_lane: bool = Field(True, description="read `{prefix}/+/alerts` (units' batches of ALERT records) on a second"
                             " MQTT session, serviced first: a new alert never waits behind a backlog; false: the bulk"
                             " session reads it")
    alerts_tls_cert: Path | None = Field(None, description="the alert lane's own client certificate (PEM; CN e.g."
                                         " hub-1-alerts, with its `user` block in the broker's ACL), with"
                                         " alerts_tls_key: the broker takes a certificate's name as client id, and two"
                                         " sessions need two. With tls_cert but without it, the lane is off")
    alerts_tls_key: Path | None = Field(None, description="the key of alerts_tls_cert (PEM, mode 0600)")
    parse_process: bool = Field(False, description="parse the bulk records in a child process while the worker's"
                                " thread stores (hub/parser.py): one worker then uses two cores; the alert lane's"
                                " batches and messages under 16 KiB are still parsed in the worker, at once")
    alive_interval_s: float | None = Field(5.0, ge=liveness.MIN_INTERVAL_S, le=60.0, description="while it stores,"
                                           " publish a HubAlive (retained, QoS 0) on {prefix}/fleet/hub-alive at most"
                                           " this often: units then wait for a hub behind a backlog instead of"
                                           " resending (hub/liveness.py); keep it under half the units'"
                                           " ack_timeout_s. null: none")

    @model_validator(mode="after")
    def _alerts_cert_and_key(self) -> HubConfig:
        if (self.alerts_tls_cert is None) != (self.alerts_tls_key is None):
            raise ValueError("alerts_tls_cert and alerts_tls_key go together: set both (the alert lane's own client"
                             " certificate) or neither")
        return self


class Out(NamedTuple):
    """A message the hub publishes (QoS 1 unless said otherwise)."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


class Hub:
    def __init__(self, cfg: HubConfig) -> None:
        self.cfg = cfg
        self.keys = load_registry(cfg.keys) if cfg.keys else {}
        self.store: HubStorage = open_store(cfg.postgres or cfg.db, cfg.synchronous, postgres=bool(cfg.postgres),
                                            max_seq_jump=cfg.max_seq_jump)
        # evidence photos by sha256 (hub/photos.py)
        self.photos = PhotoArchive(cfg.photos_dir or Path(f"{cfg.db}.photos"))
        clean = bool(cfg.postgres) if cfg.clean_session is None else cfg.clean_session
        client_id = cfg.client_id or (f"ce-hub-{socket.gethostname()}-{os.getpid()}" if cfg.postgres else
                                      install_client_id(f"ce-hub-{socket.gethostname()}", cfg.db))
        self.link = MqttLink(client_id, cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_session=clean,
                             **cfg.credentials(), backoff_min_s=0.5, backoff_max_s=10.0)
        self.lane = self._lane_link(f"{client_id}-alerts", clean)  # None: the bulk link reads the alerts too
        if self.lane is not None:  # short bulk reads: a step reading 200 big batches kept a stored alert waiting
            self.link.MAX_READS = self.BULK_READS
        self._lane_pending: list[tuple[str, bytes]] = []  # alert batches read, not yet stored
        self._subscribed = {"bulk": False, "lane": self.lane is None}
        self._bulk_rate = 2e6  # bytes of bulk messages stored per second, lately (a first guess, then measured)
        self.refused: Counter[str] = Counter()  # records messages refused whole, by kind (also in the store)
        self.health_refused: Counter[str] = Counter()  # health messages ignored, by kind (per device in the store)
        self.batches = 0
        self.ready = threading.Event()  # set once subscribed
        self.refusals = Refusals(log)  # every inbound refusal by cause, logged at most once a minute per cause
        self._pending: list[tuple[str, bytes]] = []  # arrived while the worker stored the previous burst
        self._pending_bytes = 0  # their payloads' bytes: past PENDING_MAX_BYTES nothing more is read on the bulk link
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="hub-store")
        # the bulk records' parse in a child process, while the worker thread stores (hub/parser.py)
        self.parser = parser.ParseProcess() if cfg.parse_process else None
        self.pings = pings.Pinged(cfg.topic_prefix)  # `customs-edge check`'s round trips (hub/pings.py)
        # "alive and storing", for the units' resend timers (hub/liveness.py)
        self.liveness = liveness.Liveness(cfg.topic_prefix, client_id, cfg.alive_interval_s) \
            if cfg.alive_interval_s else None

    def _lane_link(self, client_id: str, clean: bool) -> MqttLink | None:
        cfg = self.cfg
        if not cfg.alert_lane:
            return None
        credentials = cfg.credentials()
        if cfg.tls_cert is not None:
            if cfg.alerts_tls_cert is None:
                log.warning("alert lane off: with a client certificate it needs one of its own (the broker takes the"
                            " certificate's name as client id); issue one (`customs-edge certs issue hub-1-alerts"
                            " --role hub`, a `user` block in the broker's ACL) and set alerts_tls_cert and"
                            " alerts_tls_key. Until then alerts are read with the bulk records",
                            extra={"tls_cert": str(cfg.tls_cert)})
                return None
            credentials["tls"] = Tls(cfg.tls_ca, cfg.alerts_tls_cert, cfg.alerts_tls_key, cfg.tls_server_name)
        return MqttLink(client_id, cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_session=clean, **credentials,
                        backoff_min_s=0.5, backoff_max_s=10.0)

    def records_filter(self, kind: str = "records", group_suffix: str = "") -> str:
        f = f"{self.cfg.topic_prefix}/+/{kind}"
        return f"$share/{self.cfg.share_group}{group_suffix}/{f}" if self.cfg.share_group else f

    def lane_filter(self) -> str:
        """The lane's subscription: a share group of its own (`{group}-alerts`), so the subscription a bulk session
        kept from a run without the lane (or a lane session kept from a run with it) never takes a share of the
        alerts away from the live lane (each group gets its copy; the store keeps one)."""
        return self.records_filter(ALERT_LANE, "-alerts")

    def run(self, stop: threading.Event) -> None:
        if self.parser is not None:
            self.parser.start()
        while not stop.is_set():
            try:
                self._step(stop)
            except Exception:  # one bad message or a locked file must not take the hub down
                log.exception("hub step failed; continuing")
                stop.wait(0.5)
        for link in (self.lane, self.link):
            if link is not None:
                link.disconnect()
                link.close()
        self._worker.shutdown()
        if self.parser is not None:
            self.parser.close()
        self.store.close()

    def _step(self, stop: threading.Event) -> None:
        # links connect, back off by themselves; the broker holds the bulk beyond PENDING_MAX_BYTES read and not stored
        self._pending_bytes += self._service(0.0 if self._pending or self._lane_pending else 0.25,
                                             read=self._pending_bytes < self.PENDING_MAX_BYTES)
        self._handle_lane()
        self._handle()

    def _service(self, timeout: float, read: bool = True, read_lane: bool = True) -> int:
        """One step of the links, the alert lane first (one wait for both): what arrives goes to _lane_pending and
        _pending. Returns the bytes read on the bulk link."""
        lane_events: list[Event] = []
        if self.lane is None:
            bulk_events = self.link.step(timeout, read)
        else:
            lane_events, bulk_events = step_links([(self.lane, read_lane), (self.link, read)], timeout)
        for ev in lane_events:
            self._on_event(ev, self._lane_pending, lane=True)
        n = 0
        for ev in bulk_events:
            if isinstance(ev, Message):
                n += len(ev.payload)
                # a larger one is refused unread; a small one is parsed in the worker (parser.MIN_BYTES)
                if (self.parser is not None and parser.MIN_BYTES <= len(ev.payload) <= MAX_MESSAGE_BYTES
                        and self._kind(ev.topic) == "records"):
                    self.parser.submit(ev.payload)  # parsed there while the worker stores what came before
            self._on_event(ev, self._pending)
        if self.liveness is not None:  # a clock read until one is due; never raises
            self.liveness.tick(self.link, self.batches, self._pending_bytes + n)
        return n

    def _kind(self, t: str) -> str | None:
        """What a `{prefix}/{device}/{kind}` topic carries (None: not such a topic)."""
        prefix = self.cfg.topic_prefix + "/"
        parts = t[len(prefix):].split("/") if t.startswith(prefix) else []
        return parts[1] if len(parts) == 2 and parts[0] else None

    def _retained_refused_health(self, t: str, payload: bytes) -> bool:
        """Whether a retained copy is a health message the hub refuses: the broker hands it to every worker at each
        subscribe, and it was counted (in the store, per device) when it was published; counted again it would
        grow by the number of workers at every restart. Logged as its own cause, never stored or counted there."""
        if self._kind(t) != "health":
            return False
        h, kind, why = _health_check(t.split("/")[-2], payload)
        if h is None:
            self.refusals.refuse(f"health_{kind}_retained", "retained health message ignored (counted when"
                                 " published)", topic=t, reason=why)
        return h is None

    def _subscribe(self, lane: bool) -> None:
        if lane:
            assert self.lane is not None
            self.lane.subscribe(self.lane_filter(), 1)
            self._subscribed["lane"] = True
            log.info("hub subscribed", extra={"filter": self.lane_filter(), "client_id": self.lane.client_id})
            return
        # Always subscribe: a broker restarted without persistence forgot our session.
        self.link.subscribe(self.records_filter(), 1)
        if self.lane is None:  # the alerts with the bulk
            self.link.subscribe(self.records_filter(ALERT_LANE), 1)
        else:  # a persistent session may hold it from a run without the lane: alerts would queue behind the bulk
            self.link.unsubscribe(self.records_filter(ALERT_LANE))
        self.link.subscribe(f"{self.cfg.topic_prefix}/+/status", 1)
        # health in the share group, as records: one worker stores and counts each message (every worker counted a
        # refused one, which has no identity to keep it once by); a persistent session may hold the plain
        # subscription of an earlier run, which would still hand this worker every health message
        self.link.subscribe(self.records_filter("health"), 1)
        if self.cfg.share_group:
            self.link.unsubscribe(f"{self.cfg.topic_prefix}/+/health")
        self.link.subscribe(self.pings.filter(), 0)  # QoS 0: never queued for later
        self.link.subscribe(self.records_filter("photos"), 1)
        self._subscribed["bulk"] = True
        log.info("hub subscribed", extra={"filter": self.records_filter(), "client_id": self.link.client_id})

    def _on_event(self, ev: Event, messages: list[tuple[str, bytes]], lane: bool = False) -> None:
        if isinstance(ev, Message):
            if ev.retain and self._retained_refused_health(ev.topic, ev.payload):
                return
            messages.append((ev.topic, ev.payload))
        elif isinstance(ev, Connected):
            try:
                self._subscribe(lane)
            except NotConnected:  # lost again at once: its next Connected subscribes; the other events still count
                return
        elif isinstance(ev, Lost) and ev.was_connected:
            self._subscribed["lane" if lane else "bulk"] = False
        else:
            return
        if all(self._subscribed.values()):  # both sessions subscribed
            self.ready.set()
        else:
            self.ready.clear()

    PENDING_MAX_BYTES = 64 * 1024 * 1024  # read during a store; beyond it, the broker holds the rest

    def _serviced(self, work: Callable[[], list[Out]]) -> list[Out]:
        """Run `work` in the worker thread; meanwhile keep the link alive and collect what arrives (up to
        PENDING_MAX_BYTES: then nothing more is read until the store is done)."""
        job = self._worker.submit(work)
        job.add_done_callback(lambda _: self.link.waker.set())
        while not job.done():  # what waits already counts: one bound for everything read and not stored
            self._pending_bytes += self._service(0.25, read=self._pending_bytes < self.PENDING_MAX_BYTES,
                                                 read_lane=_size(self._lane_pending) < self.PENDING_MAX_BYTES)
        return job.result()

    BULK_READS = 16  # with the lane: packets the bulk link reads in one step (MqttLink.MAX_READS: 200)
    BULK_TXN_S = 0.2  # with the lane: a bulk store's target duration (an alert that arrives meanwhile waits that long)
    BULK_TXN_MIN_BYTES = 256 * 1024

    def _handle(self) -> None:
        """Store the bulk messages read so far: all of them in one transaction, or with the lane as many as the store
        takes in about BULK_TXN_S at the rate it reached lately (the rest wait for the next step, after the alerts
        read meanwhile)."""
        pending = self._pending
        if not pending:
            return
        limit = max(self.BULK_TXN_MIN_BYTES, self._bulk_rate * self.BULK_TXN_S) if self.lane else float("inf")
        j, size = 1, len(pending[0][1])
        while j < len(pending) and size + len(pending[j][1]) <= limit:
            size += len(pending[j][1])
            j += 1
        msgs, self._pending = pending[:j], pending[j:]
        self._pending_bytes -= size
        t0 = time.monotonic()
        self._store(msgs, self.link)
        if size >= self.BULK_TXN_MIN_BYTES:  # bytes/s, smoothed; small bursts are mostly fixed costs
            self._bulk_rate = (self._bulk_rate + size / max(time.monotonic() - t0, 1e-3)) / 2

    def _handle_lane(self) -> None:
        """The alert batches read so far, in a transaction of their own, acked over the lane's link."""
        if self._lane_pending:
            msgs, self._lane_pending = self._lane_pending, []
            self._store(msgs, self.lane or self.link)

    def _store(self, msgs: list[tuple[str, bytes]], link: MqttLink) -> None:
        outs = self._serviced(lambda: self.handle(msgs))
        for out in outs:
            try:
                (link if link.connected else self.link).publish(out.topic, out.payload, qos=out.qos, retain=out.retain)
            except NotConnected:
                return  # stored, not acked: the agent resends, we drop the duplicates and ack then

    def handle(self, messages: list[tuple[str, bytes]]) -> list[Out]:
        """Store what a burst of messages carries, in one transaction; return the acks and alerts to publish."""
        incoming: list[intake.Incoming] = []
        refused: Counter[str] = Counter()
        health: list[tuple[str, bytes]] = []
        out: list[Out] = []  # photo acks and ping answers
        for t, payload in messages:
            if self.pings.matches(t):  # bounded and paced by hub/pings.py itself
                out += [Out(*answer) for answer in self.pings.answer(t, payload)]
                continue
            kind = self._kind(t)
            if kind == "status":
                self._status(t, payload)
                continue
            if kind == "health":
                health.append((t, payload))
                continue
            if kind == "photos":
                if why := too_large(payload, MAX_PHOTO_BYTES + HEADER_MAX):
                    self.refusals.refuse("photo_too_large", "oversized photo message ignored unread", topic=t,
                                         reason=why)
                else:
                    ack = self.photos.handle(t, payload)
                    out += [Out(ack.topic, ack.payload)] if ack else []
                continue
            if kind != "records" and kind != ALERT_LANE:
                refused["unexpected_topic"] += 1
                self.refusals.refuse("unexpected_topic", "message on a topic the hub does not expect; ignored",
                                     topic=t, bytes=len(payload))
                continue
            prepared = intake.NOT_PREPARED if self.parser is None else self.parser.take(payload)
            try:
                b = intake.parse(t, payload, self.keys, self.cfg.require_signatures, prepared)
            except intake.Refused as exc:
                refused[exc.kind] += 1
                self.refusals.refuse(exc.kind, "refused a records message; not acked", topic=t, reason=exc.reason,
                                     bytes=len(payload))
                continue
            if kind == ALERT_LANE and any(r[5] != Priority.ALERT for r in b.rows):  # stored: counted, not refused
                self.refusals.refuse("alert_lane_not_alerts", "a batch on the alert lane holds records below ALERT"
                                     " priority: stored, but it delays other units' alerts", topic=t, batch=b.batch)
            if b.rejected:
                log.warning("rejected records that failed validation", extra={
                    "device": b.device_id, "batch": b.batch, "count": len(b.rejected), "seq": b.rejected[0].seq,
                    "reason": b.rejected[0].reason})
            incoming.append(b)
        if health:
            self._health(health)
        if not incoming and not refused:
            return out
        try:
            results = self.store.store(incoming, refused)
        except Exception:  # one batch the store refuses must not hold back the others: store one by one
            results = []
            for b in incoming:
                try:
                    results += self.store.store([b])
                except Exception as exc:
                    refused["store_failed"] += 1
                    self.refusals.refuse("store_failed", "store refused a batch; not acked", device=b.device_id,
                                         batch=b.batch, error=repr(exc))
            with contextlib.suppress(Exception):  # the counts of refused messages, in the store too if it can
                self.store.store([], refused)
        self.refused.update(refused)
        return out + [o for s in results for o in self._answer(s)]

    def _answer(self, s: Stored) -> list[Out]:
        self.batches += 1
        if s.suspect:
            self.refused["suspect_seq"] += len(s.suspect)
            self.refusals.refuse("suspect_seq", "records quarantined as suspect: an implausible seq jump",
                                 device=s.device_id, batch=s.batch, seq=s.suspect[0], count=len(s.suspect))
        ack = Ack(batch=s.batch, ranges=s.ranges, stored=s.stored, duplicates=s.duplicates, rejected=s.rejected,
                  ts=time.time())
        # QoS 0: a lost ack costs one resend, which is acked again as a duplicate; a QoS 1 ack would buy nothing (a unit
        # that reconnects resends its whole window anyway, and drops an ack for a batch it no longer holds in flight)
        # and cost a PUBACK at the hub, the broker and the unit for every batch
        out = [Out(topic(self.cfg.topic_prefix, s.device_id, "ack"), ack.model_dump_json().encode(), qos=0)]
        if s.conflicts:
            seqs = ranges_of(s.conflicts)
            log.warning("seq conflict", extra={"device": s.device_id, "seq": _seqs(seqs), "count": len(s.conflicts),
                                               "conflicts": s.device_conflicts, "stored_boot": ",".join(s.boots[0]),
                                               "new_boot": ",".join(s.boots[1])})
            alert = Alert(device_id=s.device_id, seqs=seqs, conflicts=s.device_conflicts, hub=self.link.client_id,
                          ts=time.time())
            out.append(Out(topic(self.cfg.topic_prefix, s.device_id, "alert"), alert.model_dump_json().encode(),
                           retain=True))
        return out

    def _health(self, messages: list[tuple[str, bytes]]) -> None:
        keep: list[tuple[str, float, str]] = []
        refused: Counter[str] = Counter()  # per device
        for t, payload in messages:
            device_id = t.split("/")[-2]
            h, kind, why = _health_check(device_id, payload)
            if h is not None:
                keep.append((device_id, h.ts, h.model_dump_json()))
                continue
            refused[device_id] += 1
            self.health_refused[kind] += 1
            self.refusals.refuse(f"health_{kind}", "health message ignored", topic=t, reason=why)
        try:
            self.store.put_health(keep, refused)
        except Exception as exc:  # telemetry: the next message replaces it; the records of this burst go on
            self.health_refused["store_failed"] += len(keep)
            log.warning("health messages not stored", extra={"messages": len(keep), "error": repr(exc)})

    def _status(self, t: str, payload: bytes) -> None:
        device_id = t.split("/")[-2]
        state: str = "?"
        unit_type = site = None
        if why := too_large(payload, MAX_STATUS_BYTES):
            self.refusals.refuse("status_too_large", "oversized status ignored unread", topic=t, reason=why)
        else:
            try:
                st = Status.model_validate_json(payload)
                state = st.state
                extra = st.model_extra or {}
                unit_type, site = (v if isinstance(v, str) and len(v) <= 64 else None
                                   for v in (extra.get("type"), extra.get("site")))
            except ValidationError:  # anything on a status topic, even a retained one, is only informational
                self.refusals.refuse("status_malformed", "status that is not a Status shown as '?'", topic=t)
        try:
            self.store.set_status(device_id, state, unit_type, site)
        except Exception as exc:  # informational, as health: the burst's records, health and counts go on (a broken
            # connection met here first is replaced by the store's next call)
            self.refusals.refuse("status_store_failed", "status not stored", topic=t, error=repr(exc))


def _health_check(device_id: str, payload: bytes) -> tuple[Health | None, str, str]:
    """A health message on `device_id`'s topic: (the Health, "", "") or (None, the refusal's kind, why)."""
    if len(payload) > MAX_HEALTH_BYTES:
        return None, "too_large", f"{len(payload)} bytes, at most {MAX_HEALTH_BYTES}"
    try:
        h = Health.model_validate_json(payload)
    except ValidationError as exc:
        return None, "malformed", intake._reason(exc, "message")
    if h.device_id != device_id:
        return None, "device_mismatch", f"device_id {h.device_id!r} on {device_id!r}'s topic"
    return h, "", ""


def _size(messages: list[tuple[str, bytes]]) -> int:
    return sum(len(p) for _, p in messages)


def _seqs(ranges: list[tuple[int, int]], most: int = 10) -> str:
    """[(1, 3), (7, 7)] -> "1-3,7" (the first `most` ranges), for a log line."""
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges[:most])
    return text + (",..." if len(ranges) > most else "")
