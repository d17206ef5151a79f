"""Wiring: drivers -> app -> outbox -> sync. Threads, each with one job:

  driver-<role>  open the port, read() in a loop, put Readings on the queue; on DriverFault put the
                 fault, close, reopen with backoff (the rest of the unit keeps running);
  core           take Readings, run the app, group-commit its records to the outbox (commit when
                 `commit_max_records` are pending or the oldest has waited `commit_interval_ms`);
  sync           the MQTT loop (agent/sync.py).
stop() returns within a few seconds: drivers stop at their next read timeout, the core flushes the
app and commits, the sync publishes "offline" and disconnects.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from customs_edge.agent import registry, sdnotify
from customs_edge.agent.apps.base import App
from customs_edge.agent.config import UnitConfig
from customs_edge.agent.outbox import Outbox, SqliteOutbox
from customs_edge.agent.sync import Sync
from customs_edge.core.errors import DriverFault
from customs_edge.core.mqtt import Backoff
from customs_edge.core.readings import Reading
from customs_edge.core.records import RecordIn
from customs_edge.drivers.base import Driver

log = logging.getLogger(__name__)

TICK_S = 0.1


class _Fault:
    __slots__ = ("error", "role")

    def __init__(self, role: str, error: DriverFault) -> None:
        self.role, self.error = role, error


class _Recovered:
    __slots__ = ("down_s", "role")

    def __init__(self, role: str, down_s: float) -> None:
        self.role, self.down_s = role, down_s


class DriverThread(threading.Thread):
    def __init__(self, driver: Driver, out: queue.Queue[Any], stop: threading.Event) -> None:
        super().__init__(name=f"driver-{driver.role}", daemon=True)
        self.driver, self.out, self.stop_event = driver, out, stop
        self.backoff = Backoff(0.5, 30.0)
        self.down_since: float | None = None
        self.readings = 0

    def run(self) -> None:
        d = self.driver
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
                        self.readings += 1
                        self.out.put(reading)
            except DriverFault as exc:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    self.out.put(_Fault(d.role, exc))
                    log.warning("driver fault", extra={"driver": d.role, "error": str(exc)})
                self._close()
                self.stop_event.wait(self.backoff.next())
            except Exception:
                log.exception("driver crashed; restarting it", extra={"driver": d.role})
                self._close()
                self.stop_event.wait(self.backoff.next())
        self._close()

    def _close(self) -> None:
        try:
            self.driver.close()
        except Exception:
            log.exception("driver close failed", extra={"driver": self.driver.role})


class Unit:
    """One configured unit. `start()`, then `stop()`; `drivers`, `app`, `outbox`, `sync` are public
    so tests, the status command and the demo can look inside."""

    def __init__(self, cfg: UnitConfig, *, outbox: Outbox | None = None, app: App | None = None,
                 drivers: dict[str, Driver] | None = None) -> None:
        self.cfg = cfg
        self.outbox: Outbox = outbox or SqliteOutbox(
            cfg.outbox.path, synchronous=cfg.outbox.synchronous, max_mb=cfg.outbox.max_mb,
            max_age_days=cfg.outbox.max_age_days)
        if app is None:
            app = registry.lookup("app", cfg.type)(cfg.device_id, cfg.app)
        self.app: App = app
        if drivers is None:
            drivers = {role: registry.lookup("driver", dc.driver)(role, dc) for role, dc in cfg.drivers.items()}
        self.drivers = drivers
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self.stop_event = threading.Event()
        self.sync = Sync(cfg.device_id, self.outbox, cfg.sync, outbox_path=cfg.outbox.path, status=self.status_extra)
        self.committed = 0
        self.heartbeat = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._driver_threads: list[DriverThread] = []
        self._sync_stop = threading.Event()

    def start(self) -> None:
        self._driver_threads = [DriverThread(d, self.queue, self.stop_event) for d in self.drivers.values()]
        core = threading.Thread(target=self._core, name="core", daemon=True)
        sync = threading.Thread(target=self.sync.run, args=(self._sync_stop,), name="sync", daemon=True)
        self._threads = [*self._driver_threads, core, sync]
        for t in self._threads:
            t.start()
        log.info("unit started", extra={"device_id": self.cfg.device_id, "type": self.cfg.type,
                                        "drivers": ",".join(self.drivers)})

    def stop(self, timeout: float = 4.0) -> None:
        deadline = time.monotonic() + timeout
        self.stop_event.set()
        for t in self._threads:
            if t.name != "sync":
                t.join(max(0.1, deadline - time.monotonic() - 1.0))
        self._sync_stop.set()
        for t in self._threads:
            if t.name == "sync":
                t.join(max(0.1, deadline - time.monotonic()))
        busy = [t.name for t in self._threads if t.is_alive() and not t.name.startswith("driver-")]
        if busy:  # closing under them would fail their last commit: leave the file to process exit
            log.warning("unit stopped with threads still running", extra={"threads": ",".join(busy)})
        else:
            self.outbox.close()
        log.info("unit stopped", extra={"device_id": self.cfg.device_id})

    # -- core -----------------------------------------------------------------------------------
    def _core(self) -> None:
        oc = self.cfg.outbox
        window = oc.commit_interval_ms / 1000
        pending: list[RecordIn] = []
        first_at = 0.0
        next_tick = time.monotonic() + TICK_S
        app = self.app
        while True:
            stopping = self.stop_event.is_set()
            now = time.monotonic()
            wait = next_tick - now
            if pending:
                wait = min(wait, first_at + window - now)
            try:
                item = self.queue.get(timeout=max(0.0, wait)) if not stopping else self.queue.get_nowait()
            except queue.Empty:
                item = None
            out: list[RecordIn] = []
            try:
                if isinstance(item, Reading):
                    out = app.feed(item)
                elif isinstance(item, _Fault):
                    out = app.on_fault(item.role, item.error)
                elif isinstance(item, _Recovered):
                    out = app.on_recovered(item.role, item.down_s)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK_S
                    self.heartbeat = now
                    out = out + app.tick(now)
                if stopping and item is None:
                    out = out + app.close()
            except Exception:
                log.exception("app failed on an input; input skipped", extra={"item": type(item).__name__})
            if out:
                if not pending:
                    first_at = time.monotonic()
                pending.extend(out)
            if pending and (len(pending) >= oc.commit_max_records or time.monotonic() - first_at >= window
                            or (stopping and item is None)):
                self._commit(pending)
                pending = []
            if stopping and item is None:
                return

    def _commit(self, records: list[RecordIn]) -> None:
        while True:
            try:
                self.outbox.put(records)
                break
            except Exception:  # disk full, I/O error: keep the records in memory and retry
                log.exception("outbox commit failed; retrying", extra={"records": len(records)})
                if self.stop_event.wait(1.0):
                    return
        self.committed += len(records)
        self.sync.wake.set()

    # -- status ---------------------------------------------------------------------------------
    def status_extra(self) -> dict[str, Any]:
        drivers = {}
        for t in self._driver_threads:
            drivers[t.driver.role] = {**t.driver.stats.as_dict(), "up": t.down_since is None and t.readings > 0}
        return {"type": self.cfg.type, "drivers": drivers, "committed_since_start": self.committed}

    def health(self) -> bool:
        return time.monotonic() - self.heartbeat < 10 and all(t.is_alive() for t in self._threads)


def run_forever(cfg: UnitConfig, config_path: str | None, stop: threading.Event,
                reload: threading.Event | None = None) -> None:
    """Run a unit until `stop`; on `reload`, re-read config_path: a bad file is refused and the old
    config keeps running; a good one replaces the running unit."""
    from customs_edge.agent.config import load_unit_config
    from customs_edge.core.errors import ConfigError

    unit = Unit(cfg)
    unit.start()
    sdnotify.notify("READY=1")
    try:
        while not stop.wait(1.0):
            if unit.health():
                sdnotify.notify("WATCHDOG=1")
            if reload is not None and reload.is_set():
                reload.clear()
                try:
                    new = load_unit_config(config_path or "")
                except ConfigError as exc:
                    log.error("config reload refused; the running config stays",
                              extra={"problems": " | ".join(exc.problems), "file": exc.source})
                    continue
                sdnotify.notify("RELOADING=1")
                try:
                    replacement = Unit(new)  # opens the outbox, loads the app's models: may fail
                except Exception as exc:
                    log.error("config reload refused: the new config cannot start; the running config stays",
                              extra={"file": config_path, "error": repr(exc)})
                    sdnotify.notify("READY=1")
                    continue
                unit.stop()
                unit = replacement
                unit.start()
                sdnotify.notify("READY=1")
                log.info("config reloaded", extra={"file": config_path})
    finally:
        sdnotify.notify("STOPPING=1")
        unit.stop()
