"""Serving a simulated device on a pty and on socket://127.0.0.1:N, with fault injection.

A DeviceSim implements `serve(conn, stop)`: it runs in its own thread per connection, writing what the
device would send and reading what it is asked (request/response devices). Endpoints exposes one
DeviceSim on a pty (a serial port for the driver: /dev/pts/N, optionally a stable symlink) and/or a
loopback TCP port (pyserial's socket:// URL). Faults is the control API tests and flags use.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pty
import random
import select
import signal
import socket
import sys
import threading
import time
import tty
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


class Conn(ABC):
    """One client link. write() never blocks for long: a device does not wait for its listener."""

    closed = False

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def read(self, timeout: float) -> bytes:
        """Bytes available within `timeout` (b'' if none)."""

    def close(self) -> None:
        self.closed = True


class PtyConn(Conn):
    def __init__(self, master: int) -> None:
        self.fd = master

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 0.5
        while view and time.monotonic() < deadline:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
            except BlockingIOError:
                time.sleep(0.002)  # reader slower than us: like a UART, wait a little, then drop
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EBADF):
                    return
                raise

    def read(self, timeout: float) -> bytes:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return b""
        try:
            return os.read(self.fd, 4096)
        except OSError:
            return b""


class SocketConn(Conn):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(2.0)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def read(self, timeout: float) -> bytes:
        if self.closed:
            time.sleep(timeout)
            return b""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return b""
        try:
            data = self.sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.closed = True
        return data

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Faults:
    """Fault injection shared by a simulator's connections. Thread-safe enough for flags set by a test.

    corrupt_rate: probability that a frame is damaged (a flipped byte, or a truncation)
    corrupt_next(n): damage the next n frames for sure
    pause(s): the device goes silent for s seconds (the port stays open)
    """

    def __init__(self, corrupt_rate: float = 0.0, seed: int | None = None) -> None:
        self.corrupt_rate = corrupt_rate
        self.rng = random.Random(seed)
        self._corrupt_next = 0
        self._pause_until = 0.0
        self.corrupted = 0  # frames damaged so far
        self._lock = threading.Lock()

    def corrupt_next(self, n: int = 1) -> None:
        with self._lock:
            self._corrupt_next += n

    def pause(self, seconds: float) -> None:
        self._pause_until = time.monotonic() + seconds

    def resume(self) -> None:
        self._pause_until = 0.0

    @property
    def paused(self) -> bool:
        return time.monotonic() < self._pause_until

    def mangle(self, frame: bytes) -> bytes:
        """Return the frame, or a damaged copy when a fault is due."""
        with self._lock:
            due = self._corrupt_next > 0 or (self.corrupt_rate and self.rng.random() < self.corrupt_rate)
            if not due:
                return frame
            self._corrupt_next = max(0, self._corrupt_next - 1)
            self.corrupted += 1
            b = bytearray(frame)
            if self.rng.random() < 0.5 and len(b) > 2:
                i = self.rng.randrange(1, len(b))
                b[i] ^= 1 << self.rng.randrange(7)
                return bytes(b)
            return bytes(b[: self.rng.randrange(1, len(b))])  # truncated: bytes lost on the line


class DeviceSim(ABC):
    """A simulated device. `serve` runs once per connection until `stop` is set or conn closes."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()

    @abstractmethod
    def serve(self, conn: Conn, stop: threading.Event) -> None: ...


class Endpoints:
    """Expose a DeviceSim on a pty and/or a loopback TCP port. Use as a context manager."""

    def __init__(self, sim: DeviceSim, *, use_pty: bool = True, tcp_port: int | None = 0,
                 link: str | Path | None = None, host: str = "127.0.0.1") -> None:
        self.sim = sim
        self.use_pty = use_pty
        self.tcp_port = tcp_port
        self.link = Path(link) if link else None
        self.host = host
        self.stop_event = threading.Event()
        self.urls: dict[str, str] = {}
        self._threads: list[threading.Thread] = []
        self._conns: list[Conn] = []
        self._listener: socket.socket | None = None
        self._pty_fds: tuple[int, int] | None = None
        self._accepting = threading.Event()
        self._accepting.set()

    def start(self) -> dict[str, str]:
        if self.use_pty:
            master, slave = pty.openpty()
            tty.setraw(slave)  # no line discipline: CR stays CR, bytes pass as they are
            os.set_blocking(master, False)
            self._pty_fds = (master, slave)
            path = os.ttyname(slave)
            if self.link:
                with contextlib.suppress(FileNotFoundError):
                    self.link.unlink()
                self.link.symlink_to(path)
                path = str(self.link)
            self.urls["pty"] = path
            self._spawn(PtyConn(master))
        if self.tcp_port is not None:
            lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((self.host, self.tcp_port))
            lst.listen(8)
            lst.settimeout(0.2)
            self._listener = lst
            self.urls["socket"] = f"socket://{self.host}:{lst.getsockname()[1]}"
            t = threading.Thread(target=self._accept, name="sim-accept", daemon=True)
            t.start()
            self._threads.append(t)
        return self.urls

    def _spawn(self, conn: Conn) -> None:
        self._conns.append(conn)
        t = threading.Thread(target=self._run, args=(conn,), name="sim-conn", daemon=True)
        t.start()
        self._threads.append(t)

    def _run(self, conn: Conn) -> None:
        try:
            self.sim.serve(conn, self.stop_event)
        finally:
            if isinstance(conn, SocketConn):
                conn.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self.stop_event.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._accepting.is_set():
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns = [c for c in self._conns if not c.closed]
            self._spawn(SocketConn(sock))

    def drop_clients(self, refuse_for: float = 0.0) -> None:
        """Disconnect every TCP client (a cable pulled); refuse new ones for `refuse_for` seconds."""
        if refuse_for:
            self._accepting.clear()
            threading.Timer(refuse_for, self._accepting.set).start()
        for c in list(self._conns):
            if isinstance(c, SocketConn):
                c.close()

    def stop(self) -> None:
        self.stop_event.set()
        if self._listener:
            self._listener.close()
        for c in self._conns:
            if isinstance(c, SocketConn):
                c.close()
        for t in self._threads:
            t.join(timeout=2)
        if self._pty_fds:
            for fd in self._pty_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.link:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def __enter__(self) -> dict[str, str]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-pty", action="store_true", help="serve only on the TCP port")
    p.add_argument("--tcp-port", type=int, default=0, help="loopback TCP port (0: a free one; -1: none)")
    p.add_argument("--link", help="also make this path a symlink to the pty (a stable port name)")
    p.add_argument("--corrupt-rate", type=float, default=0.0, help="share of frames damaged on the wire")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--pause-every", type=float, default=0.0, metavar="S",
                   help="every S seconds the device goes silent (port open) for --pause-for seconds")
    p.add_argument("--pause-for", type=float, default=5.0, metavar="S")
    p.add_argument("--disconnect-every", type=float, default=0.0, metavar="S",
                   help="every S seconds drop every TCP client (a pulled cable)")


class FaultSchedule(threading.Thread):
    """Periodic pauses and disconnects, from the command-line flags."""

    def __init__(self, sims: list[DeviceSim], endpoints: list[Endpoints], args: argparse.Namespace,
                 stop: threading.Event) -> None:
        super().__init__(name="sim-faults", daemon=True)
        self.sims, self.endpoints, self.args, self.stop_event = sims, endpoints, args, stop

    def run(self) -> None:
        a = self.args
        now = time.monotonic()
        next_pause = now + a.pause_every if a.pause_every else float("inf")
        next_drop = now + a.disconnect_every if a.disconnect_every else float("inf")
        while not self.stop_event.wait(0.1):
            now = time.monotonic()
            if now >= next_pause:
                next_pause = now + a.pause_every
                for sim in self.sims:
                    sim.faults.pause(a.pause_for)
                print(json.dumps({"fault": "pause", "seconds": a.pause_for}), file=sys.stderr, flush=True)
            if now >= next_drop:
                next_drop = now + a.disconnect_every
                for ep in self.endpoints:
                    ep.drop_clients()
                print(json.dumps({"fault": "disconnect"}), file=sys.stderr, flush=True)


def run_until_signalled(endpoint_sets: dict[str, Endpoints], extra: dict[str, Any] | None = None,
                        args: argparse.Namespace | None = None) -> None:
    """Start every endpoint set, print one JSON line of URLs on stdout, run until SIGTERM or SIGINT.
    With `args` from add_endpoint_args, also run the periodic pause / disconnect faults they ask for."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    urls = {name: ep.start() for name, ep in endpoint_sets.items()}
    print(json.dumps({"urls": urls, **(extra or {})}), flush=True)
    if args is not None and (getattr(args, "pause_every", None) or getattr(args, "disconnect_every", None)):
        eps = list(endpoint_sets.values())
        FaultSchedule([ep.sim for ep in eps], eps, args, stop).start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for ep in endpoint_sets.values():
            ep.stop()
    sys.exit(0)


def endpoints_from_args(sim: DeviceSim, args: argparse.Namespace, suffix: str = "") -> Endpoints:
    link = f"{args.link}{suffix}" if args.link else None
    return Endpoints(sim, use_pty=not args.no_pty, tcp_port=None if args.tcp_port < 0 else args.tcp_port,
                     link=link)


class PeriodicSim(DeviceSim):
    """A device that speaks unasked every `period` seconds (a GNSS receiver's burst, a scanner's read):
    subclasses write one period's output in `tick`. Silent while paused; no catch-up burst after a stall."""

    period: float

    @abstractmethod
    def tick(self, conn: Conn) -> None: ...

    def serve(self, conn: Conn, stop: threading.Event) -> None:
        next_t = time.monotonic() + self.period
        while not stop.is_set() and not conn.closed:
            now = time.monotonic()
            if now < next_t:
                time.sleep(min(next_t - now, 0.05))
                continue
            next_t = max(next_t + self.period, now - 1)
            if not self.faults.paused:
                self.tick(conn)
