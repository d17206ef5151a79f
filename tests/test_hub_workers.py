"""Scale-out drill: three hub worker processes on one MQTT shared subscription store into one PostgreSQL
(real mosquitto, a throwaway PostgreSQL cluster, simulated units running the agent's outbox and sync). One
worker is frozen while it holds batches it never acked, then killed with -9: its batches are resent by the
units to the other workers, and every record ends up stored exactly once, with the content it was produced
with, and acked."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from customs_edge.agent.simfleet import SimFleet
from customs_edge.hub.brokers import Mosquitto
from customs_edge.hub.store_pg import PgHubStore
from tests.conftest import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.postgres]

UNITS, RECORDS = 6, 240


class Worker:
    """`customs-edge hub --db postgresql://...` in its own process, as a worker runs in the field."""

    def __init__(self, name: str, port: int, url: str, workdir: Path) -> None:
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "hub", "--db", url, "--port", str(port),
                                      "--client-id", name, "--photos-dir", str(workdir / "photos")],
                                     stderr=self.log.open("ab"))

    def subscribed(self) -> bool:
        return "hub subscribed" in self.log.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def workers(tmp_path: Path, mosquitto: Mosquitto, pg_url: str) -> Any:
    PgHubStore(pg_url).close()  # the schema, before three workers race for it (they may: it is locked)
    ws = [Worker(f"hub-w{i}", mosquitto.port, pg_url, tmp_path) for i in range(3)]
    try:
        wait_for(lambda: all(w.subscribed() for w in ws), 30, "three workers subscribed")
        yield ws
    finally:
        for w in ws:
            w.stop()


def test_three_workers_a_kill_9_loses_nothing_and_stores_each_record_once(tmp_path: Path, mosquitto: Mosquitto,
                                                                          pg_url: str, workers: list[Worker]) -> None:
    fleet = SimFleet(UNITS, tmp_path / "units", port=mosquitto.port, rate=40, limit=RECORDS, ack_timeout_s=1.0,
                     batch_max_records=20, sync_options={"max_resend_interval_s": 2.0}).start()
    try:
        wait_for(lambda: fleet.figures().acked >= UNITS * 20, 30, "records acked by the three workers")
        victim = workers[1]
        victim.signal(signal.SIGSTOP)  # frozen: the broker still hands it a third of the batches, never acked
        wait_for(lambda: fleet.figures().hub_resends >= 3, 30, "batches the frozen worker held, resent on timeout")
        victim.signal(signal.SIGKILL)
        victim.proc.wait(10)
        wait_for(lambda: (f := fleet.figures()).produced == UNITS * RECORDS and f.pending == 0, 90,
                 "every record acked after the kill")
    finally:
        fleet.stop()
    assert victim.proc.returncode == -signal.SIGKILL
    assert all(w.proc.poll() is None for w in workers if w is not victim)
    st = PgHubStore(pg_url, readonly=True)
    try:
        per_device = st.db.execute("SELECT device_id, count(*), count(DISTINCT seq), max(seq) FROM records"
                                   " GROUP BY device_id ORDER BY device_id").fetchall()
        assert per_device == [(u.device_id, RECORDS, RECORDS, RECORDS) for u in fleet.units]
        # each record holds what its unit produced under that seq (payload k = seq - 1)
        assert st.db.execute("SELECT count(*) FROM records WHERE (payload::json->>'k')::int <> seq - 1"
                             ).fetchone() == (0,)
        stats = st.stats()
        assert [(s.stored, s.conflicts, s.rejected, s.gaps) for s in stats] == [(RECORDS, 0, 0, 0)] * UNITS
        assert sum(s.duplicates for s in stats) >= 0 and st.refused() == {}
        assert all(st.verify(u.device_id).bad_seq is None for u in fleet.units)  # chains complete
    finally:
        st.close()
    # the operators' commands read the same database, read-only
    stats = subprocess.run([sys.executable, "-m", "customs_edge", "hub", "stats", "--db", pg_url, "--json"],
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert {d: v["stored"] for d, v in json.loads(stats.stdout)["devices"].items()} == \
        {u.device_id: RECORDS for u in fleet.units}
    verify = subprocess.run([sys.executable, "-m", "customs_edge", "hub", "verify", "--db", pg_url],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout.count(": OK,") == UNITS, verify.stdout + verify.stderr
    logs = "".join(w.log.read_text() for w in workers)
    assert "Traceback" not in logs, logs[-3000:]
