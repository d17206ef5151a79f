"""Starting a broker on this machine: a local mosquitto (tests, demo, benchmarks), or the embedded
broker when mosquitto is not installed (demo only). Loopback only."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)


class Mosquitto:
    """A mosquitto process on 127.0.0.1:port with its own config and (optional) persistence file.
    kill9() + start() is the broker-crash drill; stop() + start() the clean restart.
    `listeners`: config lines that define the listeners and their authentication (configs/broker's TLS
    config, adapted to test paths and ports; `port` is then the one start() waits for); default: one
    anonymous plaintext listener on 127.0.0.1:port."""

    def __init__(self, workdir: Path, port: int | None = None, *, persistence: bool = True,
                 autosave_interval: int = 1800, listeners: str | None = None) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(
            f"persistence {'true' if persistence else 'false'}\npersistence_location {self.workdir}/\n"
            f"autosave_interval {autosave_interval}\n"
            # a given config's own queue limits stand (the shipped one's are tested as shipped)
            + "".join(f"{k} {v}\n" for k, v in (("max_queued_messages", 100000), ("max_inflight_messages", 100))
                      if f"\n{k} " not in f"\n{listeners or ''}")
            # without it, small acks wait on Nagle + delayed ACK (~40 ms on Linux)
            + "set_tcp_nodelay true\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
            # started as root (a container), mosquitto would switch to the user mosquitto, who cannot read
            # the test's files (ACLs, keys, this log) in a 0700 temporary directory
            + ("user root\n" if os.geteuid() == 0 else "")
            + (listeners or f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port)
        for line in self.conf.read_text().splitlines():  # every listener: mosquitto opens them one after another
            if line.startswith("listener ") and (port := int(line.split()[1])) != self.port:
                wait_port(port)
        return self

    def kill9(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
