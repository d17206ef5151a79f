"""Config: every shipped file validates; a bad file names the file, the key path, what was expected, and
suggests the nearest key; the CLI exits 0/1; the running unit keeps its config when a reload is bad."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from customs_edge.agent.config import LINE_CHARS, load_unit_config, parse_unit_config
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
    assert "device_id: must be 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit " \
        "(got 'bad id with spaces')" in got


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


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    res = cli("config", "schema")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def schema_errors(schema: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(raw)]


def test_schema_is_self_contained(schema: dict[str, Any]) -> None:
    """Every $ref is a pointer into the document itself, and points at something."""
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend([node["$ref"]] if "$ref" in node else [])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    for ref in refs:
        assert ref.startswith("#/"), ref
        target: Any = schema
        for part in ref[2:].split("/"):
            assert isinstance(target, dict) and part in target, f"{ref} points nowhere"
            target = target[part]
    assert len(refs) > 10  # the driver and app sections too
    titles = {d.get("title") for d in schema["$defs"].values()}
    assert {"ToledoConfig", "ModbusRtuConfig", "SlaveConfig", "PointConfig", "OreAppConfig", "OrePoints"} <= titles
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_against_the_schema(schema: dict[str, Any], path: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    raw = yaml.safe_load(path.read_text())
    assert schema_errors(schema, raw) == []
    raw["app"] = {}  # every app key has a default: an empty section is that type's app, and only that one
    assert schema_errors(schema, raw) == []


def test_schema_picks_the_app_by_type_and_the_driver_by_name(schema: dict[str, Any]) -> None:
    gate = yaml.safe_load((REPO / "configs" / "gate.yaml").read_text())
    gate["app"]["increment_t"] = 25  # an ore-station key
    (err,) = schema_errors(schema, gate)
    assert err.startswith("app: Additional properties are not allowed ('increment_t' was unexpected)")
    gate = yaml.safe_load((REPO / "configs" / "gate.yaml").read_text())
    gate["drivers"]["passage"]["slaves"] = []  # a modbus-rtu key on a passage sensor
    (err,) = schema_errors(schema, gate)
    assert err.startswith("drivers.passage: Additional properties are not allowed ('slaves' was unexpected)")
    gate["drivers"]["passage"] = {"driver": "pasage", "port": "/dev/ttyUSB1"}
    gate["type"] = "gates"
    assert {e.split(":")[0] for e in schema_errors(schema, gate)} == {"drivers.passage.driver", "type"}


def test_values_that_validate_but_cannot_work_are_refused(tmp_path: Path) -> None:
    raw = base()
    raw["sync"]["topic_prefix"] = "customs/#"
    raw["sync"]["ack_timeout_s"] = float("inf")
    raw["outbox"]["max_mb"] = float("nan")
    got = "\n".join(problems_of(raw))
    assert "sync.topic_prefix: must be topic levels of letters, digits" in got
    assert "sync.ack_timeout_s: Input should be a finite number" in got
    assert "outbox.max_mb: Input should be a finite number" in got
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("device_id: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_unit_config(binary)


# --- files that must be refused cleanly: never a traceback, never unbounded time or memory --------------

BOMB = "\n".join(  # 9 levels of 9 aliases: 9**9 (387 million) strings once expanded, from ~500 bytes
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    + ["device_id: *l8", "type: scale", ""])


def refusal(tmp_path: Path, content: str | bytes) -> list[str]:
    f = tmp_path / "unit.yaml"
    f.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ConfigError) as exc:
        load_unit_config(f)
    assert exc.value.source == str(f) and str(exc.value).startswith(f"{f}: invalid config")
    return exc.value.problems


def deep_flow(depth: int) -> str:
    return "device_id: x\ntype: scale\napp: {k: " + "[" * depth + "]" * depth + "}\n"


def deep_block(depth: int) -> str:
    return "device_id: x\ntype: scale\napp:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(depth)) \
        + " " * (depth + 1) + "v: 1\n"


@pytest.mark.parametrize("make", [deep_flow, deep_block], ids=["flow", "block"])
def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path: Path, make: Any) -> None:
    (line,) = refusal(tmp_path, make(1000))
    assert "nested deeper than 32 levels" in line and "line 3" in line
    # nesting below the cap is only refused by the schema, for what it is
    assert all("nested deeper" not in p for p in refusal(tmp_path, make(20)))


def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    assert len(BOMB) < 600
    (line,) = refusal(tmp_path, BOMB)
    assert "aliases" in line and "expand" in line
    assert len(line) < 300  # the expanded input is not echoed


def test_aliases_cannot_nest_past_the_depth_cap(tmp_path: Path) -> None:
    """Each level written 20 deep, the alias of the one before inside it: 60 levels once expanded."""
    levels = ["a0: &a0 " + "[" * 20 + "1" + "]" * 20]
    levels += [f"a{i}: &a{i} " + "[" * 20 + f"*a{i - 1}" + "]" * 20 for i in (1, 2)]
    (line,) = refusal(tmp_path, "\n".join([*levels, ""]))
    assert line.startswith("refused: aliases nest it deeper than 32 levels (line 2,"), line


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    (line,) = refusal(tmp_path, "device_id: x\ntype: scale\napp: &a {k: *a}\n")
    assert "refers to itself" in line


def test_aliases_within_the_bound_still_work(tmp_path: Path) -> None:
    raw = base()
    text = yaml.safe_dump(raw).replace("sync:\n", "sync: &s\n") + "x-copy: *s\n"
    problems = refusal(tmp_path, text)
    line = text.splitlines().index("x-copy: *s") + 1
    assert problems == ["x-copy: unknown key; expected one of: device_id, type, site, drivers, app, outbox, sync, "
                        f"models, health_interval_s, log_level (line {line})"]


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "empty"),
    (b"# only a comment\n\n", "empty"),
    (b"- a\n- b\n", "top level must be a mapping of keys to values (got ['a', 'b'])"),
    (b"just a string\n", "top level must be a mapping of keys to values (got 'just a string')"),
    (b"device_id: caf\xe9\n", "not UTF-8 text (byte 14)"),
    (b"a: 1\n---\nb: 2\n", "not valid YAML: expected a single document in the stream"),
    (b"a: 1\x00\n", "not valid YAML: unacceptable character #x0000"),
    (b"a: *nowhere\n", "not valid YAML: found undefined alias 'nowhere' (line 1, column 4)"),
    (b"device_id: x\nsince: 2024-13-45\n", "cannot be loaded: ValueError: month must be in 1..12"),
    (b"device_id: x\nn: 1" + b"1" * 5000 + b"\n", "cannot be loaded: ValueError: Exceeds the limit"),
], ids=["empty", "comment-only", "list", "string", "latin-1", "two-documents", "nul", "undefined-alias",
        "bad-date", "huge-int"])
def test_unloadable_files_are_refused_with_a_clear_message(tmp_path: Path, content: bytes, expected: str) -> None:
    (line,) = refusal(tmp_path, content)
    assert line.startswith(expected), line
    assert len(line) < 300


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    (line,) = refusal(tmp_path, "device_id: x\n" + "# padding\n" * 110_000)
    assert line == "larger than 1024 KiB: a unit file is a few kB; is this the right file?"


def test_echoed_values_and_keys_are_capped(tmp_path: Path) -> None:
    raw = base()
    raw["sync"]["port"] = "9" * 1000 + "x"
    raw["sync"]["k" * 5000] = 1
    raw["drivers"]["scale"]["driver"] = "d" * 100_000
    problems = refusal(tmp_path, yaml.safe_dump(raw, width=1 << 20))
    # what is echoed from the input is capped; the lists of known drivers and keys after it grow with the code
    echoed = [p.split("; known: ")[0].split("; expected one of: ")[0] for p in problems]
    assert len(problems) == 3 and all(len(p) <= LINE_CHARS for p in echoed), [len(p) for p in echoed]
    port = next(p for p in problems if p.startswith("sync.port"))
    assert "(got '" + "9" * 78 + "…) (line " in port
    assert any(p.startswith("sync." + "k" * 79 + "…: unknown key") for p in problems)
    assert any(p.startswith("drivers.scale.driver: unknown driver '" + "d" * 78 + "…; known: ") for p in problems)


@pytest.mark.parametrize("content", [deep_flow(1000), BOMB], ids=["deep", "bomb"])
def test_cli_validate_refuses_without_a_traceback(tmp_path: Path, content: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    res = cli("config", "validate", str(bad))
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.startswith(f"{bad}: invalid config") and "Traceback" not in res.stderr
    assert len(res.stderr) < 500


def test_reload_to_an_unloadable_file_keeps_the_agent_running(tmp_path: Path) -> None:
    """SIGHUP with a file nested 1,000 deep: the refusal is logged and the running unit carries on."""
    from customs_edge.hub.brokers import free_port
    from customs_edge.simulators.base import Endpoints
    from customs_edge.simulators.scale import ScaleSim, ScaleWorld
    from tests.conftest import unit_dict, wait_for
    from tests.fleet import AgentProc, assert_reload_refused, outbox_state

    with Endpoints(ScaleSim(ScaleWorld(seed=2, cycle_s=1.0), rate_hz=50)) as urls:
        agent = AgentProc(unit_dict(tmp_path, urls["socket"], free_port()), tmp_path).start()  # no broker
        try:
            wait_for(lambda: outbox_state(Path(agent.cfg["outbox"]["path"]))[0] > 5, 30, "records")
            assert_reload_refused(agent, deep_flow(1000), "nested deeper than 32 levels")
        finally:
            agent.terminate()
