"""Hub scale-out figures: ingest through broker -> hub -> store -> ack for SQLite and PostgreSQL with 1, 2 and 3
hub workers, beside raw executemany into the same store; then a simulated fleet at a steady rate: the hub's
ack latency and RSS.

    python bench/hub.py [--records 100000] [--batch 500] [--devices 50] [--units 500] [--rate 5]
                        [--processes 2] [--fleet-seconds 20] [--workers 1,2,3] [--sim-outbox memory|sqlite]
                        [--burst-units 20] [--burst-records 2000] [--burst-processes 2] [--alert-every 0.5]
                        [--burst-ack-timeout 10] [--hub-alive S|off] [--window 8] [--parse-process off|on|both]
                        [--skip ingest|fleet|burst] [--json]

Ingest: a real mosquitto (persistence off) and `customs-edge hub` processes on one shared subscription
($share/hubs/...), each worker its own process; PostgreSQL is a throwaway cluster started here (tests/pg.py:
initdb/pg_ctl, fsync and synchronous_commit on, as in production). This process publishes pre-encoded
batches (`--batch` records of ~250-byte payloads, `--devices` devices in turn, seqs counting up; QoS 1, at
most `--window` batches per worker unacked) and counts the hub's acks: records_per_s = records / (first publish ->
last ack); hub_cpu_us_per_record and db_cpu_us_per_record are the CPU time the hub workers and the
PostgreSQL cluster spent per record (CPU time, unlike wall time, holds when other work shares the cores: the
sizing arithmetic in docs/scale.md uses it). Every store row is checked afterwards (stored == records, no duplicates).
With `--parse-process both` (the default) each store's ingest runs with the parse in the workers (`workers_N`), and
once more with one worker and its parse process beside it (`workers_1_parse_process`, hub/parser.py; the child's CPU
and RSS counted with the worker's); fleet and burst run with it, as configs/hub/hub.yaml ships.
Baselines, measured in the same run on the same machine:
  raw_executemany  INSERT of the same rows into the store's `records` table, one transaction per batch
                   (SQLite synchronous=FULL; PostgreSQL executemany, pipelined by psycopg): the database's
                   own ceiling, no MQTT, no validation, no dedupe;
  store_direct     the store's store() on already parsed batches, 4 per transaction as the hub groups them:
                   dedupe and counters without MQTT or JSON validation.
Fleet: `--units` simulated units (agent/simfleet.py: the agent's Sync, one MQTT session and device id each, stepped
by one driver thread per `--processes` `customs-edge fleet simulate` process; their outboxes in memory by default,
`--sim-outbox sqlite` for the production file, and their files on tmpfs when there is one) at `--rate` records/s
each against one hub worker on SQLite and on PostgreSQL; after `--warmup` s (the connect storm), for
`--fleet-seconds`: ack latency (a record's commit into its unit's outbox -> the hub's ack deleting it) p50/p99,
the hub process's peak RSS, the simulators' CPU per record, and the cores each part used in that window beside
`other_work` (the rest of the machine's busy time, /proc/stat): latency is wall time, and on a shared machine it
measures the other work too.
Burst: `--burst-units` units that each hold `--burst-records` records (put first through the outbox's own put,
5,000 per transaction, in `--burst-processes` simulator processes) connect at once (a port's link back after an
outage): seconds until the hub's store holds every record (polled every 0.1 s) and until the units had every ack,
SQLite with one worker, PostgreSQL with three. Meanwhile one more unit, outside the burst and on the agent's own
path (production SqliteOutbox, FULL, and its own Sync thread), raises an ALERT every `--alert-every` s; the
latency from its commit to the hub's store holding it (polled every 10 ms) during the burst, p50/p99/max, beside
the same latency on the idle hub just before the burst (the baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import TICK, children, proc_cpu_s, tree_cpu_s
from bench.hub_rss import PAYLOAD, proc_rss_mb
from customs_edge.core.records import Pending
from customs_edge.core.wire import encode_batch
from customs_edge.hub import intake
from customs_edge.hub.brokers import Mosquitto

PREFIX = "customs-edge/v1"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}




def pg_cpu_s(pg: Any) -> float:
    """CPU seconds of the PostgreSQL cluster: the postmaster and every backend it started."""
    master = int((pg.data / "postmaster.pid").read_text().split()[0]) if (pg.data / "postmaster.pid").exists() else 0
    total = 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if int(d.name) == master or ppid == master:
                    total += proc_cpu_s(int(d.name))
            except (OSError, ValueError):
                continue
    return total


def batches(total: int, size: int, devices: int, tag: str) -> Iterator[tuple[str, bytes, list[Pending]]]:
    next_seq = dict.fromkeys(range(devices), 1)
    sent, k = 0, 0
    while sent < total:
        d = k % devices
        n = min(size, total - sent)
        seq0 = next_seq[d]
        recs = [Pending(s, 1.7e9 + s, "boot-bench", float(s), "weighing", 1, PAYLOAD) for s in range(seq0, seq0 + n)]
        next_seq[d] = seq0 + n
        yield f"{PREFIX}/{tag}-{d}/records", encode_batch(f"{tag}-{d}", f"b{k}", recs), recs
        sent += n
        k += 1


class Workers:
    """`customs-edge hub` worker processes on one shared subscription."""

    alive_interval_s: float | None = 5.0  # the workers' liveness (hub/liveness.py); None: none (--hub-alive off)

    def __init__(self, n: int, db: str, port: int, work: Path, parse_process: bool = False) -> None:
        self.logs = [work / f"hub-{i}.log" for i in range(n)]
        conf = work / "hub-bench.yaml"
        conf.write_text(f"alive_interval_s: {'null' if self.alive_interval_s is None else self.alive_interval_s}\n"
                        f"parse_process: {'true' if parse_process else 'false'}\n")
        self.procs = [subprocess.Popen([sys.executable, "-m", "customs_edge", "hub", "--config", str(conf), "--db", db,
                                        "--port", str(port), "--client-id", f"bench-hub-{i}", "--log-level", "INFO",
                                        "--photos-dir", str(work / "photos")], env=ENV,
                                       stderr=log.open("wb")) for i, log in enumerate(self.logs)]
        deadline = time.monotonic() + 60
        while not all("hub subscribed" in log.read_text() for log in self.logs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"hub workers did not subscribe; see {work}")
            time.sleep(0.1)

    def cpu_s(self) -> float:
        """The workers' CPU seconds, their parse processes' (hub/parser.py) included."""
        return sum(tree_cpu_s(p.pid) for p in self.procs)

    def rss_mb(self) -> list[float]:
        """Each worker's RSS, its parse process's added."""
        return [round(proc_rss_mb(p.pid) + sum(proc_rss_mb(k) for k in children(p.pid)), 1) for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(20)


def publish_all(port: int, msgs: list[tuple[str, bytes, int]], window: int) -> float:
    """Publish every batch (QoS 1, at most `window` unacked by the hub); seconds from first publish to last ack."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    total = sum(n for _, _, n in msgs)
    acked = [0]
    cond = threading.Condition()

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        ack = json.loads(m.payload)
        with cond:
            acked[0] += sum(b - a + 1 for a, b in ack["ranges"])
            cond.notify_all()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=paho.MQTTv311)
    c.max_inflight_messages_set(window * 2)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.subscribe(f"{PREFIX}/+/ack", 1)
        time.sleep(0.3)  # SUBACK
        size = max(n for _, _, n in msgs)
        t0 = time.monotonic()
        sent = 0
        for t, payload, n in msgs:
            with cond:
                if not cond.wait_for(lambda floor=sent - window * size: acked[0] >= floor, 120):
                    raise RuntimeError(f"hub acks stalled at {acked[0]} of {sent}")
            c.publish(t, payload, qos=1)
            sent += n
        with cond:
            if not cond.wait_for(lambda: acked[0] >= total, 300):
                raise RuntimeError(f"hub acks stalled at {acked[0]} of {total}")
        return time.monotonic() - t0
    finally:
        c.loop_stop()
        c.disconnect()


def check_store(db: str, devices: int, per_device: int, tag: str) -> None:
    from customs_edge.hub.storage import open_store

    st = open_store(db, readonly=True)
    try:
        rows = [s for s in st.stats() if s.device_id.startswith(tag)]
        stored = sum(s.stored for s in rows)
        if stored != devices * per_device or any(s.conflicts or s.gaps for s in rows):
            raise RuntimeError(f"{db}: stored {stored} of {devices * per_device}, or conflicts/gaps")
    finally:
        st.close()


def raw_executemany(db: str, msgs: list[tuple[str, bytes, list[Pending]]]) -> float:
    """The same rows inserted straight into `records`, one transaction per batch. Records/s."""
    from customs_edge.hub.storage import is_postgres, open_store

    st: Any = open_store(db)
    now = time.time()
    rows = [[(t.split("/")[-2], *r[:7], now, None, None) for r in recs] for t, _, recs in msgs]
    t0 = time.perf_counter()
    if is_postgres(db):
        with st.db.cursor() as cur:
            for b in rows:
                with st.db.transaction():
                    cur.executemany("INSERT INTO records (device_id, seq, ts, boot_id, mono, type, priority, payload,"
                                    " received_at, prev, h) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", b)
    else:
        for b in rows:
            st.db.execute("BEGIN IMMEDIATE")
            st.db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", b)
            st.db.execute("COMMIT")
    dt = time.perf_counter() - t0
    st.close()
    return sum(len(b) for b in rows) / dt


def store_direct(db: str, msgs: list[tuple[str, bytes, list[Pending]]]) -> float:
    from customs_edge.hub.storage import open_store

    st = open_store(db)
    parsed = [intake.parse(t, p) for t, p, _ in msgs]
    t0 = time.perf_counter()
    for i in range(0, len(parsed), 4):
        st.store(parsed[i:i + 4])
    dt = time.perf_counter() - t0
    st.close()
    return sum(len(r) for _, _, r in msgs) / dt


def ingest(args: argparse.Namespace, work: Path, pg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    msgs = list(batches(args.records, args.batch, args.devices, "ing"))
    wire = [(t, p, len(r)) for t, p, r in msgs]
    per_device = args.records // args.devices
    for backend in [b for b in ("sqlite", "postgres") if b in args.stores]:
        fig: dict[str, Any] = {}
        def new_db(name: str, backend: str = backend) -> str:
            return str(work / f"{backend}-{name}.db") if backend == "sqlite" else str(pg.new_database())

        fig["raw_executemany_records_per_s"] = round(raw_executemany(new_db("raw"), msgs))
        fig["store_direct_records_per_s"] = round(store_direct(new_db("direct"), msgs))
        counts = args.workers if backend == "postgres" else [1]
        runs = [(n, args.parse_process == "on") for n in counts] + [(1, True)] * (args.parse_process == "both")
        for n, child in runs:
            name = f"workers_{n}" + ("_parse_process" if child else "")
            db = new_db(name)
            broker = Mosquitto(work / f"broker-{backend}-{name}", persistence=False).start()
            try:
                ws = Workers(n, db, broker.port, work, parse_process=child)
                try:
                    c0, p0 = ws.cpu_s(), pg_cpu_s(pg) if backend == "postgres" else 0.0
                    dt = publish_all(broker.port, wire, window=args.window * n)
                    hub_cpu, db_cpu = ws.cpu_s() - c0, (pg_cpu_s(pg) - p0) if backend == "postgres" else None
                    rss = ws.rss_mb()
                finally:
                    ws.stop()
            finally:
                broker.stop()
            check_store(db, args.devices, per_device, "ing")
            fig[name] = {"records_per_s": round(args.records / dt), "seconds": round(dt, 2),
                         "hub_cpu_us_per_record": round(hub_cpu / args.records * 1e6, 1),
                         "db_cpu_us_per_record": None if db_cpu is None else round(db_cpu / args.records * 1e6, 1),
                         "worker_rss_mb": rss}
            log(f"ingest {backend} {name}: {args.records / dt:,.0f} rec/s")
        out[backend] = fig
    return out


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every process, ours or not; /proc/stat: all but idle and
    iowait): with our own processes' CPU, how much of the cores other work took meanwhile."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TICK


def sim_dir(work: Path, name: str) -> Path:
    """Where simulated units keep their files: tmpfs when there is one (their own disk writes, e.g. each unit's
    sync state every 5 s, are not what is measured, and on a shared disk they stall the simulator's driver)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix=f"bench-hub-{name}-", dir=shm))
    return work / name


def stop_all(sims: list[Any], ws: Workers, broker: Mosquitto, units_dir: Path, work: Path) -> None:
    """End a fleet or burst run: the simulators still running, the hub workers, the broker; the units' files when they
    were on tmpfs (sim_dir)."""
    for s in sims:
        if s.poll() is None:
            s.terminate()
    ws.stop()
    broker.stop()
    if units_dir.parent != work:
        shutil.rmtree(units_dir, ignore_errors=True)


def cpu_split(sims: list[Any], ws: Workers, pg: Any, mosq: int | None) -> tuple[float, float, float, float]:
    """CPU s so far: simulators (and this process: the burst's alert unit), hub workers (+ PostgreSQL), mosquitto,
    the whole machine."""
    return (sum(proc_cpu_s(s.pid) for s in sims) + proc_cpu_s(os.getpid()),
            ws.cpu_s() + (pg_cpu_s(pg) if pg is not None else 0.0), proc_cpu_s(mosq) if mosq else 0.0, machine_cpu_s())


def fleet(args: argparse.Namespace, work: Path, pg: Any) -> dict[str, Any]:
    """`--units` units in `--processes` `customs-edge fleet simulate` processes (each drives its units from one thread:
    agent/simfleet.py)."""
    out: dict[str, Any] = {}
    per = [args.units // args.processes + (1 if p < args.units % args.processes else 0) for p in range(args.processes)]
    for backend in [b for b in ("sqlite", "postgres") if b in args.stores]:
        db = str(work / "fleet.db") if backend == "sqlite" else pg.new_database()
        broker = Mosquitto(work / f"broker-fleet-{backend}", persistence=False).start()
        ws = Workers(1, db, broker.port, work, parse_process=args.parse_process != "off")
        c0, p0 = ws.cpu_s(), pg_cpu_s(pg) if backend == "postgres" else 0.0  # per record acked over the whole run
        files = [work / f"lat-{backend}-{p}.json" for p in range(args.processes)]
        units_dir = sim_dir(work, f"units-{backend}")
        sims = [subprocess.Popen(
            [sys.executable, "-m", "customs_edge", "fleet", "simulate", "--units", str(n), "--rate", str(args.rate),
             "--prefix", f"sim{backend[0]}{p}", "--broker", f"127.0.0.1:{broker.port}", "--workdir",
             str(units_dir / str(p)), "--duration", str(args.warmup + args.fleet_seconds), "--warmup",
             str(args.warmup), "--latencies", str(f), "--every", "1000000", "--json", "--outbox", args.sim_outbox,
             *(["--put-every", str(args.put_every)] if args.put_every else [])], env=ENV,
            stdout=subprocess.PIPE, stderr=(work / f"sim-{backend}-{p}.log").open("wb"))
            for p, (n, f) in enumerate(zip(per, files, strict=True))]
        mosq = broker.proc.pid if broker.proc else None
        try:
            time.sleep(args.warmup)
            rss = []

            pgc = pg if backend == "postgres" else None
            w0, at0, load0 = time.monotonic(), cpu_split(sims, ws, pgc, mosq), os.getloadavg()[0]
            w1, at1 = w0, at0
            while any(s.poll() is None for s in sims):
                rss.append(ws.rss_mb()[0])
                with contextlib.suppress(OSError, ValueError):  # CPU until the sims end (not their goodbye)
                    if time.monotonic() - w0 < args.fleet_seconds - 1:
                        w1, at1 = time.monotonic(), cpu_split(sims, ws, pgc, mosq)
                time.sleep(1.0)
            finals = [json.loads((s.stdout.read() if s.stdout else b"").decode().splitlines()[-1]) for s in sims]
            lat = sorted(x for f in files for x in json.loads(f.read_text()))
            window = sum(f["latency_window_s"] for f in finals) / len(finals)
            acked = sum(f["acked"] for f in finals)
            hub_cpu, db_cpu = ws.cpu_s() - c0, (pg_cpu_s(pg) - p0) if backend == "postgres" else None
        finally:
            stop_all(sims, ws, broker, units_dir, work)
        dt = max(1e-9, w1 - w0)
        sim_c, hub_c, mq_c, all_c = (b - a for a, b in zip(at0, at1, strict=True))
        out[backend] = {"units": args.units, "processes": args.processes, "rate_per_unit": args.rate,
                        "sim_outbox": args.sim_outbox, "offered_records_per_s": args.units * args.rate,
                        "acked_records_per_s": round(len(lat) / window),
                        "ack_latency_p50_ms": lat[len(lat) // 2] if lat else None,
                        "ack_latency_p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
                        "hub_rss_mb": max(rss) if rss else None,
                        "hub_cpu_us_per_record": round(hub_cpu / max(1, acked) * 1e6, 1),
                        "db_cpu_us_per_record": None if db_cpu is None else round(db_cpu / max(1, acked) * 1e6, 1),
                        # the simulators' CPU per record acked, over the measured window (their own load on the cores)
                        "sim_cpu_us_per_record": round(sim_c / max(1.0, len(lat) / window * dt) * 1e6, 1),
                        # cores used during the measured window: ours, and the rest of the machine (other work)
                        "cores_used": {"simulators": round(sim_c / dt, 2), "hub_and_db": round(hub_c / dt, 2),
                                       "mosquitto": round(mq_c / dt, 2),
                                       "other_work": round(max(0.0, all_c - sim_c - hub_c - mq_c) / dt, 2)},
                        "loadavg_1m": [round(load0, 1), round(os.getloadavg()[0], 1)],
                        "connected_at_end": sum(f["connected"] for f in finals),
                        "pending_at_end": sum(f["pending"] for f in finals),
                        "hub_resends": sum(f["hub_resends"] for f in finals)}
        log(f"fleet {backend}: {out[backend]}")
    return out


class AlertUnit:
    """One more unit, not in the burst, on the agent's own path: the production SqliteOutbox (synchronous=FULL) and
    a Sync thread of its own, as `customs-edge run` has them. It commits an ALERT record every `every_s`; this
    process polls the hub's store (an index lookup of the device's highest seq, every POLL_S) and notes, per alert,
    the time from its commit to the store holding it."""

    POLL_S = 0.01

    def __init__(self, work: Path, port: int, device_id: str) -> None:
        from customs_edge.agent.config import SyncConfig
        from customs_edge.agent.outbox import SqliteOutbox
        from customs_edge.agent.sync import Sync

        self.device_id = device_id
        path = work / device_id / "outbox.db"
        self.outbox = SqliteOutbox(path, device_id=device_id)
        self.sync = Sync(device_id, self.outbox, SyncConfig(port=port), outbox_path=path)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sync.run, args=(self.stop,), name="alert-unit", daemon=True)
        self.sent = 0

    def start(self) -> AlertUnit:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.sync.link.connected:
            if time.monotonic() > deadline:
                raise RuntimeError("the alert unit did not connect")
            time.sleep(0.05)
        return self

    def measure(self, db: str, until: Any, every_s: float = 0.5, limit_s: float = 900.0) -> list[float]:
        """Raise an alert every `every_s` until `until()` is true (checked every 0.1 s); the latencies (s) of those
        stored by then (an alert not stored within `limit_s` counts as limit_s)."""
        from customs_edge.core.records import Priority, RecordIn
        from customs_edge.hub.storage import is_postgres, open_store

        st: Any = open_store(db, readonly=True)
        q = f"SELECT max(seq) FROM records WHERE device_id = {'%s' if is_postgres(db) else '?'}"
        lat: list[float] = []
        waiting: dict[int, float] = {}
        t0 = time.monotonic()
        next_alert = next_check = t0
        done = False
        try:
            while True:
                now = time.monotonic()
                if not done and now >= next_check:
                    next_check = now + 0.1
                    done = bool(until())
                if (done and not waiting) or now - t0 > limit_s:
                    break
                if not done and now >= next_alert:
                    next_alert += every_s
                    self.sent += 1
                    seqs = self.outbox.put([RecordIn(type="sim_alert", priority=Priority.ALERT,
                                                     payload={"kind": "sim", "n": self.sent})])
                    waiting[seqs[-1]] = time.monotonic()  # committed (FULL): the unit's clock starts here
                    self.sync.wake.set()
                if waiting:
                    top = st.db.execute(q, (self.device_id,)).fetchone()[0] or 0
                    now = time.monotonic()
                    for seq in [k for k in waiting if k <= top]:
                        lat.append(now - waiting.pop(seq))
                time.sleep(self.POLL_S)
            lat += [limit_s] * len(waiting)
        finally:
            st.close()
        return lat

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.outbox.close()


def lat_figures(lat: list[float]) -> dict[str, Any]:
    s = sorted(lat)
    ms = [round(x * 1000, 1) for x in s]
    return {"alerts": len(s), "p50_ms": ms[len(s) // 2] if s else None,
            "p99_ms": ms[min(len(s) - 1, int(0.99 * len(s)))] if s else None, "max_ms": ms[-1] if s else None}


def stored_by(db: str, prefix: str) -> int:
    from customs_edge.hub.storage import open_store

    st = open_store(db, readonly=True)
    try:
        return sum(d.stored for d in st.stats() if d.device_id.startswith(prefix))
    finally:
        st.close()


def burst(args: argparse.Namespace, work: Path, pg: Any) -> dict[str, Any]:
    """`--burst-units` units reconnect at once, each holding `--burst-records` records (a port's link back after
    an outage), spread over `--burst-processes` simulator processes that put their backlogs first (the outbox's own
    put, 5,000 records per transaction) and connect together: seconds until the hub's store holds every record, on
    SQLite (1 worker) and PostgreSQL (3 workers). Meanwhile an alert unit outside the burst raises an ALERT every
    `--alert-every` s: its commit -> stored latency during the burst, beside the same latency before the burst on
    the idle hub (the baseline)."""
    out: dict[str, Any] = {}
    nproc = max(1, min(args.burst_processes, args.burst_units))
    per = [args.burst_units // nproc + (1 if p < args.burst_units % nproc else 0) for p in range(nproc)]
    total = args.burst_units * args.burst_records
    for backend, n in [b for b in (("sqlite", 1), ("postgres", 3)) if b[0] in args.stores]:
        db = str(work / "burst.db") if backend == "sqlite" else pg.new_database()
        broker = Mosquitto(work / f"broker-burst-{backend}", persistence=False).start()
        ws = Workers(n, db, broker.port, work, parse_process=args.parse_process != "off")
        alert = AlertUnit(work / f"alert-{backend}", broker.port, f"alert{backend[0]}-0000").start()
        go = work / f"burst-go-{backend}"
        tag = f"burst{backend[0]}"
        sims: list[subprocess.Popen[str]] = []
        units_dir = sim_dir(work, f"burst-{backend}")
        try:
            idle = alert.measure(db, lambda: False, args.alert_every, limit_s=args.alert_baseline)
            for p, k in enumerate(per):
                sims.append(subprocess.Popen(
                    [sys.executable, "-m", "customs_edge", "fleet", "simulate", "--units", str(k), "--rate", "0",
                     "--backlog", str(args.burst_records), "--records", str(args.burst_records), "--prefix",
                     f"{tag}{p}", "--broker", f"127.0.0.1:{broker.port}", "--workdir", str(units_dir),
                     "--duration", str(args.burst_timeout), "--every", "1000000", "--json", "--counts-only",
                     "--spread", "0", "--wait-for", str(go), "--ack-timeout", str(args.burst_ack_timeout)],
                    env=ENV, stdout=subprocess.PIPE, text=True,
                    stderr=(work / f"burst-{backend}-{p}.log").open("wb")))
            t_fill = time.monotonic()
            for sim in sims:  # each has put its backlog
                line = sim.stdout.readline() if sim.stdout else ""
                if '"ready"' not in line:
                    raise RuntimeError(f"burst simulator did not get ready: {line!r}; see {work}")
            fill_s = time.monotonic() - t_fill
            mosq = broker.proc.pid if broker.proc else None
            pgc = pg if backend == "postgres" else None
            go.touch()
            t0 = time.monotonic()
            cpu0 = cpu_split(sims, ws, pgc, mosq)
            stored_at: list[float] = []
            cpu1: list[tuple[float, float, float, float]] = []

            def all_stored(db: str = db, tag: str = tag, stored_at: list[float] = stored_at,
                           sims: list[subprocess.Popen[str]] = sims, cpu1: list[Any] = cpu1,
                           pgc: Any = pgc, ws: Workers = ws, mosq: int | None = mosq, backend: str = backend) -> bool:
                n = stored_by(db, tag)
                if n >= total:  # before poll(): a simulator that exited is read (its CPU) while still unreaped
                    stored_at.append(time.monotonic())
                    cpu1.append(cpu_split(sims, ws, pgc, mosq))
                    return True
                failed = [p for p, sim in enumerate(sims) if sim.poll() not in (None, 0)]
                if failed:
                    tail = (work / f"burst-{backend}-{failed[0]}.log").read_text()[-3000:]
                    raise RuntimeError(f"burst simulator {failed[0]} failed with {n} of {total} stored:\n{tail}")
                if all(sim.poll() == 0 for sim in sims):  # every unit had its acks: the store must hold them all
                    raise RuntimeError(f"every burst unit was acked but the store counts {n} of {total}")
                return False

            during = alert.measure(db, all_stored, args.alert_every, limit_s=args.burst_timeout)
            finals = [json.loads((sim.communicate(timeout=300)[0] or "").splitlines()[-1]) for sim in sims]
        finally:
            alert.close()
            stop_all(sims, ws, broker, units_dir, work)
        check_store(db, args.burst_units, args.burst_records, tag)
        stored_s = stored_at[0] - t0 if stored_at else None
        used = [round((b - a) / stored_s, 2) for a, b in zip(cpu0, cpu1[0], strict=True)] if stored_s and cpu1 else None
        out[backend] = {"workers": n, "units": args.burst_units, "records_each": args.burst_records,
                        "simulator_processes": nproc, "prefill_s": round(fill_s, 1),
                        "seconds_until_all_stored": None if stored_s is None else round(stored_s, 2),
                        "records_per_s": None if not stored_s else round(total / stored_s),
                        "seconds_until_all_acked": max(f["last_ack_s"] or 0 for f in finals),
                        "acked": sum(f["acked"] for f in finals),
                        "hub_resends": sum(f["hub_resends"] for f in finals),
                        # of those, passed over by the hub; and batches kept waiting while its acks came (sync.py)
                        "hub_resends_skipped": sum(f.get("extra", {}).get("hub_resends_skipped", 0) for f in finals),
                        "hub_resends_deferred": sum(f.get("extra", {}).get("hub_resends_deferred", 0) for f in finals),
                        # of the deferred, by the hub workers' liveness alone (hub/liveness.py; 0 with --hub-alive off)
                        "hub_resends_deferred_alive": sum(f.get("extra", {}).get("hub_resends_deferred_alive", 0)
                                                          for f in finals),
                        "hub_alive_interval_s": Workers.alive_interval_s, "ack_timeout_s": args.burst_ack_timeout,
                        # cores used until every record was stored: ours, and the rest of the machine (other work)
                        "cores_used": None if used is None else {
                            "simulators": used[0], "hub_and_db": used[1], "mosquitto": used[2],
                            "other_work": round(max(0.0, used[3] - used[0] - used[1] - used[2]), 2)},
                        "alert_latency_during_burst": lat_figures(during),
                        "alert_latency_idle_hub": lat_figures(idle), "alert_every_s": args.alert_every,
                        "loadavg_1m_after": round(os.getloadavg()[0], 1)}
        log(f"burst {backend}: {out[backend]}")
    return out


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--window", type=int, default=8, help="ingest: batches the publisher keeps unacked per worker")
    ap.add_argument("--workers", default="1,2,3", help="PostgreSQL worker counts (SQLite: one worker)")
    ap.add_argument("--units", type=int, default=500)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--processes", type=int, default=2, help="simulator processes the units are spread over")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds for the units to connect before measuring")
    ap.add_argument("--fleet-seconds", type=float, default=20.0)
    ap.add_argument("--burst-units", type=int, default=20)
    ap.add_argument("--burst-records", type=int, default=2000)
    ap.add_argument("--burst-processes", type=int, default=2, help="simulator processes the burst units share")
    ap.add_argument("--burst-timeout", type=float, default=900.0, help="seconds the burst may take before it fails")
    ap.add_argument("--alert-every", type=float, default=0.5, help="seconds between the alert unit's alerts")
    ap.add_argument("--alert-baseline", type=float, default=5.0,
                    help="seconds of alerts to the idle hub before the burst (the baseline)")
    ap.add_argument("--sim-outbox", choices=["memory", "sqlite"], default="memory",
                    help="the fleet's simulated units' outbox (memory: no disk writes of their own; see docstring)")
    ap.add_argument("--put-every", type=float, default=None,
                    help="fleet: seconds between a unit's commits (default 0.05: one record per commit at 5/s)")
    ap.add_argument("--stores", default="sqlite,postgres", help="ingest, fleet and burst: the stores to run them on")
    ap.add_argument("--skip", choices=["ingest", "fleet", "burst"], action="append", default=[])
    ap.add_argument("--burst-ack-timeout", type=float, default=10.0, help="the burst units' ack_timeout_s")
    ap.add_argument("--hub-alive", default="5", metavar="S|off",
                    help="the hub workers' alive_interval_s (hub/liveness.py); off: no liveness, units as before it")
    ap.add_argument("--parse-process", choices=["off", "on", "both"], default="both",
                    help="the workers' parse_process (hub/parser.py). both: each ingest run with the parse in the"
                         " worker (the baseline) and one more, one worker with its parse process"
                         " (`workers_1_parse_process`); fleet and burst with it, as configs/hub/hub.yaml ships;"
                         " on: every run with it; off: none")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.workers = [int(x) for x in args.workers.split(",")]
    args.stores = args.stores.split(",")
    Workers.alive_interval_s = None if args.hub_alive == "off" else float(args.hub_alive)
    from customs_edge.agent.simfleet import raise_fd_limit
    from tests.pg import PgCluster

    raise_fd_limit()  # before mosquitto starts: it inherits the limit, and holds a descriptor per unit

    out: dict[str, Any] = {"cores": os.cpu_count(), "loadavg_1m_before": os.getloadavg()[0],
                           "records": args.records, "batch": args.batch, "devices": args.devices}
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        pg = PgCluster(durable=True).start()
        try:
            if "ingest" not in args.skip:
                out["ingest"] = ingest(args, Path(tmp), pg)
            if "fleet" not in args.skip:
                out["fleet"] = fleet(args, Path(tmp), pg)
            if "burst" not in args.skip:
                out["burst"] = burst(args, Path(tmp), pg)
        finally:
            pg.stop()
    out["loadavg_1m_after"] = os.getloadavg()[0]  # other work on this machine shares its cores: read figures with it
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
