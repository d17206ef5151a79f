"""`customs-edge status` reads the outbox without touching it: no cap applied to a live agent's file, no
lock taken, and a mistyped path is an error that creates nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from customs_edge.agent.outbox import SqliteOutbox, read_stats
from customs_edge.core.records import Priority, RecordIn
from tests.conftest import unit_dict


def status(tmp_path: Path, **outbox: Any) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, "/dev/ttyUSB0", 1883, outbox=outbox)))
    return subprocess.run([sys.executable, "-m", "customs_edge", "status", "--config", str(cfg), "--json"],
                          capture_output=True, text=True, timeout=60)


def test_status_of_a_mistyped_path_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "var" / "lib" / "outbx.db"
    res = status(tmp_path, path=str(missing))
    assert res.returncode == 1
    assert f"{missing}: no outbox file there; check outbox.path" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "var").exists()


def test_status_reads_a_live_outbox_without_capping_or_locking_it(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "outbox.db"
    live = SqliteOutbox(path, device_id="scale-t1")  # the agent: holds the lock
    live.put([RecordIn(type="t", priority=Priority.TELEMETRY, payload={"pad": "x" * 500}) for _ in range(2000)])
    live.ack([(1, 10)])
    res = status(tmp_path, path=str(path), max_mb=0.1, max_age_days=0.000001)  # a cap that would drop all
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)["outbox"]
    assert st["pending"] == 1990 and st["last_seq"] == 2000 and st["dropped"] == {}
    assert st["device_id"] == "scale-t1" and st["acked_seq"] == 10
    assert read_stats(path).pending == 1990 and live.stats().dropped == {}
    live.close()


def test_status_refuses_another_units_outbox(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "outbox.db"
    SqliteOutbox(path, device_id="scale-99").close()
    res = status(tmp_path, path=str(path))
    assert res.returncode == 1 and "belongs to device 'scale-99', not 'scale-t1'" in res.stderr
