"""Evidence photos: the device's store (cap, durability, damaged files) and the hub's archive (hash checked
before the ack, stored once)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from customs_edge.agent.photos import PhotoSender, PhotoStore, encode_photo
from customs_edge.core.mqtt import Message
from customs_edge.hub.photos import PhotoArchive

T = "customs-edge/v1/hh-1/photos"


def test_the_store_keeps_photos_under_its_cap_and_across_restarts(tmp_path: Path) -> None:
    store = PhotoStore(tmp_path / "p", max_mb=1.5 / 1024)  # 1.5 kB
    a = store.put(b"a" * 1000)
    assert a == hashlib.sha256(b"a" * 1000).hexdigest() and store.path(a).read_bytes() == b"a" * 1000
    assert store.put(b"a" * 1000) == a  # the same bytes: one copy
    assert store.put(b"b" * 1000) is None and store.stats.refused_cap == 1  # over the cap: refused, counted
    again = PhotoStore(tmp_path / "p", max_mb=1.5 / 1024)
    assert again.pending() == [a]
    store.path(a).write_bytes(b"tampered")  # bytes that no longer match their name are never sent
    assert again.read(a) is None and again.stats.corrupt == 1 and again.pending() == []
    assert (tmp_path / "p" / "corrupt" / f"{a}.jpg").exists()


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        self.sent.append((topic, payload))
        return len(self.sent)


def test_a_photo_is_deleted_only_when_the_hub_stored_its_bytes(tmp_path: Path) -> None:
    store = PhotoStore(tmp_path / "dev", max_mb=10)
    shas = [store.put(bytes([i]) * 5000) for i in range(3)]
    sender = PhotoSender(store, "hh-1", "customs-edge/v1", window=2, ack_timeout_s=0.0)
    link = FakeLink()
    sender.step(link, records_idle=False)  # records still to send: photos wait
    assert link.sent == []
    sender.step(link, records_idle=True)
    assert len(link.sent) == 2  # the window
    hub = PhotoArchive(tmp_path / "hub")
    t, payload = link.sent[0]
    head, data = payload.split(b"\n", 1)
    bad = head + b"\n" + data[:-1] + b"X"  # damaged on the way
    ack = hub.handle(t, bad)
    assert ack is not None and json.loads(ack.payload)["stored"] is False and hub.counts["bad_hash"] == 1
    sender.on_message(Message(ack.topic, ack.payload))
    assert store.pending(10) == shas  # not deleted
    ack = hub.handle(t, payload)
    assert ack is not None and ack.topic == T + "/ack"
    sender.on_message(Message(ack.topic, ack.payload))
    assert shas[0] not in store.pending(10) and hub.path(shas[0]).read_bytes() == data  # type: ignore[arg-type]
    again = hub.handle(t, payload)  # a resend: acked, stored once
    assert again is not None and json.loads(again.payload)["stored"] and hub.counts["duplicates"] == 1
    # a message for another device on this topic, or without a header: refused, not acked
    assert hub.handle(T, encode_photo("someone-else", shas[1], b"x", 0.0)) is None  # type: ignore[arg-type]
    assert hub.handle(T, b"no header") is None and hub.counts["malformed"] == 2
