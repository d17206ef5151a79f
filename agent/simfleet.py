"""A simulated fleet in one process: N lightweight units, each with its own device id, outbox file and MQTT
session, producing records at a steady rate against one broker and hub. For load tests, the scale-out
drill and the console's demo (`customs-edge fleet simulate --units N`).

A unit here is the agent's own store-and-forward path without drivers or an app: the production
SqliteOutbox (agent/outbox.py: seqs, hash chain, durable commit) and Sync (agent/sync.py: signed batches,
window, hub acks, resend on ack timeout), one Sync thread per unit. One producer thread puts each unit's
due records into its outbox and wakes its sync. Records are `sim` records whose payload carries the unit's
counter, so the hub's copy can be checked against what was produced.

Figures: `records_acked` (deleted from the outboxes after the hub's ack) and the ack latency, from a
record's commit into its outbox to the hub's ack deleting it (p50/p99 over the records acked).
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.agent.sync import Sync
from customs_edge.core.records import Priority, RecordIn


class TimedOutbox(SqliteOutbox):
    """The production outbox, noting when each seq was committed and how long until the hub acked it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.committed: dict[int, float] = {}
        self.latencies: list[float] = []
        self.acked = 0
        self._times = threading.Lock()

    def put(self, records: Sequence[RecordIn], state: tuple[str, bytes] | None = None) -> range:
        seqs = super().put(records, state)
        now = time.monotonic()
        with self._times:
            self.committed.update(dict.fromkeys(seqs, now))
        return seqs

    def ack(self, ranges: Iterable[tuple[int, int]]) -> int:
        ranges = list(ranges)
        n = super().ack(ranges)
        now = time.monotonic()
        with self._times:
            for lo, hi in ranges:
                for seq in range(lo, hi + 1):
                    t = self.committed.pop(seq, None)
                    if t is not None:
                        self.latencies.append(now - t)
                        self.acked += 1
        return n


@dataclass
class SimUnit:
    device_id: str
    outbox: TimedOutbox
    sync: Sync
    produced: int = 0
    thread: threading.Thread | None = None


@dataclass
class FleetFigures:
    units: int
    produced: int
    acked: int
    pending: int
    hub_resends: int
    resent_after_reconnect: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def raise_fd_limit() -> None:
    """Each unit holds a socket and its outbox's files: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class SimFleet:
    TICK_S = 0.05  # the producer puts each unit's due records this often

    def __init__(self, units: int, workdir: Path, *, host: str = "127.0.0.1", port: int = 1883,
                 rate: float = 5.0, prefix: str = "sim", topic_prefix: str = "customs-edge/v1",
                 synchronous: str = "NORMAL", ack_timeout_s: float = 10.0, batch_max_records: int = 500,
                 window_batches: int = 8, limit: int | None = None, burst: int = 0, signing: bool = True,
                 sync_options: dict[str, Any] | None = None) -> None:
        """rate: records/s per unit; limit: records per unit, then it only syncs; burst: records each unit
        puts into its outbox before it connects (a backlog, as after a link outage)."""
        raise_fd_limit()
        self.rate, self.limit = rate, limit
        self.stop_event = threading.Event()
        self.units: list[SimUnit] = []
        self._producer: threading.Thread | None = None
        cfg = SyncConfig(host=host, port=port, topic_prefix=topic_prefix, ack_timeout_s=ack_timeout_s,
                         batch_max_records=batch_max_records, window_batches=window_batches,
                         **(sync_options or {}))
        for i in range(units):
            device_id = f"{prefix}-{i:04d}"
            path = workdir / device_id / "outbox.db"
            outbox = TimedOutbox(path, device_id=device_id, synchronous=synchronous)
            unit = SimUnit(device_id, outbox, Sync(device_id, outbox, cfg, outbox_path=path, signing=signing))
            if burst:
                self._put(unit, burst)
            self.units.append(unit)

    @staticmethod
    def _put(unit: SimUnit, n: int) -> None:
        base = unit.produced
        unit.outbox.put([RecordIn(type="sim", priority=Priority.EVENT, payload={"k": base + k, "unit": unit.device_id})
                         for k in range(n)])
        unit.produced += n

    def start(self) -> SimFleet:
        for u in self.units:
            u.thread = threading.Thread(target=u.sync.run, args=(self.stop_event,), name=f"sync-{u.device_id}",
                                        daemon=True)
            u.thread.start()
        if self.rate > 0:
            self._producer = threading.Thread(target=self._produce, name="sim-producer", daemon=True)
            self._producer.start()
        return self

    def _produce(self) -> None:
        t0 = time.monotonic()
        start = {u.device_id: u.produced for u in self.units}
        n = len(self.units)
        while not self.stop_event.wait(self.TICK_S):
            elapsed = time.monotonic() - t0
            for i, u in enumerate(self.units):
                # units start spread over the first second, as a real fleet's clocks are
                due = int(self.rate * max(0.0, elapsed - i / n)) + start[u.device_id] - u.produced
                if self.limit is not None:
                    due = min(due, self.limit - u.produced)
                if due > 0:
                    self._put(u, due)
                    u.sync.wake.set()

    def figures(self) -> FleetFigures:
        lat = [x for u in self.units for x in u.outbox.latencies]
        pending = sum(len(u.outbox.committed) for u in self.units)
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        return FleetFigures(
            units=len(self.units), produced=sum(u.produced for u in self.units),
            acked=sum(u.outbox.acked for u in self.units), pending=pending,
            hub_resends=sum(u.sync.stats.hub_resends for u in self.units),
            resent_after_reconnect=sum(u.sync.stats.resent_after_reconnect for u in self.units),
            latency_p50_ms=None if p50 is None else round(p50 * 1000, 1),
            latency_p99_ms=None if p99 is None else round(p99 * 1000, 1))

    def reset_latencies(self) -> None:
        for u in self.units:
            with u.outbox._times:
                u.outbox.latencies.clear()

    def connected(self) -> int:
        return sum(1 for u in self.units if u.sync.link.connected)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self._producer:
            self._producer.join(timeout)
        for u in self.units:
            if u.thread:
                u.thread.join(timeout)
            u.outbox.close()
