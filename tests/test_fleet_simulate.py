"""`customs-edge fleet simulate`: N units in one process, each its own device id, outbox and session, every
record produced reaching the hub once and acked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from customs_edge.hub.brokers import Mosquitto
from tests.fleet import HubThread

pytestmark = pytest.mark.broker


def test_simulated_units_each_deliver_their_records_once(tmp_path: Path, mosquitto: Mosquitto) -> None:
    hub = HubThread(mosquitto.port, tmp_path / "hub.db", client_id="hub-sim").start()
    try:
        out = subprocess.run([sys.executable, "-m", "customs_edge", "fleet", "simulate", "--units", "4",
                              "--records", "25", "--rate", "50", "--backlog", "5", "--broker",
                              f"127.0.0.1:{mosquitto.port}", "--workdir", str(tmp_path / "units"), "--json",
                              "--duration", "60"], capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        final = json.loads(out.stdout.splitlines()[-1])
        assert (final["final"], final["units"], final["produced"], final["acked"], final["pending"]) == \
            (True, 4, 100, 100, 0)
        assert final["latency_p50_ms"] is not None
        stats = hub.hub.store.stats()
        assert [(s.device_id, s.stored, s.conflicts, s.gaps) for s in stats] == \
            [(f"sim-{i:04d}", 25, 0, 0) for i in range(4)]
        assert {s.status for s in stats} == {"offline"}  # each unit said goodbye on its own session
        assert len({p.name for p in (tmp_path / "units").iterdir()}) == 4  # an outbox each
    finally:
        hub.stop()


def test_a_backlog_waits_for_the_go_file_then_drains(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """--wait-for: the backlog is put first and a {"ready": true} line printed; nothing connects until the file exists
    (several simulator processes of bench/hub.py's burst connect together)."""
    hub = HubThread(mosquitto.port, tmp_path / "hub.db", client_id="hub-sim-go").start()
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "fleet", "simulate", "--units", "3", "--rate", "0",
                             "--backlog", "40", "--records", "40", "--outbox", "memory", "--counts-only", "--spread",
                             "0", "--wait-for", str(go), "--broker", f"127.0.0.1:{mosquitto.port}", "--workdir",
                             str(tmp_path / "units"), "--json", "--duration", "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert (ready["ready"], ready["produced"]) == (True, 120)
        assert hub.hub.store.stats() == []  # not one unit connected yet
        go.touch()
        out, _ = proc.communicate(timeout=60)
        final = json.loads(out.splitlines()[-1])
        assert (final["final"], final["acked"], final["pending"]) == (True, 120, 0)
        assert final["last_ack_s"] is not None and final["last_ack_s"] <= final["t"]
        assert [(s.device_id, s.stored) for s in hub.hub.store.stats()] == [(f"sim-{i:04d}", 40) for i in range(3)]
    finally:
        if proc.poll() is None:
            proc.kill()
        hub.stop()


def test_links_wait_on_descriptors_above_select_limit() -> None:
    """500 simulated units hold ~4000 descriptors; select() refuses any above 1024 (FD_SETSIZE): "filedescriptor out
    of range in select()" killed every link of the fleet before."""
    import os
    import resource
    import socket

    from customs_edge.core.mqtt import wait_ready

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"the hard descriptor limit ({hard}) is below 2100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 2050))
    try:
        assert wait_ready([high], [], 0.01) == ([], [])
        b.send(b"x")
        assert wait_ready([high], [high], 1.0) == ([high], [high])
    finally:
        high.close()
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
