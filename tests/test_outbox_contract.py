"""The outbox contract, run against every Outbox implementation and durability setting."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from customs_edge.agent.outbox import MIGRATIONS, Outbox, SqliteOutbox
from customs_edge.core.records import Priority, RecordIn

Factory = Callable[..., SqliteOutbox]


@pytest.fixture(params=["FULL", "NORMAL"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    opened: list[SqliteOutbox] = []

    def factory(**kw: object) -> SqliteOutbox:
        ob = SqliteOutbox(tmp_path / "outbox.db", synchronous=request.param, **kw)  # type: ignore[arg-type]
        opened.append(ob)
        return ob

    yield factory
    for ob in opened:
        try:
            ob.close()
        except sqlite3.ProgrammingError:
            pass


def recs(n: int, prio: Priority = Priority.EVENT, size: int = 10, ts: float | None = None) -> list[RecordIn]:
    return [RecordIn(type="t", priority=prio, payload={"i": i, "pad": "x" * size},
                     **({"ts": ts} if ts is not None else {})) for i in range(n)]


def test_implements_the_protocol(make: Factory) -> None:
    ob: Outbox = make()
    assert isinstance(ob.put(recs(1)), range)


def test_seqs_are_monotonic_and_survive_restart_and_deletion(make: Factory) -> None:
    ob = make()
    assert list(ob.put(recs(3))) == [1, 2, 3]
    ob.ack([(1, 3)])  # all gone: a plain rowid would restart at 1
    ob.close()
    ob = make()
    assert list(ob.put(recs(2))) == [4, 5]
    assert ob.stats().last_seq == 5


def test_put_is_durable_before_it_returns(make: Factory, tmp_path: Path) -> None:
    ob = make()
    ob.put(recs(5))
    other = sqlite3.connect(tmp_path / "outbox.db")  # another connection, as after a crash
    assert other.execute("SELECT count(*) FROM records").fetchone()[0] == 5
    other.close()


def test_begin_hands_out_each_record_once_until_release(make: Factory) -> None:
    ob = make()
    ob.put(recs(10))
    a = ob.begin(4)
    b = ob.begin(100)
    assert [r.seq for r in a] == [1, 2, 3, 4] and [r.seq for r in b] == list(range(5, 11))
    assert ob.begin(10) == []
    ob.ack([(1, 4)])
    ob.release()
    assert [r.seq for r in ob.begin(100)] == list(range(5, 11))


def test_higher_priority_first(make: Factory) -> None:
    ob = make()
    ob.put(recs(3, Priority.TELEMETRY))
    ob.put(recs(2, Priority.ALERT))
    ob.put(recs(2, Priority.REPORT))
    got = ob.begin(5)
    assert [r.priority for r in got] == [3, 3, 2, 2, 0]
    assert [r.seq for r in got] == [4, 5, 6, 7, 1]


def test_ack_is_idempotent_and_exact(make: Factory) -> None:
    ob = make()
    ob.put(recs(10))
    assert ob.ack([(2, 4), (8, 8)]) == 4
    assert ob.ack([(2, 4)]) == 0
    assert ob.ack([(100, 200)]) == 0
    ob.release()
    assert [r.seq for r in ob.begin(100)] == [1, 5, 6, 7, 9, 10]


def test_payload_round_trips_as_json_text(make: Factory) -> None:
    ob = make()
    ob.put([RecordIn(type="scan", payload={"code": "]C10109506000134352", "ok": True, "v": [1.5, None]})])
    (r,) = ob.begin(1)
    assert r.payload == '{"code":"]C10109506000134352","ok":true,"v":[1.5,null]}'
    assert r.type == "scan" and r.boot_id and r.mono > 0


def test_size_cap_drops_oldest_lowest_priority_first_never_alerts(make: Factory) -> None:
    ob = make(max_mb=0.5)
    ob.put(recs(50, Priority.ALERT, size=500))
    ob.put(recs(600, Priority.EVENT, size=500))
    ob.put(recs(600, Priority.TELEMETRY, size=500))
    ob.enforce_cap()
    st = ob.stats()
    assert st.used_bytes <= 0.5 * 1024 * 1024
    assert st.dropped.get("dropped.telemetry", 0) > 0
    ob.release()
    left = ob.begin(10_000)
    prios = [r.priority for r in left]
    assert prios.count(int(Priority.ALERT)) == 50  # every alert kept
    if st.dropped.get("dropped.event"):
        assert int(Priority.TELEMETRY) not in prios  # events only go once telemetry is gone
    events = [r.seq for r in left if r.priority == int(Priority.EVENT)]
    assert events == sorted(events) and events[-1] == 650  # the newest kept, the oldest dropped


def test_alerts_alone_may_exceed_the_cap(make: Factory) -> None:
    ob = make(max_mb=0.05)
    ob.put(recs(200, Priority.ALERT, size=500))
    ob.enforce_cap()
    assert ob.stats().pending == 200


def test_age_cap_spares_alerts_and_clockless_boots(make: Factory) -> None:
    earlier = make(max_age_days=1, boot="an-earlier-boot")  # records of a previous boot age by wall clock
    old = time.time() - 3 * 86400
    earlier.put(recs(3, Priority.EVENT, ts=old))
    earlier.put(recs(2, Priority.ALERT, ts=old))
    earlier.put(recs(4, Priority.EVENT, ts=86400.0))  # 1970: a Pi before NTP, not an old record
    earlier.close()
    ob = make(max_age_days=1)
    ob.put(recs(1, Priority.EVENT))
    assert ob.stats().pending == 7  # opening applied the cap: 3 old events gone
    assert ob.stats().dropped == {"dropped.event": 3}


def test_age_within_this_boot_is_monotonic_so_a_clock_jump_drops_nothing(
        make: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    import customs_edge.agent.outbox as mod

    ob = make(max_age_days=1)
    ob.put(recs(4))
    real_time, real_mono = time.time, time.monotonic
    monkeypatch.setattr(mod.time, "time", lambda: real_time() + 365 * 86400)  # NTP/GPS jumps a year ahead
    assert ob.enforce_cap() == {}
    monkeypatch.setattr(mod.time, "monotonic", lambda: real_mono() + 2 * 86400)  # two days really pass
    assert ob.enforce_cap() == {int(Priority.EVENT): 4}


def test_drop_counters_survive_restart(make: Factory) -> None:
    earlier = make(max_age_days=1, boot="an-earlier-boot")
    earlier.put(recs(3, ts=time.time() - 5 * 86400))
    earlier.close()
    ob = make(max_age_days=1)
    ob.close()
    ob = make(max_age_days=1)
    assert ob.stats().dropped == {"dropped.event": 3}


def test_schema_version_and_refusal_of_a_newer_file(make: Factory, tmp_path: Path) -> None:
    ob = make()
    ob.close()
    db = sqlite3.connect(tmp_path / "outbox.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this agent knows"):
        make()
