"""Shared fixtures: a real mosquitto on a free loopback port, unit configs, a TCP relay for link drills."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from customs_edge.hub.brokers import Mosquitto, mosquitto_path


def need_mosquitto() -> None:
    if mosquitto_path() is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is not installed and CI is set: broker tests must run (apt-get install mosquitto)")
        pytest.skip("mosquitto is not installed")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    need_mosquitto()
    mq = Mosquitto(tmp_path / "broker", persistence=True)
    mq.start()
    try:
        yield mq
    finally:
        mq.stop()


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `cond` until truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def unit_dict(tmp_path: Path, port: str, broker_port: int, **over: Any) -> dict[str, Any]:
    """A scale unit that produces ~20 records/s (summary every 50 ms) for the sync drills."""
    cfg: dict[str, Any] = {
        "device_id": over.pop("device_id", "scale-t1"), "type": "scale",
        "drivers": {"scale": {"driver": "toledo-continuous", "port": port, "silent_after_s": 3}},
        "app": {"summary_interval_s": 0.05},
        "outbox": {"path": str(tmp_path / "agent" / "outbox.db")},
        "sync": {"port": broker_port, "ack_timeout_s": 4, "keepalive_s": 4, "connect_timeout_s": 2,
                 "backoff_min_s": 0.2, "backoff_max_s": 2},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


class Relay:
    """A loopback TCP relay to a target port. `blackhole()` stops forwarding in both directions
    without closing anything (a half-open link: TCP up, nothing gets through); `heal()` resumes."""

    def __init__(self, target_port: int) -> None:
        import socket

        self.target = target_port
        self.lst = socket.socket()
        self.lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(16)
        self.lst.settimeout(0.2)
        self.port = self.lst.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)

    def blackhole(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        import socket

        while not self.stop_event.is_set():
            try:
                client, _ = self.lst.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                t.start()
                self.threads.append(t)

    def _pipe(self, src: Any, dst: Any) -> None:
        import select

        try:
            while not self.stop_event.is_set():
                if not self.flowing.is_set():
                    self.flowing.wait(0.2)  # do not read: bytes pile up in kernel buffers
                    continue
                r, _, _ = select.select([src], [], [], 0.2)
                if not r:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                while not self.flowing.is_set() and not self.stop_event.is_set():
                    self.flowing.wait(0.2)
                dst.sendall(data)
        except (OSError, ValueError):  # the other direction closed both sockets
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.stop_event.set()
        self.lst.close()


def analysis_reading(counts: Any, *, seq: int, tonnes: float, status: str = "OK", mono: float | None = None,
                     **assay: float) -> Any:
    """An elemental analyser's Analysis reading as the driver makes it, from the fields a test cares about."""
    from customs_edge.core.readings import Analysis, Assay, Spectrum

    extra = {} if mono is None else {"mono": mono}
    return Analysis(source="analyser", seq=seq, status=status, analysed_at=time.time(), interval_s=60.0,
                    tonnes=tonnes, assay=Assay(**assay), spectrum=Spectrum(counts, 60.0, 3.0), **extra)


def script_driver(role: str, steps: list[Any]) -> Any:
    """A Driver that yields each of `steps` (typed readings) in turn, stamped with the monotonic time it
    is read, then nothing; `.done` is set once every step was read. In place of an instrument when a test
    needs exact inputs through the production runtime."""
    from dataclasses import replace

    from customs_edge.core.readings import Reading
    from customs_edge.drivers.base import Driver, DriverConfig

    class Script(Driver):
        Config = DriverConfig

        def __init__(self) -> None:
            super().__init__(role, DriverConfig(driver="script"))
            self.steps = list(steps)
            self.done = threading.Event()

        def open(self) -> None:
            pass

        def close(self) -> None:
            pass

        def read(self) -> Reading | None:
            if self.steps:
                step: Reading = self.steps.pop(0)
                return replace(step, mono=time.monotonic())
            self.done.set()
            time.sleep(0.02)
            return None

    return Script()


@pytest.fixture
def mosquitto_with_password(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto that admits only user 'unit' with password 'right' (anonymous clients refused)."""
    import shutil
    import subprocess

    need_mosquitto()
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto_passwd is not installed and CI is set (it comes with apt-get install mosquitto)")
        pytest.skip("mosquitto_passwd is not installed")
    mq = Mosquitto(tmp_path / "broker-pw", persistence=False)
    pw = mq.workdir / "passwords"
    subprocess.run([passwd, "-b", "-c", str(pw), "unit", "right"], check=True, capture_output=True)
    # (Mosquitto keeps `user root` when run as root, so it can read a file under pytest's 0700 tmp_path)
    conf = mq.conf.read_text().replace("allow_anonymous true", f"allow_anonymous false\npassword_file {pw}")
    mq.conf.write_text(conf)
    mq.start()
    try:
        yield mq
    finally:
        mq.stop()


def need_postgres() -> None:
    from tests.pg import pg_bin

    missing = "PostgreSQL is not installed" if pg_bin() is None else None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing = "psycopg is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} and CI is set: PostgreSQL tests must run (apt-get install postgresql)")
        pytest.skip(missing)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """One throwaway PostgreSQL cluster for the session (tests/pg.py); each test takes a new database."""
    need_postgres()
    from tests.pg import PgCluster

    cluster = PgCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: Any) -> str:
    """The URL of a new, empty database in the session's cluster."""
    return str(pg_cluster.new_database())


@pytest.fixture
def sync_clock(monkeypatch: pytest.MonkeyPatch) -> Any:
    """agent/sync.py's clock driven by the test (tests/fakes.py SyncClock)."""
    from types import SimpleNamespace

    from customs_edge.agent import sync as sync_mod
    from tests.fakes import SyncClock

    c = SyncClock()
    monkeypatch.setattr(sync_mod, "time", SimpleNamespace(monotonic=c, time=time.time))
    return c
