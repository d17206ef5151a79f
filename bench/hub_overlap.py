"""Would overlapping the hub's parse with its store pay (issue 12: SQLite >= 100k records/s with one worker)?

    python bench/hub_overlap.py [--records 100000] [--group 4] [--repeat 4] [--switch-interval 0.005,0.0005]
                                [--modes sequential,...] [--json]

In one process, without a broker, on bench/hub.py's ingest batches (500 records of ~250-byte payloads, 50
devices), `--group` batches per store transaction (synchronous=FULL, WAL, a file under /tmp). The hub today
(hub/service.py `handle()`) parses a burst, then stores it, in one thread. CPython's sqlite3 releases the GIL
inside each sqlite3_step (the B-tree work, the WAL writes and the fsync of COMMIT), so a second thread could
parse burst k+1 while burst k is stored. Modes, run in turn within each repeat:

  sequential      parse a group, store() it: what handle() does
  pipelined       a store thread runs store() on group k while this thread parses group k+1 (a queue of one):
                  the two-stage pipeline
  commit_overlap  parse and insert here; only the COMMIT (one sqlite3_step: the WAL writes and the fsync) runs
                  in a second thread, while the next group is parsed
  parse_process   each message parsed in a process of its own (a ProcessPoolExecutor of one, spawned, started
                  before the timing), stored here as the parses come back (the results unpickled here)
  store_alone / store_beside_python
                  store() of parsed groups alone, then while another thread runs pure Python (as a parse
                  would): the second shows what the store loses waiting for the GIL after each sqlite3_step

Each mode is run at each `--switch-interval` (sys.setswitchinterval: how long a thread that wants the GIL waits
before the running one is made to drop it; CPython's default 0.005 s). Per run: records/s (wall), CPU
µs/record (this process) and idle_cores (the machine's idle time during the run, in cores: on a shared machine
a gain needs a free core). Printed: every run, and each mode's best and median
(store_beside_python's CPU includes the Python thread's: read its records/s).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hub import batches
from customs_edge.hub import intake
from customs_edge.hub.store import HubStore, Stored

Group = list[tuple[str, bytes, Any]]


class UncommittedStore(HubStore):
    """store() without its COMMIT, for commit_overlap (the bench's own: the hub's store commits in store())."""

    def store(self, batches: Iterable[intake.Incoming], refused: Mapping[str, int] | None = None) -> list[Stored]:
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        return [self._store(b, now) for b in batches]


def parse(group: Group) -> list[intake.Incoming]:
    return [intake.parse(t, p) for t, p, _ in group]


def sequential(st: HubStore, groups: list[Group]) -> None:
    for g in groups:
        st.store(parse(g))


def pipelined(st: HubStore, groups: list[Group]) -> None:
    parsed: queue.Queue[list[intake.Incoming] | None] = queue.Queue(maxsize=1)

    def storer() -> None:
        while (incoming := parsed.get()) is not None:
            st.store(incoming)

    th = threading.Thread(target=storer)
    th.start()
    for g in groups:
        parsed.put(parse(g))
    parsed.put(None)
    th.join()


def commit_overlap(st: HubStore, groups: list[Group]) -> None:
    with ThreadPoolExecutor(1) as ex:
        commit: Future[Any] | None = None
        for g in groups:
            incoming = parse(g)
            if commit is not None:
                commit.result()
            st.store(incoming)
            commit = ex.submit(st.db.execute, "COMMIT")
        if commit is not None:
            commit.result()


def _parse_one(topic: str, payload: bytes) -> intake.Incoming:
    return intake.parse(topic, payload)


def parse_process(st: HubStore, groups: list[Group], ex: ProcessPoolExecutor) -> None:
    """Every message submitted to a parse process at once (the hub would submit each as it arrives), stored here in
    groups as their parses come back: the store and the results' unpickling in this process, the parse there."""
    futures = [[ex.submit(_parse_one, t, p) for t, p, _ in g] for g in groups]
    for fs in futures:
        st.store([f.result() for f in fs])


def idle_s() -> float:
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (f[3] + f[4]) / 100  # USER_HZ


def timed(fn: Callable[[], None], records: int) -> dict[str, float]:
    i0, t0, c0 = idle_s(), time.perf_counter(), time.process_time()
    fn()
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"records_per_s": round(records / dt), "cpu_us_per_record": round(cpu / records * 1e6, 2),
            "idle_cores": round((idle_s() - i0) / dt, 2)}


def store_alone(st: HubStore, parsed: list[list[intake.Incoming]]) -> None:
    for incoming in parsed:
        st.store(incoming)


def store_beside_python(st: HubStore, parsed: list[list[intake.Incoming]]) -> None:
    done = threading.Event()

    def storer() -> None:
        for incoming in parsed:
            st.store(incoming)
        done.set()

    th = threading.Thread(target=storer)
    th.start()
    n = 0
    while not done.is_set():  # pure Python, holding the GIL but for the interpreter's forced switches
        for _ in range(1000):
            n += 1
    th.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--group", type=int, default=4, help="batches per store transaction")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--switch-interval", default="0.005,0.0005")
    ap.add_argument("--modes", default=None, help="the modes to run, comma-separated (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    msgs = list(batches(args.records, 500, 50, "ovl"))
    groups = [msgs[i:i + args.group] for i in range(0, len(msgs), args.group)]
    n = sum(len(r) for _, _, r in msgs)
    parsed = [parse(g) for g in groups]
    modes: dict[str, tuple[type[HubStore], Callable[[HubStore], None]]] = {
        "sequential": (HubStore, lambda st: sequential(st, groups)),
        "pipelined": (HubStore, lambda st: pipelined(st, groups)),
        "commit_overlap": (UncommittedStore, lambda st: commit_overlap(st, groups)),
        "parse_process": (HubStore, lambda st: parse_process(st, groups, pool)),
        "store_alone": (HubStore, lambda st: store_alone(st, parsed)),
        "store_beside_python": (HubStore, lambda st: store_beside_python(st, parsed)),
    }
    if args.modes:
        unknown = set(args.modes.split(",")) - set(modes)
        if unknown:
            ap.error(f"unknown modes {sorted(unknown)}: choose from {', '.join(modes)}")
        modes = {m: modes[m] for m in args.modes.split(",")}
    runs: dict[str, list[dict[str, float]]] = {}
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    if "parse_process" in modes:
        pool.submit(int).result()  # spawned and ready before any timing
    with pool, tempfile.TemporaryDirectory(prefix="ce-bench-overlap-", dir="/tmp") as tmp:
        k = 0
        for _ in range(args.repeat):
            for si in [float(x) for x in args.switch_interval.split(",")]:
                sys.setswitchinterval(si)
                for name, (kind, mode) in modes.items():
                    k += 1
                    st = kind(Path(tmp) / f"{k}.db")
                    runs.setdefault(f"{name} si={si}", []).append(timed(lambda: mode(st), n))  # noqa: B023
                    st.close()
    summary = {name: {"best_records_per_s": max(r["records_per_s"] for r in rs),
                      "median_records_per_s": round(statistics.median(r["records_per_s"] for r in rs)),
                      "median_cpu_us_per_record": round(statistics.median(r["cpu_us_per_record"] for r in rs), 2),
                      "median_idle_cores": round(statistics.median(r["idle_cores"] for r in rs), 2)}
               for name, rs in runs.items()}
    out = {"records": n, "group": args.group, "summary": summary, "runs": runs}
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
