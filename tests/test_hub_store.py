"""Hub store: redeliveries are dropped, a reused seq with other content is kept apart, never lost; what
the store cannot keep is never acked; `hub stats` reads a database and never writes one."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from customs_edge.core.records import Pending
from customs_edge.core.wire import encode_batch
from customs_edge.hub import intake
from customs_edge.hub.store import SCHEMA, HubStore, StoreError


def batch(seqs: list[int], boot: str, batch_id: str = "b") -> intake.Incoming:
    """A batch as an agent encodes it, through the hub's intake."""
    recs = [Pending(s, 1.0, boot, float(s), "t", 1, json.dumps({"s": s, "boot": boot})) for s in seqs]
    return intake.parse("customs-edge/v1/d1/records", encode_batch("d1", batch_id, recs))


def holds(st: HubStore, b: intake.Incoming, seq: int) -> bool:
    """The hub holds exactly what `b` carried under `seq` (in records or in conflicts)."""
    sent = {row[1:] for row in b.rows if row[0] == seq}
    kept = set(st.db.execute("SELECT ts, boot_id, mono, type, priority, payload FROM records WHERE device_id='d1'"
                             " AND seq=?1 UNION ALL SELECT ts, boot_id, mono, type, priority, payload FROM conflicts"
                             " WHERE device_id='d1' AND seq=?1", (seq,)).fetchall())
    return bool(sent) and sent <= kept


def acked(ranges: list[tuple[int, int]]) -> list[int]:
    return [s for lo, hi in ranges for s in range(lo, hi + 1)]


def test_redelivery_is_a_duplicate_and_a_reused_seq_is_a_conflict_kept_apart(tmp_path: Path) -> None:
    st = HubStore(tmp_path / "hub.db")
    (first,) = st.store([batch([1, 2, 3], "boot-a")])
    assert (first.stored, first.duplicates) == (3, 0)
    (again,) = st.store([batch([2, 3], "boot-a")])  # the same records resent
    assert (again.stored, again.duplicates, again.conflicts) == (0, 2, [])
    # an outbox restored from an old image hands out seqs 2 and 3 again, for new records
    reused = batch([2, 3, 4], "boot-b")
    (r,) = st.store([reused])
    assert acked(r.ranges) == [2, 3, 4] and all(holds(st, reused, s) for s in acked(r.ranges))
    assert (r.stored, r.duplicates, r.conflicts, r.device_conflicts) == (1, 0, [2, 3], 2)
    (dev,) = st.stats()
    assert (dev.stored, dev.duplicates, dev.conflicts, dev.received) == (4, 2, 2, 8)
    (resent,) = st.store([batch([2, 3], "boot-b")])  # the conflicting records resent: plain duplicates now
    assert (resent.stored, resent.duplicates, resent.conflicts) == (0, 2, [])
    assert st.stats()[0].conflicts == 2
    assert st.db.execute("SELECT count(*) FROM conflicts").fetchone() == (2,)


def test_a_record_the_store_cannot_keep_is_never_acked(tmp_path: Path) -> None:
    """Before: INSERT OR IGNORE skipped a NaN mono (NOT NULL), and the batch was acked, counted as a duplicate."""
    st = HubStore(tmp_path / "hub.db")
    good = batch([1], "boot-a")
    nan = intake.Incoming("d1", "b2", [(2, 1.0, "boot-a", float("nan"), "t", 1, "{}")], [])
    with pytest.raises(sqlite3.IntegrityError):
        st.store([good, nan])
    assert st.db.execute("SELECT count(*) FROM records").fetchone() == (0,)  # the transaction is rolled back
    assert st.stats() == []


def test_a_non_finite_timestamp_costs_only_its_own_record(tmp_path: Path) -> None:
    """`encode_batch` used repr(): `inf` is not JSON, so the whole batch was refused, on every resend."""
    recs = [Pending(1, float("inf"), "b", 1.0, "t", 1, "{}"), Pending(2, 1.0, "b", float("nan"), "t", 1, "{}"),
            Pending(3, 1.0, "b", 3.0, "t", 1, "{}")]
    b = intake.parse("customs-edge/v1/d1/records", encode_batch("d1", "x", recs))
    (s,) = HubStore(tmp_path / "hub.db").store([b])
    assert (s.ranges, s.rejected, s.stored) == ([(3, 3)], [(1, 2)], 1)
    assert [(r.seq, r.reason.split(":")[0]) for r in b.rejected] == [(1, "ts"), (2, "mono")]


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "hub.db")
    db.executescript(SCHEMA[0] + ";PRAGMA user_version=1;")
    db.execute("INSERT INTO records VALUES ('d1', 1, 1.0, 'boot-a', 1.0, 't', 1, '{}', 0)")
    db.execute("INSERT INTO conflicts VALUES ('d1', 1, 1.0, 'boot-b', 1.0, 't', 1, '{}', 0)")
    db.execute("INSERT INTO devices (device_id, received, conflicts, stored, max_seq) VALUES ('d1', 2, 1, 1, 1)")
    db.commit()
    db.close()
    st = HubStore(tmp_path / "hub.db")
    assert st.db.execute("PRAGMA user_version").fetchone() == (len(SCHEMA),)
    (dev,) = st.stats()
    assert (dev.received, dev.stored, dev.conflicts, dev.rejected, dev.gaps) == (2, 1, 1, 0, 0)
    # the old conflict is still known: resent, it is a redelivery; the same seq with a third content is not
    again = intake.Incoming("d1", "b", [(1, 1.0, "boot-b", 1.0, "t", 1, "{}")], [])
    third = intake.Incoming("d1", "c", [(1, 1.0, "boot-b", 1.0, "t", 1, '{"x":1}')], [])
    assert [(s.duplicates, s.conflicts) for s in st.store([again, third])] == [(1, []), (0, [1])]


def stats_cli(db: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", "hub", "stats", "--db", str(db), *extra],
                          capture_output=True, text=True, timeout=60)


def test_hub_stats_on_a_mistyped_path_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "hbu" / "hub.db"
    out = stats_cli(typo)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(f"error: cannot open the hub database {typo}") and "--db" in out.stderr
    assert not typo.parent.exists()


def test_hub_stats_refuses_a_file_that_is_not_a_hub_database_and_leaves_it_as_it_was(tmp_path: Path) -> None:
    other = tmp_path / "outbox.db"
    sqlite3.connect(other).close()  # an empty SQLite file: the hub would have made it a hub database
    before = other.read_bytes()
    out = stats_cli(other)
    assert out.returncode == 1 and out.stderr == f"error: {other} is not a hub database\n"
    assert other.read_bytes() == before
    with pytest.raises(StoreError, match="not a hub database"):
        HubStore(other, readonly=True)


def test_hub_stats_escapes_what_devices_sent(tmp_path: Path) -> None:
    st = HubStore(tmp_path / "hub.db")
    st.set_status("evil\nlevel=error event=forged\x1b[2J", "online")
    st.close()
    out = stats_cli(tmp_path / "hub.db")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("evil\\nlevel=error event=forged\\x1b[2J ")
    assert all(c.isprintable() for c in out.stdout.replace("\n", ""))
    assert list(json.loads(stats_cli(tmp_path / "hub.db", "--json").stdout)["devices"]) == [
        "evil\nlevel=error event=forged\x1b[2J"]
