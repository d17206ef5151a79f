"""The confirmation workflow: an officer's clinical reading for a fever alert, sent as the `confirm`
command on the unit's topic, becomes a `fever_confirmation` record paired with the screening; and the
PPV figures of `models evaluate fever`."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from customs_edge.agent.config import parse_unit_config
from customs_edge.agent.runtime import Unit
from customs_edge.core.records import Priority
from customs_edge.core.wire import Command
from customs_edge.simulators.gate_world import GateWorld, TravellerTruth
from customs_edge.training.fever import ShardResult, ppv, score, wilson
from tests.conftest import script_driver
from tests.test_gate_app import QUIET, frames, thermal
from tests.test_lane_signals import records, settled


def record_ts(outbox: Path, screening: str) -> float:
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        ((ts,),) = db.execute("SELECT ts FROM records WHERE type='screening' AND json_extract(payload, "
                              "'$.screening')=?", (screening,)).fetchall()
    finally:
        db.close()
    return float(ts)


def confirm(unit: Unit, **args: Any) -> dict[str, Any]:
    """The command as it arrives on the unit's cmd topic (JSON), run by the unit's sync."""
    cmd = Command.model_validate_json(json.dumps({"id": "c1", "cmd": "confirm", "ts": time.time(), "args": args}))
    return unit.sync._run_command(cmd)


def test_a_confirmation_command_produces_a_record_paired_with_the_screening(tmp_path: Path) -> None:
    cfg = parse_unit_config({
        "device_id": "gate-c1", "type": "gate", "drivers": {"thermal": {"driver": "mlx90640-serial", "port": "/x"}},
        "app": {"warmup_s": 0, "summary_interval_s": 1e6}, "outbox": {"path": str(tmp_path / "outbox.db")},
        "sync": {"port": 9, "connect_timeout_s": 1}})
    world = GateWorld(21, replace(QUIET, febrile_share=0.5))
    unit = Unit(cfg, drivers={"thermal": script_driver("thermal", [thermal(t, f) for t, f in frames(world, 40.0)])})
    ob = cfg.outbox.path
    unit.start()
    try:
        settled(unit)
        alerts = [p for _, p in records(ob, "fever_alert")]
        assert len(alerts) >= 2
        first, second = alerts[0]["screening"], alerts[1]["screening"]
        screening = next(p for _, p in records(ob, "screening") if p["screening"] == first)
        assert screening["decision"] == "fever"

        reply = confirm(unit, screening=first, measured_c=38.4, by="officer-17", at=1.8e9)
        assert reply == {"screening": first, "confirmed": True, "stored": True}
        ((prio, rec),) = records(ob, "fever_confirmation")  # committed before the reply
        assert prio == int(Priority.ALERT)
        assert rec == {"screening": first, "measured_c": 38.4, "confirmed": True, "confirm_fever_c": 38.0,
                       "by": "officer-17", "at": 1.8e9, "screening_ts": record_ts(ob, first),
                       "estimate_c": screening["estimate_c"], "threshold_c": screening["threshold_c"],
                       "screening_valid": screening["valid"]}

        assert confirm(unit, screening=second, measured_c=37.1, by="officer-17")["confirmed"] is False
        with pytest.raises(ValueError, match=r"no fever alert 'nope'.*give the `screening` id"):
            confirm(unit, screening="nope", measured_c=38.4, by="officer-17")
        with pytest.raises(ValueError, match="measured_c: Input should be less than or equal to 45"):
            confirm(unit, screening=first, measured_c=98.6, by="officer-17")
        with pytest.raises(ValueError, match="by: Field required"):
            confirm(unit, screening=first, measured_c=38.0)
        assert [p["confirmed"] for _, p in records(ob, "fever_confirmation")] == [True, False]
    finally:
        unit.stop()
    ((_, summary),) = records(ob, "lane_summary")
    assert summary["totals"]["confirmed"] == 1 and summary["totals"]["not_confirmed"] == 1


def test_another_unit_type_refuses_the_command_by_name(tmp_path: Path) -> None:
    cfg = parse_unit_config({
        "device_id": "scale-c1", "type": "scale", "drivers": {"scale": {"driver": "toledo-continuous", "port": "/x"}},
        "outbox": {"path": str(tmp_path / "outbox.db")}, "sync": {"port": 9, "connect_timeout_s": 1}})
    unit = Unit(cfg, drivers={"scale": script_driver("scale", [])})
    unit.start()
    try:
        with pytest.raises(ValueError, match="unsupported command 'confirm' for a ScaleApp"):
            confirm(unit, screening="x", measured_c=38.0, by="o")
    finally:
        unit.stop()


def test_ppv_at_realistic_prevalences_by_hand() -> None:
    # 10 febrile travellers, 9 alarmed: sensitivity 0.9; 990 afebrile, 20 alarmed: false-alarm rate 20/990.
    # By hand, PPV = sens*p / (sens*p + far*(1-p)):
    #   p = 1 %:   0.009  / (0.009  + 20/990*0.99  = 0.02)         = 0.3103
    #   p = 0.1 %: 0.0009 / (0.0009 + 20/990*0.999 = 0.0201818)    = 0.0427
    #   p = 5 %:   0.045  / (0.045  + 20/990*0.95  = 0.0191919)    = 0.7010
    truth = [TravellerTruth(i, 38.0 if i < 10 else 36.8, i < 10, "none", 1.2, 1.7, 1.2, 0, 1, 0, 1, 37, 35)
             for i in range(1000)]
    alarmed = set(range(9)) | set(range(10, 30))
    matched = [(None, tr, SimpleNamespace(fever=tr.id in alarmed, tags=(), estimate_c=tr.core_c)) for tr in truth]
    result = score([ShardResult(truth, matched, [], 0)], 37.3)  # type: ignore[arg-type]
    assert result["sensitivity"] == 0.9 and result["false_alarm_rate"] == round(20 / 990, 5)
    assert result["ppv_at_prevalence"] == {"0.001": 0.0427, "0.01": 0.3103, "0.05": 0.701}
    assert ppv(0.0, 0.0, 0.01) is None  # no alarms at all: PPV undefined, not 0


def test_wilson_interval_matches_the_published_example() -> None:
    """Newcombe RG, Stat Med 17 (1998) 857-872, table I: 81 of 263 -> Wilson 95 % 0.2553 to 0.3662;
    and the interval stays inside [0, 1] at 0 and n of n."""
    low, high = wilson(81, 263)  # type: ignore[misc]
    assert round(low, 4) == 0.2553 and round(high, 4) == 0.3662
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)  # type: ignore[index]
    assert wilson(0, 0) is None
