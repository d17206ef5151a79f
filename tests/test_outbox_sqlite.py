"""What only the SQLite outbox does: survive restarts and kills, cap itself by size, age and free disk
space, recover from a full disk, keep one device's file to that device and process, notice a file
deleted or replaced under it, and keep its counts without scanning the table."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import customs_edge.agent.outbox as mod
from customs_edge.agent.outbox import MIGRATIONS, OutboxError, SqliteOutbox, read_stats
from customs_edge.core.records import Priority, RecordIn
from tests.conftest import wait_for

Factory = Callable[..., SqliteOutbox]


@pytest.fixture(params=["FULL", "NORMAL"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    opened: list[SqliteOutbox] = []

    def factory(**kw: Any) -> SqliteOutbox:
        ob = SqliteOutbox(kw.pop("path", tmp_path / "outbox.db"), synchronous=request.param, **kw)
        opened.append(ob)
        return ob

    yield factory
    for ob in opened:
        ob.close()


def recs(n: int, prio: Priority = Priority.EVENT, size: int = 10, ts: float | None = None) -> list[RecordIn]:
    return [RecordIn(type="t", priority=prio, payload={"i": i, "pad": "x" * size},
                     **({"ts": ts} if ts is not None else {})) for i in range(n)]


def table_counts(path: Path) -> dict[str, int]:
    """Pending records per priority counted in the table itself, by another connection."""
    db = sqlite3.connect(path)
    try:
        got = dict(db.execute("SELECT priority, count(*) FROM records GROUP BY priority").fetchall())
    finally:
        db.close()
    return {p.name.lower(): got.get(int(p), 0) for p in Priority}


def py(code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                         timeout=60)
    assert not check or res.returncode in (0, -signal.SIGKILL), res.stderr
    return res


# -- restarts, the cap ------------------------------------------------------------------------------------
def test_seqs_survive_restart_and_deletion(make: Factory) -> None:
    ob = make()
    assert list(ob.put(recs(3))) == [1, 2, 3]
    ob.ack([(1, 3)])
    ob.close()
    ob = make()
    assert list(ob.put(recs(2))) == [4, 5]
    assert ob.stats().last_seq == 5 and ob.stats().acked_seq == 3


def test_size_cap_drops_the_oldest_of_the_lowest_priority_first_never_alerts(make: Factory) -> None:
    ob = make(max_mb=0.5)
    ob.put(recs(50, Priority.ALERT, size=500)  # seqs 1-50
           + recs(600, Priority.EVENT, size=1000)  # 51-650: more than the cap alone
           + recs(600, Priority.TELEMETRY, size=500))  # 651-1250
    ob.enforce_cap()
    st = ob.stats()
    assert st.used_bytes <= 0.5 * 1024 * 1024
    ob.release()
    left = ob.begin(10_000)
    # every alert kept; the drops' tombstones (alerts too) come after them
    assert [r.seq for r in left if r.priority == Priority.ALERT and r.type != "tombstone"] == list(range(1, 51))
    assert not [r for r in left if r.priority == Priority.TELEMETRY]  # telemetry goes before any event
    events = [r.seq for r in left if r.priority == Priority.EVENT]
    assert events and events == list(range(651 - len(events), 651))  # exactly the newest events kept
    assert st.dropped == {"dropped.telemetry": 600, "dropped.event": 600 - len(events)} and len(events) < 600


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
    earlier.put(recs(2, Priority.EVENT, ts=old))  # old again, after the clockless ones
    earlier.close()
    ob = make(max_age_days=1)
    ob.put(recs(1, Priority.EVENT))
    assert ob.stats().pending == 8  # opening applied the cap: 5 old events gone, 1 tombstone names them
    assert ob.stats().dropped == {"dropped.event": 5}


def test_age_within_this_boot_is_monotonic_so_a_clock_jump_drops_nothing(
        make: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
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
    make(max_age_days=1).close()
    assert make(max_age_days=1).stats().dropped == {"dropped.event": 3}


class SpyLock:
    """The outbox's lock, calling `on_release` each time it is let go."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self.lock, self.on_release = threading.Lock(), on_release

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *_: object) -> None:
        self.lock.release()
        self.on_release()


def test_the_age_cap_deletes_in_chunks_and_releases_the_lock_between_them(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    earlier = SqliteOutbox(path, boot="an-earlier-boot")
    total = 5 * SqliteOutbox.CHUNK
    earlier.put(recs(total, ts=time.time() - 3 * 86400))
    earlier.close()
    ob = SqliteOutbox(path, max_age_days=30)  # nothing is that old
    left_at_release: list[int] = []
    ob._lock = SpyLock(lambda: left_at_release.append(table_counts(path)["event"]))  # type: ignore[assignment]
    ob.max_age_s = 86400
    assert ob.enforce_cap() == {int(Priority.EVENT): total}
    assert [n for n in left_at_release if 0 < n < total], "the lock was never free while old records remained"
    assert ob.stats().pending_by_priority["event"] == 0  # what is left: the drops' tombstones
    ob.close()


def test_counts_match_the_table_through_every_path_and_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    earlier = SqliteOutbox(path, boot="an-earlier-boot")
    earlier.put(recs(30, Priority.TELEMETRY, ts=time.time() - 40 * 86400))  # the age cap takes these
    earlier.close()
    ob = SqliteOutbox(path, max_mb=0.3)
    ob.put(recs(300, Priority.TELEMETRY, size=400) + recs(200, Priority.EVENT, size=400))
    ob.put(recs(20, Priority.ALERT) + recs(10, Priority.REPORT))
    ob.ack([(31, 40), (531, 535)])
    ob.reject([(536, 537)], "bad")
    ob.enforce_cap()
    st = ob.stats()
    assert st.dropped["dropped.telemetry"] > 30  # both caps dropped something
    assert st.pending_by_priority == table_counts(path) and st.pending == sum(table_counts(path).values())
    ob.close()
    assert read_stats(path).pending_by_priority == table_counts(path)


def test_a_version_1_file_is_migrated_with_its_counts(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(MIGRATIONS[0] + "PRAGMA user_version=1;")
    db.executemany("INSERT INTO records (ts, boot_id, mono, type, priority, payload) VALUES (?,?,?,?,?,?)",
                   [(time.time(), "b", 1.0, "t", p, "{}") for p in (0, 0, 1, 3)])
    db.close()
    ob = SqliteOutbox(path, device_id="dev-1")
    st = ob.stats()
    assert st.pending_by_priority == {"telemetry": 2, "event": 1, "report": 0, "alert": 1}
    assert len(st.epoch) == 32 and st.device_id == "dev-1"
    assert list(ob.put(recs(1))) == [5]
    ob.close()


def test_schema_version_and_refusal_of_a_newer_file(make: Factory, tmp_path: Path) -> None:
    make().close()
    db = sqlite3.connect(tmp_path / "outbox.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(OutboxError, match="newer than this agent knows"):
        make()


# -- durability -------------------------------------------------------------------------------------------
KILLED_AFTER_PUT = """
    import os, signal, sys, threading
    from customs_edge.agent.outbox import SqliteOutbox
    from customs_edge.core.records import RecordIn

    class CommitsLater(SqliteOutbox):  # the bug a durability test must catch: put returns, commit follows
        def put(self, records, state=None):
            threading.Timer(0.5, SqliteOutbox.put, (self, records)).start()
            return range(0)

    cls = CommitsLater if sys.argv[3] == "broken" else SqliteOutbox
    ob = cls(sys.argv[1], synchronous=sys.argv[2])
    ob.put([RecordIn(type="t", payload={"i": i}) for i in range(5)])
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_records_put_are_there_after_the_process_is_killed_right_after_put_returns(
        tmp_path: Path, synchronous: str) -> None:
    res = py(KILLED_AFTER_PUT, str(tmp_path / "outbox.db"), synchronous, "real")
    assert res.returncode == -signal.SIGKILL
    assert read_stats(tmp_path / "outbox.db").pending == 5


def test_the_kill_test_catches_a_put_that_returns_before_its_commit(tmp_path: Path) -> None:
    res = py(KILLED_AFTER_PUT, str(tmp_path / "outbox.db"), "FULL", "broken")
    assert res.returncode == -signal.SIGKILL
    assert read_stats(tmp_path / "outbox.db").pending == 0


SYNCED_PUT = """
    import sys
    from customs_edge.agent.outbox import SqliteOutbox
    from customs_edge.core.records import RecordIn

    ob = SqliteOutbox(sys.argv[1], synchronous=sys.argv[2])
    print("PUT-STARTS", flush=True)
    ob.put([RecordIn(type="t") for _ in range(3)])
    print("PUT-RETURNED", flush=True)
"""


@pytest.mark.parametrize(("synchronous", "synced"), [("FULL", True), ("NORMAL", False)])
def test_full_puts_reach_the_disk_before_put_returns(tmp_path: Path, synchronous: str, synced: bool) -> None:
    """A power cut is not a kill: only an fsync of the WAL between commit and return survives it. strace
    shows whether one happened; NORMAL, which has none, shows the check can tell."""
    strace = "/usr/bin/strace"
    if not os.access(strace, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("strace is not installed and CI is set: apt-get install strace")
        pytest.skip("strace is not installed")
    log = tmp_path / "strace.log"
    res = subprocess.run([strace, "-f", "-y", "-e", "trace=write,fsync,fdatasync", "-o", str(log), sys.executable,
                          "-c", textwrap.dedent(SYNCED_PUT), str(tmp_path / "outbox.db"), synchronous],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = log.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if "PUT-STARTS" in ln)
    end = next(i for i, ln in enumerate(lines) if "PUT-RETURNED" in ln)
    wal_syncs = [ln for ln in lines[start:end] if "sync(" in ln and "outbox.db-wal>" in ln]
    assert bool(wal_syncs) == synced, lines[start:end]


# -- identity: the device, the process, the file -----------------------------------------------------------
def test_an_outbox_belongs_to_one_device(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    SqliteOutbox(path).close()  # a file from before device ids: the first unit to open it claims it
    SqliteOutbox(path, device_id="scale-01").close()
    with pytest.raises(OutboxError) as err:
        SqliteOutbox(path, device_id="scale-02")
    assert "'scale-01'" in str(err.value) and "'scale-02'" in str(err.value) and str(path) in str(err.value)
    ob = SqliteOutbox(path, device_id="scale-01")  # the refusal left no lock behind
    assert ob.stats().device_id == "scale-01"
    ob.close()


HOLDS_THE_OUTBOX = """
    import sys
    from customs_edge.agent.outbox import SqliteOutbox

    ob = SqliteOutbox(sys.argv[1], device_id="scale-01")
    print("open", flush=True)
    sys.stdin.read()
    ob.close()
"""


def test_a_second_process_is_kept_out_while_the_outbox_is_open(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDS_THE_OUTBOX), str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(OutboxError, match=f"in use by another process \\(pid {holder.pid}"):
            SqliteOutbox(path, device_id="scale-01")
        assert read_stats(path).device_id == "scale-01"  # reading needs no lock
    finally:
        holder.communicate("", timeout=30)
    ob = SqliteOutbox(path, device_id="scale-01")  # closed: free again
    ob.close()


def test_one_process_may_open_its_outbox_twice_as_a_reload_does(tmp_path: Path) -> None:
    old = SqliteOutbox(tmp_path / "outbox.db", device_id="scale-01")
    old.put(recs(2))
    new = SqliteOutbox(tmp_path / "outbox.db", device_id="scale-01")
    old.close()
    assert list(new.put(recs(1))) == [3]
    res = py(HOLDS_THE_OUTBOX, str(tmp_path / "outbox.db"), check=False)  # the lock is still held by `new`
    assert res.returncode == 1 and "in use by another process" in res.stderr
    new.close()


def test_a_deleted_or_replaced_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    ob = SqliteOutbox(path)
    ob.put(recs(3))
    assert ob.check_file() is None and ob.stats().file_problem is None
    os.rename(path, tmp_path / "moved.db")
    assert "deleted or moved" in (ob.check_file() or "")
    (tmp_path / "other.db").write_bytes(b"")
    os.rename(tmp_path / "other.db", path)
    problem = ob.stats().file_problem
    assert problem and "replaced by another file" in problem and str(path) in problem
    os.rename(tmp_path / "moved.db", path)  # put back: healthy again
    assert ob.check_file() is None
    ob.close()


def test_a_new_file_continues_above_the_hub_high_water_mark(tmp_path: Path) -> None:
    ob = SqliteOutbox(tmp_path / "a.db")
    ob.put(recs(50))
    ob.ack([(1, 40)])
    hub_holds = ob.stats().acked_seq
    ob.close()
    fresh = SqliteOutbox(tmp_path / "b.db")  # the file was lost; sync learned the mark from the hub
    fresh.raise_seq_floor(hub_holds)
    assert list(fresh.put(recs(1))) == [41]
    fresh.close()
    assert read_stats(tmp_path / "b.db").acked_seq == 40 and read_stats(tmp_path / "a.db").acked_seq == 40
    assert read_stats(tmp_path / "a.db").epoch != read_stats(tmp_path / "b.db").epoch


# -- read-only ---------------------------------------------------------------------------------------------
def test_read_stats_never_creates_a_file(tmp_path: Path) -> None:
    path = tmp_path / "typo" / "outbox.db"
    with pytest.raises(OutboxError, match=r"no outbox file there; check outbox\.path"):
        read_stats(path)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "notes.db").write_text("not a database at all, just text of some length" * 20)
    with pytest.raises(OutboxError, match=r"notes\.db"):
        read_stats(tmp_path / "notes.db")


# -- disk space --------------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs to fill."""
    where = tmp_path / "fs"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], capture_output=True,
                         text=True)
    if res.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a small tmpfs for the disk-full tests (needs root): {res.stderr.strip()}")
        pytest.skip(f"cannot mount a small tmpfs (needs root): {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(where: Path) -> Path:
    """Take every free byte of the filesystem; returns the file to delete to give them back."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def free_bytes(where: Path) -> int:
    fs = os.statvfs(where)
    return fs.f_bavail * fs.f_frsize


def test_the_outbox_keeps_free_space_by_dropping_telemetry_never_alerts(small_fs: Path) -> None:
    ob = SqliteOutbox(small_fs / "outbox.db")  # the default headroom: 5 % of a small filesystem
    for _ in range(60):  # 60,000 telemetry records of ~300 bytes: twice the filesystem
        ob.put(recs(1000, Priority.TELEMETRY, size=250))
        ob.put(recs(5, Priority.ALERT))
    ob.enforce_cap()
    assert free_bytes(small_fs) >= 0.05 * 8 * 1024 * 1024
    st = ob.stats()
    assert st.dropped["dropped.telemetry"] > 30_000
    alerts = [r for r in ob.begin(st.pending) if r.priority == Priority.ALERT]
    tombs = [json.loads(r.payload)["count"] for r in alerts if r.type == "tombstone"]
    assert len(alerts) - len(tombs) == 300 and sum(tombs) == st.dropped["dropped.telemetry"]  # each drop named
    assert ob.ack([(1, st.last_seq)]) == st.pending  # deletes found room
    assert read_stats(small_fs / "outbox.db").pending == 0
    ob.close()


def test_acks_on_a_full_disk_wait_in_memory_and_are_done_first_once_space_returns(small_fs: Path) -> None:
    ob = SqliteOutbox(small_fs / "outbox.db")
    ob.put(recs(3000, size=200), state=("app", b"v1"))
    sent = ob.begin(1000)
    filler = fill(small_fs)
    assert ob.ack([(sent[0].seq, sent[-1].seq)]) == 1000  # the hub has them: never raises
    assert ob.stats().awaiting_delete == 1000
    ob.release()
    assert ob.begin(10)[0].seq == 1001  # acked ones are never sent again
    with pytest.raises(sqlite3.OperationalError, match="full"):  # nothing to drop: the caller keeps them
        ob.put(recs(1, Priority.ALERT), state=("app", b"v2"))
    assert ob.load_state("app") == b"v1"  # the state commits with its records or not at all
    filler.unlink()
    assert list(ob.put(recs(1, Priority.ALERT), state=("app", b"v2"))) == [3001]
    assert ob.stats().awaiting_delete == 0  # the put did the deletes first
    assert table_counts(small_fs / "outbox.db") == {"telemetry": 0, "event": 2000, "report": 0, "alert": 1}
    assert ob.load_state("app") == b"v2" and ob.stats().acked_seq == 1000
    ob.close()


def test_a_full_disk_heals_by_itself_through_begin(small_fs: Path) -> None:
    ob = SqliteOutbox(small_fs / "outbox.db")
    ob.put(recs(2000, size=200))
    sent = ob.begin(500)
    filler = fill(small_fs)
    ob.ack([(sent[0].seq, sent[-1].seq)])
    ob.reject([(sent[-1].seq + 1, sent[-1].seq + 10)], "bad")
    assert ob.stats().awaiting_delete == 510
    filler.unlink()
    wait_for(lambda: ob.begin(1) is not None and ob.stats().awaiting_delete == 0, 10, "the waiting deletes")
    assert read_stats(small_fs / "outbox.db").pending == 1490
    assert ob.stats().dead_letters == {"bad": 10}
    ob.close()
