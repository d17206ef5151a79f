"""The hub store's WAL: copied into the database file by the store's own checkpoint thread after each commit, and
bounded by the writer's own autocheckpoint while transactions follow each other with no room for the thread."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from customs_edge.hub import intake
from customs_edge.hub import store as hub_store
from customs_edge.hub.store import HubStore

PAGE = 4096


def rows(first: int, n: int) -> intake.Incoming:
    """n records of ~1 KiB payload each for device d1, seqs from `first`."""
    recs = [(s, 1.0, "boot-a", float(s), "t", 1, json.dumps({"s": s, "pad": "x" * 1000}))
            for s in range(first, first + n)]
    return intake.Incoming("d1", f"b{first}", recs, [])


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_commits_are_checkpointed_by_the_stores_thread_not_left_to_the_writer(tmp_path: Path) -> None:
    st = HubStore(tmp_path / "hub.db")
    try:
        ck = st._checkpointer
        assert ck is not None
        size0 = (tmp_path / "hub.db").stat().st_size
        st.store([rows(1, 200)])  # ~60 pages: far below the writer's own autocheckpoint (WAL_BACKSTOP_PAGES)
        wait_for(lambda: ck.checkpoints >= 1 and ck.idle())
        # the records' pages are in the database file itself, not only in the WAL
        assert (tmp_path / "hub.db").stat().st_size > size0 + 150 * PAGE
        (n,) = st.db.execute("SELECT count(*) FROM records").fetchone()
        assert n == 200
    finally:
        st.close()
    assert not (tmp_path / "hub.db-wal").exists()  # the last connection closed checkpointed and removed it


def test_the_wal_stays_bounded_while_the_writer_never_pauses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Transactions back to back: the checkpoint kicked after one commit is still running when the next begins, so
    the WAL rarely starts over by the thread's work alone; the writer's autocheckpoint at WAL_MAX_PAGES bounds it."""
    monkeypatch.setattr(hub_store, "WAL_MAX_PAGES", 100)
    st = HubStore(tmp_path / "hub.db")
    try:
        seq = 1
        for _ in range(150):  # ~30 pages each: ~4,500 pages written, 45 times the bound (SQLite's default: 1,000)
            st.store([rows(seq, 100)])
            seq += 100
        wal = (tmp_path / "hub.db-wal").stat().st_size // PAGE  # the WAL file's high-water mark, in pages
        # 100 + a few transactions; a writer's autocheckpoint that meets the thread's checkpoint in progress is BUSY
        # and leaves the WAL to the next commit, which on a loaded machine happened several times in a row (once, in
        # a parallel run): the margin allows that, and SQLite's default (1,000 pages) still fails it
        assert wal < 600, f"the WAL grew to {wal} pages"
        (n,) = st.db.execute("SELECT count(*) FROM records").fetchone()
        assert n == 15000
    finally:
        st.close()


def test_a_checkpoint_thread_that_cannot_open_the_file_is_logged_and_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = hub_store.sqlite3.connect

    def connect(path: object, *args: object, **kw: object) -> object:
        if hub_store.threading.current_thread().name == "hub-wal-checkpoint":
            raise sqlite3.OperationalError("unable to open database file")
        return real(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(hub_store.sqlite3, "connect", connect)
    st = HubStore(tmp_path / "hub.db")
    try:
        ck = st._checkpointer
        assert ck is not None
        ck._thread.join(10)
        assert ck.failures == 1 and "WAL checkpoint thread" in caplog.text and "not started" in caplog.text
        st.store([rows(1, 10)])  # the writer goes on, checkpointing by itself
        (n,) = st.db.execute("SELECT count(*) FROM records").fetchone()
        assert n == 10
    finally:
        st.close()
