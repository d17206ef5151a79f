"""Hub store: redeliveries are dropped, a reused seq with other content is kept apart, never lost."""

from __future__ import annotations

from pathlib import Path

from customs_edge.core.wire import Batch, WireRecord
from customs_edge.hub.store import HubStore


def batch(seqs: list[int], boot: str, batch_id: str = "b") -> Batch:
    return Batch(device_id="d1", batch=batch_id, records=[
        WireRecord(seq=s, ts=1.0, boot=boot, mono=float(s), type="t", prio=1, payload={"s": s, "boot": boot})
        for s in seqs])


def test_redelivery_is_a_duplicate_and_a_reused_seq_is_a_conflict_kept_apart(tmp_path: Path) -> None:
    st = HubStore(tmp_path / "hub.db")
    (first,) = st.store([batch([1, 2, 3], "boot-a")])
    assert (first.stored, first.duplicates) == (3, 0)
    (again,) = st.store([batch([2, 3], "boot-a")])  # the same records resent
    assert (again.stored, again.duplicates) == (0, 2)
    # an outbox restored from an old image hands out seqs 2 and 3 again, for new records
    (reused,) = st.store([batch([2, 3, 4], "boot-b")])
    assert reused.ranges == [(2, 4)]  # all acked: the hub keeps every one of them
    assert (reused.stored, reused.duplicates) == (1, 0)
    (dev,) = st.stats()
    assert (dev.stored, dev.duplicates, dev.conflicts, dev.received) == (4, 2, 2, 8)
    kept = st.db.execute("SELECT seq, payload FROM conflicts ORDER BY seq").fetchall()
    assert [s for s, _ in kept] == [2, 3] and all('"boot":"boot-b"' in p for _, p in kept)
    (resent,) = st.store([batch([2, 3], "boot-b")])  # the conflicting records resent: plain duplicates now
    assert (resent.stored, resent.duplicates) == (0, 2)
    assert st.stats()[0].conflicts == 2
