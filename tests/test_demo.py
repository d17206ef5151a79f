"""The README's demo command, as a new user runs it: every unit type, 0 lost, 0 duplicates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from customs_edge.cli.demo import available_types
from tests.conftest import need_mosquitto

# What each unit type must have delivered to the hub within the demo's run.
EXPECTED_TYPES = {
    "scale": {"weighing"},
    "ore-station": {"lot_report", "radiation_alarm", "foreign_matter"},
    "gate": {"screening", "fever_alert"},
}


def run_demo(tmp_path: Path, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "customs_edge", "demo", "--json", "--workdir", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode in (0, 2), res.stderr[-2000:]
    return json.loads(res.stdout)


@pytest.mark.broker
@pytest.mark.slow
def test_demo_fleet_delivers_everything_exactly_once(tmp_path: Path) -> None:
    need_mosquitto()
    out = run_demo(tmp_path, "--duration", "40")
    types = available_types()
    assert out["broker"] == "mosquitto"
    assert sorted(d["type"] for d in out["devices"].values()) == sorted(types)
    for device_id, d in out["devices"].items():
        assert d["produced"] > 0, device_id
        assert (d["lost"], d["duplicates"], d["dropped_by_cap"]) == (0, 0, 0), (device_id, d)
        assert d["delivered"] == d["produced"]
        missing = EXPECTED_TYPES.get(d["type"], set()) - set(d["records_by_type"])
        assert not missing, f"{device_id}: no {missing} reached the hub; got {d['records_by_type']}"


@pytest.mark.slow
def test_demo_runs_on_the_embedded_broker_without_mosquitto(tmp_path: Path) -> None:
    out = run_demo(tmp_path, "--duration", "6", "--types", "scale", "--broker", "embedded")
    assert out["broker"] == "embedded"
    (d,) = out["devices"].values()
    assert d["produced"] > 0 and d["lost"] == 0 and d["delivered"] == d["produced"]
