"""Wiring: drivers -> app -> outbox -> sync. Threads, each with one job:

  driver-<role>  open the port, read() in a loop, put Readings on the queue; on DriverFault put the
                 fault, close, reopen with backoff (the rest of the unit keeps running). After a reload
                 it first waits for the previous unit's thread on the same port to let go of it;
  core           take Readings, run the app, commit its records to the outbox together with the app's
                 snapshot (one transaction): at once when the queue is idle, grouped under load (when
                 `commit_max_records` are pending or the oldest has waited `commit_interval_ms`);
  sync           the MQTT loop (agent/sync.py), which also publishes the unit's health (agent/health.py):
                 every health_interval_s, and at once when a driver thread goes up or down.
The core never stops for a bad input or a failing commit: an app exception is counted and reported in
one `app_error` record a minute at most; records the outbox refuses are held and retried with backoff
while the core keeps running, and a record that fails alone while its neighbours commit is written to
`<outbox>.unsent.jsonl`, as is whatever the final commit at stop cannot store.
stop() returns within a few seconds: drivers stop at their next read timeout, the core flushes the
app and commits, the sync publishes "offline" and disconnects.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any

from customs_edge.agent import registry, sdnotify
from customs_edge.agent.apps.base import App
from customs_edge.agent.config import UnitConfig
from customs_edge.agent.health import HealthSampler, model_versions
from customs_edge.agent.inspect import Inspector, is_image
from customs_edge.agent.model_store import effective_app
from customs_edge.agent.outbox import Outbox, SqliteOutbox
from customs_edge.agent.sync import Sync
from customs_edge.core.errors import DriverFault, ModelError
from customs_edge.core.jsonfast import dumps
from customs_edge.core.logs import redact
from customs_edge.core.mqtt import Backoff
from customs_edge.core.outputs import Output
from customs_edge.core.readings import Image, Reading, ThermalFrame
from customs_edge.core.records import Priority, RecordIn
from customs_edge.core.wire import Command, topic
from customs_edge.drivers.base import Driver

log = logging.getLogger(__name__)

TICK_S = 0.1
WATCH_S = 5.0  # how often the core looks for outbox problems the hub must hear of
STATE_KEY = "app"  # the outbox's app_state row holding App.snapshot()
SUMMARY_S = 60.0  # one summary log line per unit this often: records by type, backlog, link, drivers
REOPEN_LOG_FIRST = 5  # reopen attempts of a driver that stays down: each of the first ones logged,
REOPEN_LOG_S = 60.0  # then one line this often at most
PAYLOAD_LOG_CHARS = 200  # a record's payload in a log line is cut to this
_type_of, _priority_of = attrgetter("type"), attrgetter("priority")


def _short(payload: Any) -> str:
    text = dumps(payload)
    return text if len(text) <= PAYLOAD_LOG_CHARS else text[:PAYLOAD_LOG_CHARS] + "..."


def _utc(delay_s: float) -> str:
    """Wall-clock time `delay_s` from now, for a log line: 2026-01-31T12:00:05Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + delay_s))


class _Fault:
    __slots__ = ("error", "role")

    def __init__(self, role: str, error: DriverFault) -> None:
        self.role, self.error = role, error


class _Recovered:
    __slots__ = ("down_s", "role")

    def __init__(self, role: str, down_s: float) -> None:
        self.role, self.down_s = role, down_s


def port_of(driver: Driver) -> str:
    """What a driver holds exclusively: its port (a serial line, a socket) or, without one, its role."""
    return str(getattr(driver.config, "port", None) or f"role:{driver.role}")


class _AppCommand:
    """An operator's command for the app, run by the core thread; the sync thread waits for `done`."""

    __slots__ = ("args", "done", "error", "name", "result")

    def __init__(self, name: str, args: dict[str, Any]) -> None:
        self.name, self.args, self.done = name, args, threading.Event()
        self.result: dict[str, Any] = {}
        self.error: Exception | None = None

    def run(self, app: App) -> list[RecordIn]:
        try:
            self.result, records = app.command(self.name, self.args)
        except Exception as exc:  # the reply says so; the core goes on
            self.error = exc
            return []
        return records

    def finish(self, stored: bool) -> None:
        self.result = {**self.result, "stored": stored}
        self.done.set()


class DriverThread(threading.Thread):
    def __init__(self, driver: Driver, out: queue.Queue[Any], stop: threading.Event,
                 after: Sequence[threading.Thread] = (), on_change: Callable[[], None] = lambda: None) -> None:
        super().__init__(name=f"driver-{driver.role}", daemon=True)
        self.driver, self.out, self.stop_event = driver, out, stop
        self.on_change = on_change  # called once the driver went up or down (`up` below changed)
        self.after = list(after)  # threads of a previous unit still holding this driver's port
        self.waiting_for_port = bool(after)
        self.backoff = Backoff(0.5, 30.0)
        self.down_since: float | None = None
        self.last_error = ""  # the last fault, for a pushed config's rollback reason
        self.readings = 0
        self.reopen_attempts = 0  # failed reopens since the driver went down
        self._reopen_logged = 0.0

    def run(self) -> None:
        d = self.driver
        self._await_port()
        while not self.stop_event.is_set():
            try:
                d.open()
                while not self.stop_event.is_set():
                    reading = d.read()
                    if reading is not None:
                        if self.down_since is not None:
                            self.out.put(_Recovered(d.role, time.monotonic() - self.down_since))
                            log.info("driver recovered", extra={"driver": d.role})
                            self.down_since = None
                            self.backoff.reset()
                            self.on_change()
                        self.readings += 1
                        if self.readings == 1:
                            self.on_change()
                        self.out.put(reading)
            except DriverFault as exc:
                self.last_error = redact(str(exc))  # goes into a config_push reply: no camera URL's user:pass@
                delay = self.backoff.next()
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    self.reopen_attempts = 0
                    self.out.put(_Fault(d.role, exc))
                    log.warning("driver fault", extra={"driver": d.role, "error": str(exc),
                                                       "retry_in_s": round(delay, 2), "next_retry": _utc(delay)})
                    self.on_change()
                else:
                    self._log_reopen(exc, delay)
                self._close()
                self.stop_event.wait(delay)
            except Exception:
                log.exception("driver crashed; restarting it", extra={"driver": d.role})
                self._close()
                self.stop_event.wait(self.backoff.next())
        self._close()

    def _log_reopen(self, exc: DriverFault, delay: float) -> None:
        """A reopen failed again: the first REOPEN_LOG_FIRST are logged each, then one a REOPEN_LOG_S."""
        self.reopen_attempts += 1
        now = time.monotonic()
        if self.reopen_attempts > REOPEN_LOG_FIRST and now - self._reopen_logged < REOPEN_LOG_S:
            return
        self._reopen_logged = now
        log.warning("driver still down; reopen failed", extra={
            "driver": self.driver.role, "attempt": self.reopen_attempts,
            "down_s": round(now - (self.down_since or now), 1), "error": str(exc),
            "retry_in_s": round(delay, 2), "next_retry": _utc(delay)})

    def _await_port(self) -> None:
        """Never two masters on one line: open the port only once the old unit's thread let go of it."""
        for t in self.after:
            while t.is_alive() and not self.stop_event.is_set():
                t.join(0.2)
        self.waiting_for_port = False

    def _close(self) -> None:
        try:
            self.driver.close()
        except Exception:
            log.exception("driver close failed", extra={"driver": self.driver.role})


def make_app(cfg: UnitConfig) -> App:
    """The unit's app, with the model versions pushed to the unit (agent/model_store.py). A pushed version that
    no longer loads (its files damaged on disk) is logged and the model the config names runs instead."""
    cls = registry.lookup("app", cfg.type)
    app_cfg = effective_app(cfg)
    if app_cfg is cfg.app:
        return cls(cfg.device_id, cfg.app)
    try:
        return cls(cfg.device_id, app_cfg)
    except ModelError as exc:
        log.error("a pushed model does not load; the model the config names runs instead", extra={"error": str(exc)})
        return cls(cfg.device_id, cfg.app)


def open_outbox(cfg: UnitConfig) -> SqliteOutbox:
    oc = cfg.outbox
    return SqliteOutbox(oc.path, synchronous=oc.synchronous, max_mb=oc.max_mb, max_age_days=oc.max_age_days,
                        device_id=cfg.device_id)


def _same_outbox_file(a: UnitConfig, b: UnitConfig) -> bool:
    return Path(a.outbox.path).resolve() == Path(b.outbox.path).resolve()


class Unit:
    """One configured unit. `start()`, then `stop()`; `drivers`, `app`, `outbox`, `sync` are public
    so tests, the status command and the demo can look inside."""

    STATE_INTERVAL_S = 5.0  # app state changed without records: committed on its own at most this often
    APP_ERROR_INTERVAL_S = 60.0  # at most one app_error record (and log line) per interval
    ISOLATE_AFTER = 3  # failed commits of held records before looking for the record that fails alone
    ISOLATE_PUTS = 64  # commits tried per isolation pass (bisection: ~2 log2(n) per bad record)
    MAX_HELD = 100_000  # records held in memory while the outbox refuses commits; older ones go to the file
    FINAL_ATTEMPTS = 3

    def __init__(self, cfg: UnitConfig, *, outbox: Outbox | None = None, app: App | None = None,
                 drivers: dict[str, Driver] | None = None,
                 commands: Callable[[Command], dict[str, Any] | None] | None = None) -> None:
        self.cfg = cfg
        self.commands = commands  # the runtime's command hook (config_get, config_push), kept across reloads
        self.outbox: Outbox = outbox or open_outbox(cfg)
        if app is None:
            app = make_app(cfg)
        self.app: App = app
        if drivers is None:
            drivers = {role: registry.lookup("driver", dc.driver)(role, dc) for role, dc in cfg.drivers.items()}
        self.drivers = drivers
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self.stop_event = threading.Event()
        self.health_sampler = HealthSampler(cfg, self.outbox, self.driver_states, lambda: model_versions(self.app))
        self.sync = Sync(cfg.device_id, self.outbox, cfg.sync, outbox_path=cfg.outbox.path, status=self.status_extra,
                         health=self.health_sampler.sample, health_interval_s=cfg.health_interval_s,
                         commands=self._command,
                         sidelines=app.sidelines(str(cfg.outbox.path), cfg.sync.topic_prefix))
        self.inspector = Inspector(self._publish_snapshot)  # remote inspection: snapshots only when asked
        self.committed = 0
        self.counters = dict.fromkeys(("app_errors", "state_restored", "state_refused", "commit_failures",
                                       "records_unsent", "records_lost"), 0)
        self.unsent_path = Path(f"{cfg.outbox.path}.unsent.jsonl")
        self.heartbeat = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._driver_threads: list[DriverThread] = []
        self._core_thread: threading.Thread | None = None
        self._sync_thread: threading.Thread | None = None
        self._sync_stop = threading.Event()
        self._keep_app = False
        self._held: list[RecordIn] = []  # records the outbox refused, retried at _retry_at
        self._held_failures = 0
        self._retry = Backoff(0.1, 5.0)
        self._retry_at = 0.0
        self._state_sent: bytes | None = None
        self._state_due = 0.0
        self._errors: list[RecordIn] = []  # app_error records for the core to commit
        self._watch_due = 0.0
        self._file_problem: str | None = None
        self._dead_seen: dict[str, int] | None = None  # dead letters counted so far, per reason
        self._errors_unreported = 0
        self._next_error_report = 0.0
        self._by_type: dict[str, int] = {}  # records made since the last summary line, per type
        self._summary_due = time.monotonic() + SUMMARY_S

    def start(self, *, restore: bool = True, state: bytes | None = None,
              after: Sequence[DriverThread] = ()) -> None:
        """Start every thread. `restore`: resume the app from `state`, or by default from the state last
        committed to the outbox. `after`: a previous unit's driver threads still running; a driver on the
        same port opens it only once they ended."""
        if restore:
            self._restore(state if state is not None else self.outbox.load_state(STATE_KEY))
        self._driver_threads = [DriverThread(d, self.queue, self.stop_event,
                                             [t for t in after if port_of(t.driver) == port_of(d)],
                                             on_change=self.sync.health_soon)
                                for d in self.drivers.values()]
        self._core_thread = threading.Thread(target=self._core, name="core", daemon=True)
        self._sync_thread = threading.Thread(target=self.sync.run, args=(self._sync_stop,), name="sync", daemon=True)
        self._threads = [*self._driver_threads, self._core_thread, self._sync_thread]
        for t in self._threads:
            t.start()
        log.info("unit started", extra={"device_id": self.cfg.device_id, "type": self.cfg.type,
                                        "drivers": ",".join(self.drivers)})

    def stop(self, timeout: float = 4.0, *, keep_app: bool = False, close_outbox: bool = True) -> list[DriverThread]:
        """Stop the unit. `keep_app`: the app lives on in the next unit (not closed, no interim records).
        Returns the driver threads still inside a read past the bound: they still hold their ports."""
        start = time.monotonic()
        deadline = start + timeout
        self._keep_app = keep_app
        self.stop_event.set()
        self.inspector.stop()
        for t in self._driver_threads:  # at their next read timeout; half the time at most
            t.join(max(0.0, start + timeout / 2 - time.monotonic()))
        if self._core_thread is not None:  # it drains the queue, closes the app, commits
            self._core_thread.join(max(0.1, deadline - time.monotonic() - 1.0))
        self._sync_stop.set()
        if self._sync_thread is not None:
            self._sync_thread.join(max(0.1, deadline - time.monotonic()))
        stuck = [t for t in self._driver_threads if t.is_alive()]
        for t in stuck:
            log.warning("driver still busy after stop: its port opens to the next unit only once it returns",
                        extra={"driver": t.driver.role, "port": port_of(t.driver)})
        busy = [t.name for t in self._threads if t.is_alive() and not t.name.startswith("driver-")]
        if busy:  # closing under them would fail their last commit: leave the file to process exit
            log.warning("unit stopped with threads still running", extra={"threads": ",".join(busy)})
        elif close_outbox:
            self.outbox.close()
        log.info("unit stopped", extra={"device_id": self.cfg.device_id})
        return stuck

    def join_core(self, timeout: float) -> bool:
        """Wait for the core thread to end; True once it has (or never started)."""
        if self._core_thread is not None:
            self._core_thread.join(timeout)
        return self._core_thread is None or not self._core_thread.is_alive()

    # -- core -----------------------------------------------------------------------------------
    def _core(self) -> None:
        oc = self.cfg.outbox
        window = oc.commit_interval_ms / 1000
        pending: list[RecordIn] = []
        first_at = 0.0
        next_tick = time.monotonic() + TICK_S
        app = self.app
        answering: list[_AppCommand] = []  # answered once their records are committed
        while True:
            stopping = self.stop_event.is_set()
            now = time.monotonic()
            wait = next_tick - now
            if pending:
                wait = min(wait, first_at + window - now)
            if self._held:
                wait = min(wait, self._retry_at - now)
            try:
                item = self.queue.get(timeout=max(0.0, wait)) if not stopping else self.queue.get_nowait()
            except queue.Empty:
                item = None
            out: list[RecordIn] = []
            if isinstance(item, Reading):
                if self.inspector.active and is_image(item):
                    self.inspector.offer(item.source, item)
                out = self._call(app.feed, item)
            elif isinstance(item, _Fault):
                out = self._call(app.on_fault, item.role, item.error)
            elif isinstance(item, _Recovered):
                out = self._call(app.on_recovered, item.role, item.down_s)
            elif isinstance(item, _AppCommand):
                out = item.run(app)
                answering.append(item)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                self.heartbeat = now
                out = out + self._call(app.tick, now)
            if now >= self._watch_due:
                self._watch_due = now + WATCH_S
                out = out + self._watch_outbox()
            final = stopping and item is None
            if final and not self._keep_app:
                out = out + self._call(app.close)
            self._send_outputs()
            if self._errors:
                out = out + self._errors
                self._errors = []
            if now >= self._summary_due:
                self._summary_due = now + SUMMARY_S
                self._log_summary()
            if out:
                self._log_records(out)
                if not pending:
                    first_at = now
                pending.extend(out)
            if final:
                self._final_commit(pending)
                for c in answering:
                    c.finish(stored=True)
                return
            due = bool(pending) and (self.queue.empty() or len(pending) >= oc.commit_max_records
                                     or now - first_at >= window or bool(answering))
            if due and self._held and now < self._retry_at:  # the outbox is failing: join the held ones
                self._held += pending
                pending = []
            elif due or (self._held and now >= self._retry_at) \
                    or (not pending and now >= self._state_due and self.queue.empty()):  # state, never ahead
                self._commit(pending)
                pending = []
            for c in answering:
                c.finish(stored=not pending and not self._held)
            answering = []

    def _command(self, cmd: Command) -> dict[str, Any] | None:
        """The sync's hook for commands it does not answer itself: the runtime's own (config_get,
        config_push, through `commands`), else the app's."""
        if cmd.cmd == "inspect":
            return self.inspector.start(cmd.args, self.image_roles())
        if cmd.cmd in ("config_get", "config_push") or cmd.cmd.startswith("model_"):
            if self.commands is None:
                raise ValueError(f"{cmd.cmd}: this unit was not started by `customs-edge run`")
            return self.commands(cmd)
        return self.app_command(cmd)

    def image_roles(self) -> list[str]:
        """Roles whose drivers produce images or thermal frames: what remote inspection can show."""
        return [role for role, d in self.drivers.items()
                if any(issubclass(t, (ThermalFrame, Image)) for t in getattr(d, "PRODUCES", ()))]

    def _publish_snapshot(self, jpeg: bytes) -> None:
        self.sync.link.publish(topic(self.cfg.sync.topic_prefix, self.cfg.device_id, "snapshot"), jpeg, qos=0)

    def app_command(self, cmd: Command) -> dict[str, Any]:
        """Run an operator's command in the app (on the core thread); the sync thread's reply. Its records
        are committed before the reply (`stored`), so an acknowledged confirmation is never lost."""
        item = _AppCommand(cmd.cmd, cmd.args)
        self.queue.put(item, timeout=5.0)
        if not item.done.wait(10.0):
            raise TimeoutError("the unit's app did not take the command within 10 s")
        if item.error is not None:
            raise item.error
        return item.result

    def _send_outputs(self) -> None:
        """Hand the app's output commands to their roles' drivers, which write them from their own threads."""
        try:
            commands = self.app.take_outputs()
        except Exception as exc:
            self._app_error("take_outputs", exc)
            return
        for role, command in commands:
            driver = self.drivers.get(role)
            try:
                if not isinstance(driver, Output):
                    raise ValueError(f"drivers.{role}: no output driver in that role (it has "
                                     f"{type(driver).__name__ if driver else 'no driver'})")
                driver.submit(command)
            except Exception as exc:
                self._app_error(f"output:{role}", exc)

    def _watch_outbox(self) -> list[RecordIn]:
        """ALERT records for what the outbox says went wrong: its file deleted or replaced under the unit
        (what it holds is still sent through the open file, but is gone at the next start), and records set
        aside as dead letters since the last look (the ones counted before this start were reported then)."""
        try:
            problem = self.outbox.check_file()
            dead = dict(self.outbox.stats().dead_letters)
        except Exception as exc:  # the outbox's own failures are handled where it is written
            log.warning("outbox check failed", extra={"error": repr(exc)})
            return []
        out: list[RecordIn] = []
        if problem and problem != self._file_problem:
            log.error("outbox file problem", extra={"problem": problem, "path": self.cfg.outbox.path})
            out.append(RecordIn(type="outbox_alert", priority=Priority.ALERT,
                                payload={"problem": problem, "path": str(self.cfg.outbox.path)}))
        self._file_problem = problem
        seen, self._dead_seen = self._dead_seen, dead
        new = {k: n - (seen or {}).get(k, 0) for k, n in dead.items() if n > (seen or {}).get(k, 0)}
        if seen is not None and new:
            log.warning("records set aside as dead letters", extra={"new": new})
            out.append(RecordIn(type="dead_letters", priority=Priority.ALERT, payload={"new": new, "total": dead}))
        return out

    def _log_records(self, records: list[RecordIn]) -> None:
        """Alerts at WARNING, every other record at DEBUG; all counted for the summary line."""
        by_type = self._by_type
        for kind, n in Counter(map(_type_of, records)).items():  # counted without a Python step per record
            by_type[kind] = by_type.get(kind, 0) + n
        debug = log.isEnabledFor(logging.DEBUG)
        if not debug and max(map(_priority_of, records)) < Priority.ALERT:
            return
        for r in records:
            if r.priority >= Priority.ALERT:
                log.warning("alert", extra={"type": r.type, "payload": _short(r.payload)})
            elif debug:
                log.debug("record", extra={"type": r.type, "priority": int(r.priority), "payload": _short(r.payload)})

    def _log_summary(self) -> None:
        """One INFO line: records by type since the last one, backlog, link state, drivers up and down."""
        try:
            backlog: int | str = self.outbox.stats().pending
        except Exception as exc:
            backlog = f"unknown ({type(exc).__name__})"
        states = self.driver_states()
        by_type, self._by_type = self._by_type, {}
        log.info("summary", extra={
            "device_id": self.cfg.device_id, "records": sum(by_type.values()),
            "by_type": ",".join(f"{k}:{n}" for k, n in sorted(by_type.items())) or "-",
            "backlog": backlog, "held": len(self._held), "link": "up" if self.sync.link.connected else "down",
            "drivers_up": ",".join(r for r, s in states.items() if s["up"]) or "-",
            "drivers_down": ",".join(r for r, s in states.items() if not s["up"]) or "-"})

    def _call(self, fn: Callable[..., list[RecordIn]], *args: Any) -> list[RecordIn]:
        """Run one app method; an exception (an invalid record included) is counted and reported, and
        the input skipped."""
        try:
            return fn(*args)
        except Exception as exc:
            first = args[0] if args else None
            where = getattr(fn, "__name__", "app") + (
                f":{first.source}/{first.KIND}" if isinstance(first, Reading)
                else f":{first}" if isinstance(first, str) else "")
            self._app_error(where, exc)
            return []

    def _app_error(self, where: str, exc: Exception) -> None:
        self.counters["app_errors"] += 1
        self._errors_unreported += 1
        now = time.monotonic()
        if now < self._next_error_report:
            return
        self._next_error_report = now + self.APP_ERROR_INTERVAL_S
        n, self._errors_unreported = self._errors_unreported, 0
        error = f"{type(exc).__name__}: {exc}"[:1000]
        log.error("app failed on an input; input skipped (one such line a minute at most)", exc_info=exc,
                  extra={"where": where, "errors": n, "errors_total": self.counters["app_errors"]})
        self._errors.append(RecordIn(type="app_error", priority=Priority.REPORT, payload={
            "where": where, "error": error, "errors": n, "errors_total": self.counters["app_errors"]}))

    # -- state ----------------------------------------------------------------------------------
    def _restore(self, blob: bytes | None) -> None:
        if blob is None:
            return
        try:
            self.app.restore(blob)
        except Exception as exc:
            self.counters["state_refused"] += 1
            log.warning("saved app state ignored; the app starts fresh",
                        extra={"app": self.cfg.type, "error": f"{type(exc).__name__}: {exc}"[:500]})
            return
        self.counters["state_restored"] += 1
        log.info("app state restored", extra={"app": self.cfg.type, "bytes": len(blob)})

    def _snapshot(self) -> bytes | None:
        """The app's snapshot if it changed since the last one committed, else None."""
        self._state_due = time.monotonic() + self.STATE_INTERVAL_S
        try:
            blob = self.app.snapshot()
        except Exception as exc:
            self._app_error("snapshot", exc)
            return None
        return None if blob == self._state_sent else blob

    # -- commit ---------------------------------------------------------------------------------
    def _put(self, records: list[RecordIn], state: bytes | None) -> bool:
        if not records and state is None:
            return True
        try:
            self.outbox.put(records, state=(STATE_KEY, state) if state is not None else None)
        except Exception as exc:  # disk full, I/O error, a record the outbox cannot take
            self.counters["commit_failures"] += 1
            log.warning("outbox commit failed; records held in memory for a retry",
                        extra={"records": len(records), "error": f"{type(exc).__name__}: {exc}"[:500]})
            return False
        if state is not None:
            self._state_sent = state
        if records:
            self.committed += len(records)
            self.sync.wake.set()
        return True

    def _commit(self, records: list[RecordIn]) -> None:
        """Commit held and new records with the app's state in one transaction. On failure they are held
        and retried with backoff while the core keeps running; from the ISOLATE_AFTER-th failure on, a
        bisection commits what can be committed and sets aside a record that fails alone."""
        batch = self._held + records
        if self._put(batch, self._snapshot()):
            self._held, self._held_failures = [], 0
            self._retry.reset()
            return
        self._held_failures += 1
        if self._held_failures >= self.ISOLATE_AFTER:
            batch = self._isolate(batch)
        if len(batch) > self.MAX_HELD:
            self._set_aside(batch[:-self.MAX_HELD], "outbox refused commits; more records held than MAX_HELD")
            batch = batch[-self.MAX_HELD:]
        self._held = batch
        self._retry_at = time.monotonic() + self._retry.next()

    def _isolate(self, batch: list[RecordIn]) -> list[RecordIn]:
        """Commit `batch` by halves (at most ISOLATE_PUTS commits); returns what is still uncommitted.
        A record that fails alone while others commit cannot be stored: it is set aside, never retried
        forever. If nothing commits, the outbox itself is failing: everything is kept."""
        alone: list[RecordIn] = []
        rest: list[RecordIn] = []
        puts = [0]
        committed = False

        def split(chunk: list[RecordIn]) -> None:
            nonlocal committed
            if len(chunk) == 1:
                alone.extend(chunk)
                return
            half = len(chunk) // 2
            for part in (chunk[:half], chunk[half:]):
                if puts[0] >= self.ISOLATE_PUTS:
                    rest.extend(part)
                    continue
                puts[0] += 1
                if self._put(part, None):
                    committed = True
                else:
                    split(part)

        split(batch)
        if committed and alone:
            self._set_aside(alone, "the outbox refuses this record while it commits its neighbours")
            return rest
        return alone + rest

    def _final_commit(self, records: list[RecordIn]) -> None:
        """At stop: a bounded number of attempts, then what still cannot be committed goes to the
        fallback file, never silently away."""
        batch = self._held + records
        self._held = []
        for attempt in range(self.FINAL_ATTEMPTS):
            if attempt:
                time.sleep(0.1 * attempt)
            if self._put(batch, self._snapshot()):
                return
        left = self._isolate(batch)
        if left:
            self._set_aside(left, "outbox commit failed at stop")

    def _set_aside(self, records: list[RecordIn], why: str) -> None:
        """Append records to `<outbox>.unsent.jsonl` (one JSON object per line), logged at error level."""
        extra = {"records": len(records), "file": str(self.unsent_path), "reason": why}
        try:
            with self.unsent_path.open("a", encoding="utf-8") as f:
                for r in records:
                    f.write(dumps({"device_id": self.cfg.device_id, "type": r.type, "priority": int(r.priority),
                                   "ts": r.ts, "payload": r.payload, "reason": why}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self.counters["records_lost"] += len(records)
            log.error("records LOST: the outbox refused them and the fallback file cannot be written",
                      extra={**extra, "error": str(exc)})
            return
        self.counters["records_unsent"] += len(records)
        log.error("records not committed to the outbox; written to the fallback file", extra=extra)

    # -- status ---------------------------------------------------------------------------------
    def driver_states(self) -> dict[str, dict[str, Any]]:
        return {t.driver.role: {**t.driver.stats.as_dict(), "up": t.down_since is None and t.readings > 0,
                                "waiting_for_port": t.waiting_for_port} for t in self._driver_threads}

    def drivers_not_up(self) -> dict[str, str]:
        """Roles that have not delivered a reading since their last fault (or at all), with that fault."""
        return {t.driver.role: t.last_error for t in self._driver_threads
                if t.readings == 0 or t.down_since is not None}

    def status_extra(self) -> dict[str, Any]:
        return {"type": self.cfg.type, "site": self.cfg.site, "drivers": self.driver_states(),
                "committed_since_start": self.committed, "records_held": len(self._held), "app": dict(self.counters)}

    def health(self) -> bool:
        return time.monotonic() - self.heartbeat < 10 and all(t.is_alive() for t in self._threads)


def replace_unit(old: Unit, cfg: UnitConfig, *, drivers: dict[str, Driver] | None = None,
                 errors: list[str] | None = None, new_app: bool = False) -> Unit:
    """A reload: stop `old`, start a unit for `cfg`; returns the unit now running (`old`, restarted if it
    had to be stopped, when the new config cannot start).

    An unchanged app (type, device_id and `app:` section) is handed over live: not closed, no snapshot
    round trip. A changed one is closed and the new app resumes from its final snapshot if compatible.
    An unchanged outbox is handed over too; another file is opened before `old` stops. The new drivers
    wait for old driver threads still holding their ports. Why the new config could not start is appended
    to `errors` when given. `new_app`: the app is rebuilt even if its section is unchanged (a model update)."""
    keep_app = not new_app and (cfg.type, cfg.device_id, cfg.app) == (old.cfg.type, old.cfg.device_id, old.cfg.app)
    keep_outbox = _same_outbox_file(cfg, old.cfg) and cfg.outbox.model_dump(
        include={"synchronous", "max_mb", "max_age_days"}) == old.cfg.outbox.model_dump(
        include={"synchronous", "max_mb", "max_age_days"})
    try:  # everything that may fail while `old` still runs
        app = old.app if keep_app else make_app(cfg)
        outbox: Outbox | None = old.outbox if keep_outbox else None
        if outbox is None and not _same_outbox_file(cfg, old.cfg):
            outbox = open_outbox(cfg)
        new = Unit(cfg, outbox=outbox, app=app, drivers=drivers, commands=old.commands) \
            if outbox is not None else None
    except Exception as exc:
        log.error("config reload refused: the new config cannot start; the running config stays",
                  extra={"error": repr(exc)})
        if errors is not None:
            errors.append(f"{type(exc).__name__}: {exc}")
        return old
    stuck = old.stop(keep_app=keep_app, close_outbox=not keep_outbox)
    while not old.join_core(5.0):  # the app may move to the new unit only once the old core let go of it
        log.error("reload waits for the old unit's core thread to finish its last commit")
    state = None if keep_app else _final_snapshot(old.app)
    if new is None:  # the same file with other settings: it can only be reopened after the stop
        try:
            new = Unit(cfg, app=app, drivers=drivers, commands=old.commands)
        except Exception as exc:
            log.error("config reload refused: the new config cannot start; the running config is restarted",
                      extra={"error": repr(exc)})
            if errors is not None:
                errors.append(f"{type(exc).__name__}: {exc}")
            new, keep_app, cfg = Unit(old.cfg, app=old.app, commands=old.commands), True, old.cfg
    new.sync.adopt(old.sync)
    new.start(restore=not keep_app, state=state, after=stuck)
    log.info("config reloaded", extra={"device_id": cfg.device_id, "app_kept": keep_app})
    return new


def _final_snapshot(app: App) -> bytes | None:
    try:
        return app.snapshot()
    except Exception as exc:
        log.error("app snapshot failed; the new app resumes from the last committed state",
                  extra={"error": f"{type(exc).__name__}: {exc}"[:500]})
        return None


GC_YOUNG = 10_000  # tune_gc()'s young generation (CPython's default: 700)


def tune_gc() -> None:
    """The cyclic collector for the agent process, called once at start (cli `run`):
      - collect, then freeze what is alive (modules, pydantic schemas, the config): under load the records'
        churn started a full collection every few seconds, each walking every startup object (~60 ms);
      - a young generation of GC_YOUNG objects instead of 700: a record's objects (RecordIn, payload, rows) die
        by reference count within a commit, so few collections find anything of theirs to walk.
    Together ~2-3 µs of agent CPU per record in bench/pipeline.py (its collections went from ~2.5 s to ~0.1 s)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def run_forever(cfg: UnitConfig, config_path: str | None, stop: threading.Event,
                reload: threading.Event | None = None) -> None:
    """Run a unit until `stop`; on `reload`, re-read config_path: a bad file is refused and the old
    config keeps running; a good one replaces the running unit (replace_unit). Configs pushed over MQTT
    (agent/remote_config.py) and model installs (agent/model_update.py) are applied here too, one at a time,
    between reloads."""
    from customs_edge.agent.config import load_unit_config
    from customs_edge.agent.model_update import ModelUpdates
    from customs_edge.agent.remote_config import RemoteConfig
    from customs_edge.core.errors import ConfigError

    remote = RemoteConfig(Path(config_path) if config_path else None)
    if remote.recover():  # a power cut during a push's probation: the last-known-good file is back
        cfg = load_unit_config(config_path or "")
    models = ModelUpdates(lambda: unit.cfg, remote.pushes)  # installs queued with the config pushes
    unit = Unit(cfg, commands=lambda c: (models.command if c.cmd.startswith("model_") else remote.command)(c))
    unit.start()
    sdnotify.notify("READY=1")
    try:
        while not stop.is_set():
            push = remote.next_push(1.0)
            if stop.is_set():
                break
            if unit.health():
                sdnotify.notify("WATCHDOG=1")
            if push is not None:
                unit = (models.apply if push.cmd.startswith("model_") else remote.apply)(unit, push, stop)
            if reload is not None and reload.is_set():
                reload.clear()
                try:
                    new = load_unit_config(config_path or "")
                except ConfigError as exc:
                    log.error("config reload refused; the running config stays",
                              extra={"problems": " | ".join(exc.problems), "file": exc.source})
                    continue
                sdnotify.notify("RELOADING=1")
                unit = replace_unit(unit, new)
                if unit.cfg is new:
                    remote.reloaded()
                sdnotify.notify("READY=1")
    finally:
        sdnotify.notify("STOPPING=1")
        unit.stop()
