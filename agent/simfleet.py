"""A simulated fleet in one process: N lightweight units, each with its own device id, outbox file and MQTT
session, producing records at a steady rate against one broker and hub. For load tests, the scale-out
drill and the console's demo (`customs-edge fleet simulate --units N`).

A unit here is the agent's own store-and-forward path without drivers or an app: the production
SqliteOutbox (agent/outbox.py: seqs, hash chain, commit; synchronous=NORMAL by default, since a simulated
unit's own durability is not what a load test measures) and Sync (agent/sync.py: signed batches, window, hub
acks deleting exactly what they name, resend on ack timeout), each unit with its own MQTT session. Records
are `sim` records whose payload carries the unit's counter, so the hub's copy can be checked against what
was produced.

What is not the agent's: threads. A real unit runs one Sync thread that waits in its link's poll(); 500 such
threads in one interpreter spend more CPU waking up and queueing for the GIL than on their records, so the
fleet measured its own simulator. Here a few driver threads (`threads`, default 1) each own a share of the
units: one epoll over all their sockets, and a unit's `Sync.step()` runs when its socket is readable, when
records were just put into its outbox, or when its timer is due (at least every `tick_s`: keepalive, ack
deadlines, reconnect backoff, status). Its link (DrivenLink) never waits in step(): the driver did. The same
driver puts each unit's due records (one transaction per unit per `put_every_s`, default 50 ms: at 5
records/s, one record per transaction and per batch, as a unit sends them). Stepping is the production
Sync's: the only code here is when to call it. The outbox may be MemoryOutbox instead (`outbox="memory"`: the
same contract in memory) for fleets whose units' own disk writes would be most of the machine's work. Either is
wrapped (_Timing) to time each record and to answer begin() without a query while nothing was put or released
since it last came back short: Sync asks on every step, i.e. on every ack.

Figures: `records_acked` (deleted from the outboxes after the hub's ack) and the ack latency, from a
record's commit into its outbox to the hub's ack deleting it (p50/p99 over the records acked).
`timed=False` keeps counts only (a backlog of millions: no per-record clock in memory).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import resource
import select
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from customs_edge.agent.config import SyncConfig
from customs_edge.agent.outbox import MemoryOutbox, SqliteOutbox
from customs_edge.agent.sync import Sync
from customs_edge.core.jsonfast import dumps
from customs_edge.core.mqtt import Event, MqttLink, Waker, Will, install_client_id
from customs_edge.core.records import Pending, Priority, RecordIn
from customs_edge.core.wire import topic

log = logging.getLogger(__name__)


class _Timing:
    """Beside an outbox implementation (the MRO's next class): when each seq was committed and how long until the
    hub acked it (timed=False: only how many were acked); and begin() answered without a query while nothing
    was put or released since it last found the outbox drained. Sync's step asks the outbox for more records on
    every step, i.e. on every ack: a real unit's one query is the fleet's 500."""

    def __init__(self, *args: Any, timed: bool = True, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.timed = timed
        self.committed: dict[int, float] = {}
        self.latencies: list[float] = []
        self.acked = 0
        self.put_records = 0
        self._times = threading.Lock()
        self._gen = 0  # bumped by every put and release
        self._drained_gen = -1  # the generation in which begin() last found nothing

    def put(self, records: Sequence[RecordIn], state: tuple[str, bytes] | None = None) -> range:
        seqs: range = super().put(records, state)  # type: ignore[misc]
        now = time.monotonic()
        with self._times:
            self._gen += 1
            self.put_records += len(seqs)
            if self.timed:
                self.committed.update(dict.fromkeys(seqs, now))
        return seqs

    def begin(self, max_records: int) -> list[Pending]:
        with self._times:
            gen = self._gen
        if gen == self._drained_gen:
            return []
        out: list[Pending] = super().begin(max_records)  # type: ignore[misc]
        if len(out) < max_records:  # all there was: the next begin in this generation would find nothing
            self._drained_gen = gen
        return out

    def release(self) -> None:
        super().release()  # type: ignore[misc]
        with self._times:
            self._gen += 1

    def ack(self, ranges: Iterable[tuple[int, int]]) -> int:
        ranges = list(ranges)
        n: int = super().ack(ranges)  # type: ignore[misc]
        now = time.monotonic()
        with self._times:
            if not self.timed:
                self.acked += n
                return n
            for lo, hi in ranges:
                for seq in range(lo, hi + 1):
                    t = self.committed.pop(seq, None)
                    if t is not None:
                        self.latencies.append(now - t)
                        self.acked += 1
        return n

    @property
    def pending(self) -> int:
        """Records put here and not yet acked."""
        with self._times:
            return len(self.committed) if self.timed else self.put_records - self.acked


class TimedOutbox(_Timing, SqliteOutbox):
    """The production outbox (a file per unit), timed."""


class TimedMemoryOutbox(_Timing, MemoryOutbox):
    """The Outbox contract in memory (the same seqs, chain links, acks and release as the file; nothing survives
    the process), timed: for fleets whose units' own disk writes would be most of the machine's work."""


class DrivenLink(MqttLink):
    """The production MQTT link, stepped by a fleet driver: step() never waits (the driver's epoll waited for
    every unit's socket at once) and the driver reads which socket to watch from fileno()."""

    def step(self, timeout: float, read: bool = True) -> list[Event]:
        return super().step(0.0, read)

    def fileno(self) -> int:
        """The socket of the current attempt or connection; -1 between attempts."""
        c = self._client
        sock = c.socket() if c is not None else None
        return sock.fileno() if isinstance(sock, socket.socket) else -1

    def wants_write(self) -> bool:
        c = self._client
        return c is not None and c.want_write()


def unit_link(device_id: str, cfg: SyncConfig, outbox_path: Path) -> DrivenLink:
    """What Sync would build for this unit (client id stable per outbox, persistent session, the offline will),
    as a DrivenLink."""
    will = Will(topic(cfg.topic_prefix, device_id, "status"),
                dumps({"state": "offline", "device_id": device_id, "ts": None}).encode())
    return DrivenLink(install_client_id(f"ce-{device_id}", outbox_path), cfg.host, cfg.port,
                      keepalive=cfg.keepalive_s, clean_session=False, will=will, **cfg.credentials(),
                      connect_timeout_s=cfg.connect_timeout_s, backoff_min_s=cfg.backoff_min_s,
                      backoff_max_s=cfg.backoff_max_s)


@dataclass(eq=False)
class SimUnit:
    device_id: str
    outbox: TimedOutbox | TimedMemoryOutbox
    sync: Sync
    link: DrivenLink
    produced: int = 0
    start_at: float = 0.0  # seconds after start() its production (and its first connect) begins
    fd: int = -1  # the socket the driver watches for it
    next_tick: float = 0.0
    watch_out: bool = False  # its socket is watched for writable too: paho holds data the kernel would not take


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


class _Driver:
    """One thread stepping a share of the fleet's units over one epoll."""

    POLL_MAX_S = 0.25

    def __init__(self, fleet: SimFleet, units: list[SimUnit]) -> None:
        self.fleet, self.units = fleet, units
        self.ep = select.epoll()
        self.by_fd: dict[int, SimUnit] = {}
        self.waker = Waker()  # another thread put records (SimFleet.put): step those units
        self.woken: list[SimUnit] = []
        self._woken_lock = threading.Lock()
        self.ep.register(self.waker.fileno(), select.EPOLLIN)
        self.timers: list[tuple[float, int, SimUnit]] = []  # (due, tiebreak, unit); stale entries skipped
        self._n = 0
        self.steps = 0
        self.thread = threading.Thread(target=self.run, name="sim-driver", daemon=True)
        self.put_failures = 0

    def wake(self, unit: SimUnit) -> None:
        with self._woken_lock:
            self.woken.append(unit)
        self.waker.set()

    def _schedule(self, u: SimUnit, at: float) -> None:
        u.next_tick = at
        self._n += 1
        heapq.heappush(self.timers, (at, self._n, u))

    def run(self) -> None:
        fleet, stop = self.fleet, self.fleet.stop_event
        t0 = fleet.t0
        for u in self.units:  # first connects spread as the fleet's clocks are
            self._schedule(u, t0 + u.start_at)
        next_put = t0
        due: set[SimUnit] = set()
        waker_fd = self.waker.fileno()
        try:
            while not stop.is_set():
                now = time.monotonic()
                if fleet.rate > 0 and now >= next_put:
                    next_put = now + fleet.put_every_s
                    try:
                        due.update(fleet.produce(self.units, now))
                    except Exception:  # an outbox that refuses (a full disk): its units go on syncing, counted
                        self.put_failures += 1
                        log.exception("putting the fleet's records failed; retried at the next put")
                wait = min(self.POLL_MAX_S, (self.timers[0][0] if self.timers else now + 1) - now,
                           (next_put - now) if fleet.rate > 0 else self.POLL_MAX_S)
                for fd, _ in self.ep.poll(0.0 if due else max(0.0, wait)):
                    if fd == waker_fd:
                        self.waker.clear()
                        with self._woken_lock:
                            due.update(self.woken)
                            self.woken.clear()
                    elif (ready := self.by_fd.get(fd)) is not None:
                        due.add(ready)
                now = time.monotonic()
                while self.timers and self.timers[0][0] <= now:
                    at, _, u = heapq.heappop(self.timers)
                    if at == u.next_tick:
                        due.add(u)
                todo, due = due, set()
                for u in todo:
                    self._step(u, now)
        finally:
            self.ep.close()
            self.waker.close()

    def _step(self, u: SimUnit, now: float) -> None:
        self.steps += 1
        try:
            u.sync.step()
        except Exception:  # as Sync.run: a bug, an outbox locked for long: never let the unit die
            log.exception("sync step failed; dropping the link and starting over", extra={"device_id": u.device_id})
            u.link.abort("sync step failed")
        fd = u.link.fileno()
        if fd != u.fd:
            if u.fd >= 0 and self.by_fd.get(u.fd) is u:
                del self.by_fd[u.fd]
                with contextlib.suppress(OSError, ValueError):  # closed: epoll forgot it by itself
                    self.ep.unregister(u.fd)
            if fd >= 0:
                self.by_fd[fd] = u
                try:
                    self.ep.register(fd, select.EPOLLIN)
                except FileExistsError:  # a number reused before the old socket's close reached epoll
                    self.ep.modify(fd, select.EPOLLIN)
            u.fd, u.watch_out = fd, False
        # data left to write (the broker is behind): stepped again when the socket takes more, not at once (a spin)
        if fd >= 0 and (want := u.link.wants_write()) != u.watch_out:
            with contextlib.suppress(OSError, ValueError):
                self.ep.modify(fd, select.EPOLLIN | (select.EPOLLOUT if want else 0))
                u.watch_out = want
        self._schedule(u, now + self.fleet.tick_s)


class SimFleet:
    TICK_S = 0.05  # the producer puts each unit's due records this often (put_every_s)

    def __init__(self, units: int, workdir: Path, *, host: str = "127.0.0.1", port: int = 1883,
                 rate: float = 5.0, prefix: str = "sim", topic_prefix: str = "customs-edge/v1",
                 synchronous: str = "NORMAL", ack_timeout_s: float = 10.0, batch_max_records: int = 500,
                 window_batches: int = 8, limit: int | None = None, burst: int = 0, signing: bool = True,
                 sync_options: dict[str, Any] | None = None, threads: int = 1, put_every_s: float | None = None,
                 tick_s: float | None = None, spread_s: float = 1.0, timed: bool = True,
                 outbox: str = "sqlite") -> None:
        """rate: records/s per unit; limit: records per unit, then it only syncs; burst: records each unit
        puts into its outbox before it connects (a backlog, as after a link outage); threads: driver threads the
        units are shared among; put_every_s: how often each unit's due records are put (one transaction);
        tick_s: longest time between two steps of a unit (default: 1 s, at most a quarter of ack_timeout_s);
        spread_s: units start (produce, first connect) spread over this many seconds; timed: keep every record's
        ack latency (False: counts only); outbox: "sqlite" (the production file, one per unit) or "memory" (the
        same contract in memory: MemoryOutbox)."""
        if outbox not in ("sqlite", "memory"):
            raise ValueError(f"outbox {outbox!r}: sqlite or memory")
        raise_fd_limit()
        self.rate, self.limit = rate, limit
        self.put_every_s = self.TICK_S if put_every_s is None else put_every_s
        self.tick_s = tick_s if tick_s is not None else min(1.0, ack_timeout_s / 4)
        self.stop_event = threading.Event()
        self.units: list[SimUnit] = []
        self.t0 = time.monotonic()
        cfg = SyncConfig(host=host, port=port, topic_prefix=topic_prefix, ack_timeout_s=ack_timeout_s,
                         batch_max_records=batch_max_records, window_batches=window_batches,
                         **(sync_options or {}))
        for i in range(units):
            device_id = f"{prefix}-{i:04d}"
            path = workdir / device_id / "outbox.db"
            ob: TimedOutbox | TimedMemoryOutbox
            if outbox == "sqlite":
                ob = TimedOutbox(path, device_id=device_id, synchronous=synchronous, timed=timed)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)  # the unit's key and sync state live beside it
                ob = TimedMemoryOutbox(device_id=device_id, timed=timed)
            link = unit_link(device_id, cfg, path)
            unit = SimUnit(device_id, ob, Sync(device_id, ob, cfg, outbox_path=path, signing=signing,
                                                   link=link), link, start_at=spread_s * i / max(1, units))
            if burst:
                self._put(unit, burst)
            self.units.append(unit)
        self._drivers = [_Driver(self, self.units[k::threads]) for k in range(max(1, min(threads, units)))]
        self._driver_of = {u.device_id: d for d in self._drivers for u in d.units}
        self._start = {u.device_id: u.produced for u in self.units}
        self._counts = threading.Lock()  # a unit's produced and _start: its driver and put() (any thread) count them

    @staticmethod
    def _put(unit: SimUnit, n: int, chunk: int = 5000) -> None:
        for k0 in range(0, n, chunk):  # a backlog of 10^4 in a few transactions, as a unit's writer commits them
            base = unit.produced
            m = min(chunk, n - k0)
            unit.outbox.put([RecordIn(type="sim", priority=Priority.EVENT,
                                      payload={"k": base + k, "unit": unit.device_id}) for k in range(m)])
            unit.produced += m

    def start(self) -> SimFleet:
        self.t0 = time.monotonic()
        for d in self._drivers:
            d.thread.start()
        return self

    def produce(self, units: Iterable[SimUnit], now: float) -> list[SimUnit]:
        """Put each unit's due records (a driver thread, for its units); the units that got some."""
        elapsed = now - self.t0
        out = []
        for u in units:
            # units start spread over the first second, as a real fleet's clocks are
            due = int(self.rate * max(0.0, elapsed - u.start_at)) + self._start[u.device_id] - u.produced
            if self.limit is not None:
                due = min(due, self.limit - u.produced)
            if due > 0:
                with self._counts:
                    self._put(u, due)
                out.append(u)
        return out

    def put(self, unit: SimUnit, records: Sequence[RecordIn]) -> range:
        """Commit records into a unit's outbox from any thread (an alert, say) and have its driver send them."""
        seqs = unit.outbox.put(records)
        with self._counts:
            unit.produced += len(seqs)
            self._start[unit.device_id] += len(seqs)  # not part of its steady rate
        self._driver_of[unit.device_id].wake(unit)
        return seqs

    def figures(self) -> FleetFigures:
        lat = [x for u in self.units for x in u.outbox.latencies]
        pending = sum(u.outbox.pending for u in self.units)
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        return FleetFigures(
            units=len(self.units), produced=sum(u.produced for u in self.units),
            acked=sum(u.outbox.acked for u in self.units), pending=pending,
            hub_resends=sum(u.sync.stats.hub_resends for u in self.units),
            resent_after_reconnect=sum(u.sync.stats.resent_after_reconnect for u in self.units),
            latency_p50_ms=None if p50 is None else round(p50 * 1000, 1),
            latency_p99_ms=None if p99 is None else round(p99 * 1000, 1),
            extra={"steps": sum(d.steps for d in self._drivers),
                   "put_failures": sum(d.put_failures for d in self._drivers),
                   # batches past their ack wait left waiting while the hub's acks came; resent as passed over
                   "hub_resends_deferred": sum(u.sync.stats.hub_resends_deferred for u in self.units),
                   "hub_resends_skipped": sum(u.sync.stats.hub_resends_skipped for u in self.units),
                   # of the deferred, by the hub's liveness alone (hub/liveness.py)
                   "hub_resends_deferred_alive": sum(u.sync.stats.hub_resends_deferred_alive for u in self.units)})

    def reset_latencies(self) -> None:
        for u in self.units:
            with u.outbox._times:
                u.outbox.latencies.clear()

    def connected(self) -> int:
        return sum(1 for u in self.units if u.sync.link.connected)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        for d in self._drivers:
            if d.thread.is_alive():
                d.thread.join(timeout)
            elif d.thread.ident is None:  # never started: its run() would have closed these
                d.ep.close()
                d.waker.close()
        stopped = threading.Event()
        stopped.set()
        for d in self._drivers:
            for u in d.units:
                if d.thread.is_alive():  # a driver still stepping its units (stuck): no second thread on them
                    continue
                with contextlib.suppress(Exception):
                    u.sync.run(stopped)  # no step: Sync's own goodbye (offline status, DISCONNECT, acks settled)
                u.outbox.close()
