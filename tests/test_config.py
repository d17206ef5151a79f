"""Config: every shipped file validates; a bad file names the file, the key path, what was expected, and
suggests the nearest key; the CLI exits 0/1; the running unit keeps its config when a reload is bad."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from customs_edge.agent.config import load_unit_config, parse_unit_config
from customs_edge.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def base() -> dict:
    return yaml.safe_load((REPO / "configs" / "scale.yaml").read_text())


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_unit_config(path)
    assert cfg.device_id and cfg.drivers


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_unit_config(raw, "unit.yaml")
    assert str(exc.value).startswith("unit.yaml: invalid config")
    return exc.value.problems


def test_misspelt_keys_get_their_path_and_a_suggestion() -> None:
    raw = base()
    raw["drivers"]["scale"]["baudrat"] = 9600
    raw["sync"]["ackmode"] = "hub"
    raw["app"]["deadbnd"] = 1
    got = problems_of(raw)
    assert "drivers.scale.baudrat: unknown key (did you mean 'baudrate'?)" in got
    assert "sync.ackmode: unknown key (did you mean 'ack_mode'?)" in got
    assert "app.deadbnd: unknown key (did you mean 'deadband'?)" in got


def test_unknown_key_with_no_near_match_lists_the_expected_keys() -> None:
    raw = base()
    raw["outbox"]["zzz"] = 1
    (line,) = problems_of(raw)
    assert line.startswith("outbox.zzz: unknown key; expected one of: path, synchronous")


def test_wrong_types_and_values_say_what_was_expected() -> None:
    raw = base()
    raw["sync"]["port"] = "abc"
    raw["drivers"]["scale"]["checksum"] = "maybe"
    raw["device_id"] = "bad id with spaces"
    got = "\n".join(problems_of(raw))
    assert "sync.port: Input should be a valid integer" in got and "'abc'" in got
    assert "drivers.scale.checksum: Input should be 'auto', 'on' or 'off' (got 'maybe')" in got
    assert "device_id: String should match pattern" in got


def test_unknown_driver_and_type_suggest_registered_names() -> None:
    raw = base()
    raw["drivers"]["scale"]["driver"] = "toledo-continous"
    raw["type"] = "scales"
    got = "\n".join(problems_of(raw))
    assert "drivers.scale.driver: unknown driver 'toledo-continous' (did you mean 'toledo-continuous'?)" in got
    assert "type: unknown app 'scales' (did you mean 'scale'?)" in got


def test_missing_required_key_and_missing_driver_role() -> None:
    raw = base()
    del raw["drivers"]["scale"]["port"]
    assert problems_of(raw) == ["drivers.scale.port: required key is missing"]
    raw = base()
    raw["drivers"] = {"other": {"driver": "toledo-continuous", "port": "/dev/ttyUSB1"}}
    (line,) = problems_of(raw)
    assert "needs a driver named 'scale'" in line


def test_all_problems_are_reported_at_once() -> None:
    raw = base()
    raw["sync"]["port"] = -1
    raw["drivers"]["scale"]["parity"] = "X"
    raw["app"]["settle_frames"] = 0
    assert len(problems_of(raw)) == 3


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_unit_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_unit_config(tmp_path / "nope.yaml")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", *args], capture_output=True, text=True, timeout=60)


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    ok = cli("config", "validate", str(REPO / "configs" / "scale.yaml"))
    assert ok.returncode == 0 and "ok (scale scale-01" in ok.stdout
    raw = base()
    raw["sync"]["prot"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res = cli("config", "validate", str(bad))
    assert res.returncode == 1
    assert f"{bad}: invalid config" in res.stderr and "sync.prot: unknown key (did you mean 'port'?)" in res.stderr


def test_cli_schema_covers_driver_sections() -> None:
    res = cli("config", "schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert schema["additionalProperties"] is False
    drivers = schema["properties"]["drivers"]["additionalProperties"]["oneOf"]
    titles = {d.get("title") for d in drivers}
    assert "ToledoConfig" in titles


def test_values_that_validate_but_cannot_work_are_refused(tmp_path: Path) -> None:
    raw = base()
    raw["sync"]["topic_prefix"] = "customs/#"
    raw["sync"]["ack_timeout_s"] = float("inf")
    raw["outbox"]["max_mb"] = float("nan")
    got = "\n".join(problems_of(raw))
    assert "sync.topic_prefix: String should match pattern" in got
    assert "sync.ack_timeout_s: Input should be a finite number" in got
    assert "outbox.max_mb: Input should be a finite number" in got
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("device_id: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_unit_config(binary)
