"""Inbound bounds on both sides, without a broker: sizes checked before parsing, refusals counted per cause and
logged once a minute per cause (a flood never fills the journal), commands rate-limited, implausible seq jumps
quarantined, seq squatting refused, `status` reading counters only, batch ids unguessable."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.agent.sync import Sync
from customs_edge.core.inbound import Refusals, TokenBucket
from customs_edge.core.mqtt import Message
from customs_edge.core.records import RecordIn
from customs_edge.core.signing import DeviceKey
from customs_edge.core.wire import MAX_COMMAND_BYTES, SEQ_MAX, Ack, encode_batch
from customs_edge.hub.service import Hub, HubConfig
from tests.fakes import FakeLink, MemOutbox
from tests.fleet import rec, records_msg

PREFIX = "customs-edge/v1"
MB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    """A logger's warnings and errors (its INFO lines, e.g. "broker connected" from a fake link, are not counted)."""
    return [r for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Python memory allocated at the peak of `fn()` beyond what was allocated before it."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def command(cmd: str, cid: str, **args: Any) -> bytes:
    return json.dumps({"id": cid, "cmd": cmd, "ts": time.time(), "args": args}).encode()


def test_model_chunks_are_not_paced_by_the_command_rate(tmp_path: Path) -> None:
    """A model update is hundreds of model_chunk commands: each is checked against its offered hash, so they
    are not counted against commands_per_s (the others are)."""
    seen: list[str] = []
    ob, link = MemOutbox(), FakeLink()
    sync = Sync("dev", ob, SyncConfig(), outbox_path=tmp_path / "o.db", link=link,
                commands=lambda c: seen.append(c.cmd) or {"ok": 1})
    sync.command_bucket = TokenBucket(1.0, 2, clock=Clock())
    link.connect()
    sync.step()
    for i in range(50):
        link.deliver(f"{PREFIX}/dev/cmd", command("model_chunk", f"c{i}", transfer="m@1", file="f", index=i))
    for i in range(3):
        link.deliver(f"{PREFIX}/dev/cmd", command("model_install", f"i{i}", transfer="m@1"))
    sync.step()
    assert seen == ["model_chunk"] * 50 + ["model_install"] * 2 and sync.stats.commands_rate_limited == 1


def agent(tmp_path: Path, **cfg: Any) -> tuple[Sync, FakeLink, MemOutbox]:
    ob, link = MemOutbox(), FakeLink()
    sync = Sync("dev", ob, SyncConfig(**cfg), outbox_path=tmp_path / "outbox.db", link=link)
    link.connect()
    sync.step()
    return sync, link, ob


def replies(link: FakeLink) -> list[dict[str, Any]]:
    return [p.json() for p in link.published if p.topic.endswith("/cmd/reply")]


def test_refusals_are_counted_each_and_logged_once_a_minute_per_cause(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    r = Refusals(logging.getLogger("t.refusals"), every_s=60, clock=clock)
    with caplog.at_level("WARNING"):
        for i in range(10_000):
            r.refuse("malformed" if i % 2 else "too_large", "refused", topic="x" * 70_000)
        clock.t += 60
        r.refuse("malformed", "refused")
    assert r.counts == {"malformed": 5001, "too_large": 5000}
    got = [(x.cause, x.refused, x.not_logged, len(getattr(x, "topic", ""))) for x in lines(caplog, "t.refusals")]
    assert got == [("too_large", 1, 0, 200), ("malformed", 1, 0, 200), ("malformed", 5001, 4999, 0)]


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    b = TokenBucket(2.0, 3, clock=clock)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    assert b.wait_s() == pytest.approx(0.5)
    clock.t += 0.5
    assert [b.take(), b.take()] == [True, False]


def test_a_flood_of_10000_bad_commands_is_refused_counted_and_logs_a_few_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sync, link, _ = agent(tmp_path)
    sync.command_bucket = TokenBucket(1.0, 10, clock=Clock())  # time stands still: 10 tokens in all
    with caplog.at_level("WARNING"):
        for i in range(5_000):
            link.deliver(f"{PREFIX}/dev/cmd", b'{"id": "%d", "cmd": "reboot"' % i)  # truncated JSON
            link.deliver(f"{PREFIX}/dev/cmd", command("ping", f"p{i}"))  # well-formed, one too many
        link.deliver(f"{PREFIX}/dev/ack", b"\xff" * 10)
        link.deliver(f"{PREFIX}/dev/elsewhere", b"{}")  # a topic the unit never subscribed to
        sync.step()
    assert sync.refusals.counts == {"command_malformed": 5000, "command_rate_limited": 4990, "ack_malformed": 1,
                                    "unexpected_topic": 1}
    assert (sync.stats.commands_refused, sync.stats.commands_rate_limited, sync.stats.bad_messages) == (5000, 4990, 1)
    assert sync.stats.commands == 10
    assert len(lines(caplog, "customs_edge.agent.sync")) == 4  # one per cause
    answered = replies(link)
    assert len(answered) == 10_000 and sum(a["ok"] for a in answered) == 10  # one answer each, never more
    assert answered[-1]["error"].startswith("rate limited: at most 10 commands at once and 1/s; send it again in")
    assert answered[-1]["id"] == "p4999"
    assert sync.status()["sync"]["refused"] == sync.refusals.counts


def test_a_flood_of_10000_bad_messages_at_the_hub_is_counted_and_logs_a_few_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub(HubConfig(port=1, db=tmp_path / "hub.db"))
    flood = [(f"{PREFIX}/dev-x/records", b"[" * 50), (f"{PREFIX}/dev-x/records", records_msg("dev-y", "b", [rec(1)])),
             (f"{PREFIX}/dev-x/cmd/reply", b"{}"), (f"{PREFIX}/dev-x/health", b"{}"), (f"{PREFIX}/dev-x/status", b"[")]
    with caplog.at_level("WARNING"):
        for _ in range(20):  # 10,000 messages
            assert hub.handle(flood * 100) == []  # nothing acked
    n = 2000  # of each kind
    assert hub.refusals.counts == {"malformed": n, "device_mismatch": n, "unexpected_topic": n,
                                   "health_malformed": n, "status_malformed": n}
    assert hub.refused == {"malformed": n, "device_mismatch": n, "unexpected_topic": n}
    assert hub.store.refused() == {"device_mismatch": n, "malformed": n, "unexpected_topic": n}
    assert len(lines(caplog, "customs_edge.hub.service")) == 5
    hub.store.close()


def test_a_100_mb_command_is_refused_unread(tmp_path: Path) -> None:
    sync, link, _ = agent(tmp_path)
    big = b'{"id": "big", "cmd": "ping", "ts": %f, "args": {"pad": "' % time.time() + b"x" * (100 * MB) + b'"}}'
    used = peak_bytes(lambda: sync._on_command(Message(f"{PREFIX}/dev/cmd", big)))
    assert used < MB, f"{used} bytes allocated handling a 100 MB command"
    sync.step()
    (reply,) = replies(link)
    assert reply == {"id": None, "ok": False, "result": None, "outcome": None,
                     "error": f"command too large: {len(big)} bytes, at most {MAX_COMMAND_BYTES}"}
    assert sync.refusals.counts == {"command_too_large": 1} and sync.stats.commands == 0


def test_an_oversized_ack_is_refused_unread(tmp_path: Path) -> None:
    sync, _, _ = agent(tmp_path)
    big = Ack(batch="b", ranges=[(i, i) for i in range(1, 200_000, 2)]).model_dump_json().encode()
    used = peak_bytes(lambda: sync._on_ack(big))
    assert used < len(big) // 4 and sync.refusals.counts == {"ack_too_large": 1}


def test_a_100_mb_batch_is_refused_unread_at_the_hub(tmp_path: Path) -> None:
    hub = Hub(HubConfig(port=1, db=tmp_path / "hub.db"))
    big = records_msg("dev-a", "b", [rec(1, payload={"pad": "x" * (100 * MB)})])
    out: list[Any] = []
    used = peak_bytes(lambda: out.extend(hub.handle([(f"{PREFIX}/dev-a/records", big)])))
    assert used < MB, f"{used} bytes allocated handling a 100 MB batch"
    assert out == [] and hub.refused == {"too_large": 1} and hub.store.refused() == {"too_large": 1}
    hub.store.close()


def test_batch_ids_are_unguessable(tmp_path: Path) -> None:
    ids = []
    for i in range(2):  # two starts in the same second
        ob, link = MemOutbox(), FakeLink()
        ob.put([RecordIn(type="t", payload={})])
        sync = Sync("dev", ob, SyncConfig(), outbox_path=tmp_path / f"o{i}.db", link=link)
        link.connect()
        sync.step()
        ids.append(link.batches()[0].json()["batch"])
    prefixes = [i.rsplit("-", 1)[0] for i in ids]
    assert prefixes[0] != prefixes[1] and all(len(p) == 16 for p in prefixes)  # 64 random bits each
    assert f"{int(time.time()):x}" not in ids[0]  # not the start time


def test_status_reads_counters_never_the_outbox(tmp_path: Path) -> None:
    """`status` (also the command) costs the same whatever the backlog: no scan of the records."""
    def cost(pending: int) -> int:
        ob = SqliteOutbox(tmp_path / f"{pending}.db", device_id="dev")
        ob.put([RecordIn(type="t", payload={"i": i}) for i in range(pending)])
        sync = Sync("dev", ob, SyncConfig(), outbox_path=tmp_path / f"{pending}.db", link=FakeLink())
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        ob._db.set_progress_handler(count, 1)  # one call per SQLite VM instruction
        assert sync.status()["outbox"]["pending"] == pending
        ob._db.set_progress_handler(None, 1)
        ob.close()
        return steps[0]

    small, large = cost(10), cost(20_000)
    assert large <= small * 1.1 + 50, (small, large)


# -- seq squatting and implausible jumps at the hub -------------------------------------------------------

def signed_batches(key: DeviceKey | None, device: str, n: int, per: int, tmp_path: Path, name: str) -> list[bytes]:
    ob = SqliteOutbox(tmp_path / f"{name}.db", device_id=device)
    ob.put([RecordIn(type="weighing", payload={"i": i, "by": name}) for i in range(n)])
    out, k = [], 0
    while batch := ob.begin(per):
        out.append(encode_batch(device, f"{name}-{k}", batch, key))
        ob.ack([(batch[0].seq, batch[-1].seq)])
        k += 1
    ob.close()
    return out


def test_300_squatted_records_do_not_push_the_real_units_into_conflicts(tmp_path: Path) -> None:
    """300 records sent as dev-real before the real unit: unsigned, and signed by another key. With dev-real's
    key registered, both are refused whole; the real unit's 201 records are then all stored, none in conflict.
    (Over mTLS the broker already drops them: tests/test_attacks.py.)"""
    real, rogue = DeviceKey.beside(tmp_path / "real" / "o.db"), DeviceKey.beside(tmp_path / "rogue" / "o.db")
    reg = tmp_path / "keys.txt"
    reg.write_text(f"dev-real {real.public}\n")
    hub = Hub(HubConfig(port=1, db=tmp_path / "hub.db", keys=reg))
    t = f"{PREFIX}/dev-real/records"
    for attack in (signed_batches(None, "dev-real", 300, 100, tmp_path, "unsigned"),
                   signed_batches(rogue, "dev-real", 300, 100, tmp_path, "rogue")):
        assert hub.handle([(t, m) for m in attack]) == []
    assert hub.refused == {"unsigned": 3, "forged": 3}
    outs = hub.handle([(t, m) for m in signed_batches(real, "dev-real", 201, 100, tmp_path, "real")])
    assert len(outs) == 3 and all(o.topic.endswith("/ack") for o in outs)  # acks, no seq_conflict alert
    (st,) = hub.store.stats()
    assert (st.stored, st.conflicts, st.gaps, st.max_seq) == (201, 0, 0, 201)
    assert hub.store.verify("dev-real").bad_seq is None
    hub.store.close()


def test_a_replayed_batch_adds_nothing_and_on_another_topic_is_refused(tmp_path: Path) -> None:
    key = DeviceKey.beside(tmp_path / "dev" / "o.db")
    reg = tmp_path / "keys.txt"
    reg.write_text(f"dev-real {key.public}\n")
    hub = Hub(HubConfig(port=1, db=tmp_path / "hub.db", keys=reg))
    (batch,) = signed_batches(key, "dev-real", 20, 100, tmp_path, "real")
    (first,) = hub.handle([(f"{PREFIX}/dev-real/records", batch)])
    replays = hub.handle([(f"{PREFIX}/dev-real/records", batch)] * 5)  # captured off the broker, sent again
    assert Ack.model_validate_json(first.payload).stored == 20
    assert [(a.stored, a.duplicates) for a in map(Ack.model_validate_json, (o.payload for o in replays))] == \
        [(0, 20)] * 5  # acked (the unit may have lost the first ack), nothing stored twice
    assert hub.handle([(f"{PREFIX}/dev-other/records", batch)]) == []  # replayed as another device
    (st,) = hub.store.stats()
    assert (st.device_id, st.stored, st.conflicts) == ("dev-real", 20, 0) and hub.refused == {"device_mismatch": 1}
    hub.store.close()


@pytest.mark.parametrize("before", [0, 3])
def test_one_record_at_seq_2_63_minus_1_is_quarantined_not_9e18_gaps(tmp_path: Path, before: int) -> None:
    hub = Hub(HubConfig(port=1, db=tmp_path / "hub.db"))
    t = f"{PREFIX}/dev-j/records"
    if before:
        hub.handle([(t, records_msg("dev-j", "a", [rec(s) for s in range(1, before + 1)]))])
    msg = records_msg("dev-j", "j", [rec(SEQ_MAX), rec(before + 1)])
    for _ in range(2):  # the ack lost: the unit resends the batch, and it is named rejected again, counted once
        (out,) = hub.handle([(t, msg)])
        ack = Ack.model_validate_json(out.payload)
        assert ack.ranges == [(before + 1, before + 1)] and ack.rejected == [(SEQ_MAX, SEQ_MAX)]  # dead-lettered
    (st,) = hub.store.stats()
    assert (st.max_seq, st.gaps, st.suspect, st.stored) == (before + 1, 0, 1, before + 1)
    assert hub.refused["suspect_seq"] == 1 and hub.refusals.counts == {"suspect_seq": 1}
    db = sqlite3.connect(tmp_path / "hub.db")
    assert db.execute("SELECT device_id, seq, batch FROM suspect").fetchall() == [("dev-j", SEQ_MAX, "j")]
    assert hub.store.gap_ranges("dev-j") == []
    # an implausible seq on a record that fails validation anyway is not named either: no ack, no gaps
    (out,) = hub.handle([(t, records_msg("dev-j", "k", [rec(2**62, ts="NaN")]))])
    assert Ack.model_validate_json(out.payload).rejected == [] and hub.store.stats()[0].gaps == 0
    hub.store.close()


def test_a_plausible_jump_is_stored_as_before(tmp_path: Path) -> None:
    hub = Hub(HubConfig(port=1, db=tmp_path / "hub.db", max_seq_jump=1000))
    t = f"{PREFIX}/dev-p/records"
    (out,) = hub.handle([(t, records_msg("dev-p", "a", [rec(1), rec(1001), rec(2001), rec(3002)]))])
    ack = Ack.model_validate_json(out.payload)
    assert ack.ranges == [(1, 1), (1001, 1001), (2001, 2001)] and ack.rejected == [(3002, 3002)]
    assert hub.store.stats()[0].max_seq == 2001
    hub.store.close()


def test_bad_photo_acks_are_counted_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A photo ack nested past the parser's stack raised RecursionError out of the sync's step (the unit then
    dropped its link); now every bad one is counted, one log line per cause."""
    from customs_edge.agent.photos import PhotoSender, PhotoStore

    sender = PhotoSender(PhotoStore(tmp_path / "photos", 10), "dev", PREFIX)
    t = f"{PREFIX}/dev/photos/ack"
    with caplog.at_level("WARNING"):
        for payload in (b"[" * 1020, b"[1]", b"x" * 5000) * 100:
            assert sender.on_message(Message(t, payload))
    assert sender.refusals.counts == {"photo_ack_malformed": 200, "photo_ack_too_large": 100}
    assert len(lines(caplog, "customs_edge.agent.photos")) == 2


def test_photo_messages_at_the_hub_are_bounded_and_logged_once_per_cause(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub(HubConfig(port=1, db=tmp_path / "hub.db"))
    t = f"{PREFIX}/dev-p/photos"
    with caplog.at_level("WARNING"):
        for _ in range(1000):
            assert hub.handle([(t, b"no header"), (t, b'{"device_id": "other"}\nxx')]) == []
        big = b'{"v":1}\n' + b"x" * (17 * MB)
        used = peak_bytes(lambda: hub.handle([(t, big)]))
    assert used < MB and hub.refusals.counts == {"photo_too_large": 1}
    assert hub.photos.counts["malformed"] == 2000
    assert len(lines(caplog, "customs_edge.hub.photos")) == 1 and len(lines(caplog, "customs_edge.hub.service")) == 1
    hub.store.close()
