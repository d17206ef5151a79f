"""The technician's commands on a unit: probe an instrument (with a hex dump of the wire) and read the
outbox's state from disk."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from customs_edge.simulators.base import Endpoints
from customs_edge.simulators.scale import ScaleSim, ScaleWorld
from tests.conftest import unit_dict


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", *args], capture_output=True, text=True, timeout=60)


def test_probe_reads_frames_and_hexdumps_the_wire(tmp_path: Path) -> None:
    with Endpoints(ScaleSim(ScaleWorld(seed=1), rate_hz=50), use_pty=False) as urls:
        cfg = tmp_path / "unit.yaml"
        cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, urls["socket"], 1883)))
        res = cli("probe", "--config", str(cfg), "scale", "--count", "5", "--hexdump")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("weight ")]
    assert len(lines) == 5 and json.loads(lines[0].split(" ", 1)[1])["unit"] == "kg"
    summary = json.loads(res.stderr.strip().splitlines()[-1])
    assert summary["readings"] == 5 and summary["frames"] >= 5
    dump = " ".join(ln[2:] for ln in res.stderr.splitlines() if ln.startswith("< "))
    # STX, SWA (0x2c: the simulator's configuration), SWB (0x30, or 0x38 while the load is in motion)
    assert len(re.findall(r"02 2c 3[08]", dump)) >= 5
    assert dump.count("0d") >= 5  # every frame's CR went by


def test_probe_of_a_dead_port_says_fault_and_exits_1(tmp_path: Path) -> None:
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(unit_dict(tmp_path, "socket://127.0.0.1:1", 1883)))
    res = cli("probe", "--config", str(cfg), "scale", "--seconds", "2")
    assert res.returncode == 1 and "FAULT: cannot open socket://127.0.0.1:1" in res.stderr
    res = cli("probe", "--config", str(cfg), "scales")
    assert res.returncode == 1 and "no driver named 'scales'" in res.stderr


def test_status_reads_the_outbox_on_disk(tmp_path: Path) -> None:
    from customs_edge.agent.outbox import SqliteOutbox
    from customs_edge.core.records import RecordIn

    raw = unit_dict(tmp_path, "/dev/ttyUSB0", 1883)
    ob = SqliteOutbox(raw["outbox"]["path"])
    ob.put([RecordIn(type="t") for _ in range(7)])
    ob.ack([(1, 2)])
    ob.close()
    cfg = tmp_path / "unit.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    res = cli("status", "--config", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["outbox"]["pending"] == 5 and st["outbox"]["last_seq"] == 7
