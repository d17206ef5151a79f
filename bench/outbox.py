"""Outbox housekeeping at a large backlog (a long outage): stats(), the cap check and the age cap.

    python bench/outbox.py [--rows 1000000] [--json]

Fills an outbox with `rows` records (a tenth of them from an earlier boot and 40 days old) and measures,
in one run, beside the plain queries the outbox ran before it kept counts (the baselines):
  stats_ms                      stats(): counts from the counters table (median of 20)
  baseline_count_scan_ms        SELECT count(*), min(ts) FROM records: the former stats() (median of 5)
  cap_ms                        enforce_cap() with the age cap, nothing to drop (median of 5)
  baseline_age_scan_ms          the former age-cap query, a scan of every row (median of 5)
  age_drop_ms                   the age cap dropping the old tenth, in chunks
  put_wait_max_ms_during_drop   the longest a one-record put() waited while that drop ran (and p99)
  put_wait_max_ms_alone         the same puts for 0.5 s with no drop running (and p99): their own cost
  baseline_age_delete_ms        the same drop as one DELETE statement: how long the lock was held before
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.core.records import Priority, RecordIn

PAYLOAD = {"weight": 12.34, "tare": 0.0, "unit": "kg", "net": False, "motion": False, "note": "x" * 150}
DAY = 86400.0
OLD = ("priority < 3 AND ((boot_id = :boot AND mono < :mono_cut)"
       " OR (boot_id != :boot AND ts < :ts_cut AND ts > 1577836800))")  # the former age-cap condition


def timed_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    return percentile(times, 50)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the drops it causes on purpose are logged as warnings
    say = (lambda *_: None) if args.json else print
    path = Path(tempfile.mkdtemp(prefix="ce-bench-outbox-")) / "outbox.db"
    old_n = args.rows // 10
    batch = [RecordIn(type="bench", priority=Priority.EVENT, payload=PAYLOAD) for _ in range(1000)]
    old_batch = [r.model_copy(update={"ts": time.time() - 40 * DAY}) for r in batch]

    earlier = SqliteOutbox(path, synchronous="NORMAL", max_age_days=1000, boot="an-earlier-boot")
    for _ in range(old_n // 1000):
        earlier.put(old_batch)
    earlier.close()
    ob = SqliteOutbox(path, synchronous="NORMAL", max_age_days=1000, max_mb=4096)
    for _ in range((args.rows - old_n) // 1000):
        ob.put(batch)
    say(f"{ob.stats().pending:,} records in {path}")

    raw = sqlite3.connect(path)
    cut = {"boot": ob.boot_id, "mono_cut": time.monotonic() - 30 * DAY, "ts_cut": time.time() - 30 * DAY}
    out: dict[str, float | int] = {
        "rows": ob.stats().pending,
        "stats_ms": timed_ms(ob.stats, 20),
        "baseline_count_scan_ms": timed_ms(lambda: raw.execute("SELECT count(*), min(ts) FROM records").fetchone(), 5),
        "cap_ms": timed_ms(ob.enforce_cap, 5),
        "baseline_age_scan_ms": timed_ms(lambda: raw.execute(
            f"SELECT priority, count(*) FROM records WHERE {OLD} GROUP BY priority", cut).fetchall(), 5),
    }

    waits: list[float] = []
    dropping = threading.Event()

    def putter() -> None:
        while dropping.is_set():
            t0 = time.perf_counter()
            ob.put(batch[:1])
            waits.append((time.perf_counter() - t0) * 1000)

    def with_putter(fn: Callable[[], object]) -> list[float]:
        waits.clear()
        dropping.set()
        t = threading.Thread(target=putter)
        t.start()
        fn()
        dropping.clear()
        t.join()
        return list(waits)

    alone = with_putter(lambda: time.sleep(0.5))
    out["put_wait_max_ms_alone"], out["put_wait_p99_ms_alone"] = max(alone), percentile(alone, 99)
    ob.max_age_s = 30 * DAY
    t0 = time.perf_counter()
    during = with_putter(lambda: out.update(dropped=sum(ob.enforce_cap().values())))
    out["age_drop_ms"] = (time.perf_counter() - t0) * 1000
    out["put_wait_max_ms_during_drop"], out["put_wait_p99_ms_during_drop"] = max(during), percentile(during, 99)
    out["puts_during_drop"] = len(during)
    ob.close()

    raw.execute("BEGIN")
    raw.executemany("INSERT INTO records (ts, boot_id, mono, type, priority, payload) VALUES (?,?,?,?,?,?)",
                    [(time.time() - 40 * DAY, "an-earlier-boot", 1.0, "bench", 1, json.dumps(PAYLOAD))] * old_n)
    raw.execute("COMMIT")
    t0 = time.perf_counter()
    raw.execute("BEGIN IMMEDIATE")
    raw.execute(f"DELETE FROM records WHERE {OLD}", {**cut, "mono_cut": time.monotonic() - 30 * DAY})
    raw.execute("COMMIT")
    out["baseline_age_delete_ms"] = (time.perf_counter() - t0) * 1000
    raw.close()

    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:>30}: {v:,}")


if __name__ == "__main__":
    main()
