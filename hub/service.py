"""The hub service: subscribe (shared), store, then ack. One thread, an explicit loop.

Several hubs may run against one broker: they join the same shared-subscription group, and the broker
hands each records message to one of them. Each hub acks only what it stored itself.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from customs_edge.core.mqtt import Connected, Lost, Message, MqttLink, NotConnected, install_client_id
from customs_edge.core.wire import Ack, Batch, Status

log = logging.getLogger(__name__)


DEFAULT_DB = Path("/var/lib/customs-edge-hub/hub.db")  # systemd/customs-edge-hub.service's StateDirectory


class HubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(1883, gt=0, lt=65536)
    username: str | None = None
    password: str | None = None
    topic_prefix: str = "customs-edge/v1"
    share_group: str | None = Field("hubs", description="MQTT shared-subscription group; null: plain")
    client_id: str | None = Field(None, description="default ce-hub-{host}-{hash of machine id and db path}:"
                                  " one per hub file, so two hubs on one host never take each other's session")
    db: Path = DEFAULT_DB
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    keepalive_s: int = 10


class Hub:
    def __init__(self, cfg: HubConfig) -> None:
        from customs_edge.hub.store import HubStore

        self.cfg = cfg
        self.store = HubStore(cfg.db, cfg.synchronous)
        client_id = cfg.client_id or install_client_id(f"ce-hub-{socket.gethostname()}", cfg.db)
        self.link = MqttLink(client_id, cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_session=False,
                             username=cfg.username, password=cfg.password, backoff_min_s=0.5, backoff_max_s=10.0)
        self.rejected = 0
        self.batches = 0
        self.ready = threading.Event()  # set once subscribed

    def records_filter(self) -> str:
        f = f"{self.cfg.topic_prefix}/+/records"
        return f"$share/{self.cfg.share_group}/{f}" if self.cfg.share_group else f

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._step(stop)
            except Exception:  # one bad message or a locked file must not take the hub down
                log.exception("hub step failed; continuing")
                stop.wait(0.5)
        self.link.disconnect()
        self.link.close()
        self.store.close()

    def _step(self, stop: threading.Event) -> None:
        messages: list[tuple[str, bytes]] = []
        for ev in self.link.step(0.25):  # the link connects and backs off by itself
            if isinstance(ev, Message):
                messages.append((ev.topic, ev.payload))
            elif isinstance(ev, Connected):
                # Always subscribe: a broker restarted without persistence forgot our session.
                self.link.subscribe(self.records_filter(), 1)
                self.link.subscribe(f"{self.cfg.topic_prefix}/+/status", 1)
                self.ready.set()
                log.info("hub subscribed", extra={"filter": self.records_filter(), "client_id": self.link.client_id})
            elif isinstance(ev, Lost) and ev.was_connected:
                self.ready.clear()
        self._handle(messages)

    def _handle(self, messages: list[tuple[str, bytes]]) -> None:
        if not messages:
            return
        msgs = messages[:]
        messages.clear()
        batches: list[Batch] = []
        for t, payload in msgs:
            if t.endswith("/status"):
                self._status(t, payload)
                continue
            try:
                batch = Batch.model_validate_json(payload)
            except ValidationError as exc:
                self.rejected += 1
                log.warning("rejected a malformed records message",
                            extra={"topic": t, "error": str(exc).splitlines()[0], "bytes": len(payload)})
                continue
            if t.split("/")[-2] != batch.device_id:
                self.rejected += 1
                log.warning("rejected records whose device_id does not match the topic", extra={"topic": t})
                continue
            batches.append(batch)
        if not batches:
            return
        try:
            results = self.store.store(batches)
        except Exception:  # one batch the store refuses must not hold back the others: store one by one
            results = []
            for b in batches:
                try:
                    results += self.store.store([b])
                except Exception as exc:
                    self.rejected += 1
                    log.warning("store refused a batch; not acked", extra={"device_id": b.device_id,
                                                                          "batch": b.batch, "error": repr(exc)})
        for s in results:
            self.batches += 1
            ack = Ack(batch=s.batch.batch, ranges=s.ranges, stored=s.stored, duplicates=s.duplicates)
            try:
                self.link.publish(f"{self.cfg.topic_prefix}/{s.batch.device_id}/ack", ack.model_dump_json(), qos=1)
            except NotConnected:
                return  # stored, not acked: the agent resends, we drop the duplicates and ack then

    def _status(self, t: str, payload: bytes) -> None:
        device_id = t.split("/")[-2]
        state: str
        try:
            state = Status.model_validate_json(payload).state
        except ValidationError:  # anything on a status topic, even a retained one, is only informational
            state = "?"
        self.store.set_status(device_id, state)
