"""Mistakes a unit file can make that each key alone does not show: app points no driver defines, roles
the app does not read, port settings that do not apply to the port, YAML 1.1 conversions, and two files
sharing a device id or an outbox. Each message names the fix and the line it is on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from customs_edge.agent.config import load_unit_config
from customs_edge.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
ORE = (REPO / "configs" / "ore-station.yaml").read_text()
SCALE = (REPO / "configs" / "scale.yaml").read_text()


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def line_of(text: str, fragment: str) -> int:
    (n,) = [i + 1 for i, ln in enumerate(text.splitlines()) if fragment in ln]
    return n


def refused(tmp_path: Path, text: str) -> list[str]:
    f = tmp_path / "unit.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_unit_config(f)
    return exc.value.problems


def accepted_with_warnings(tmp_path: Path, text: str) -> list[str]:
    f = tmp_path / "unit.yaml"
    f.write_text(text)
    warnings: list[str] = []
    load_unit_config(f, warnings)
    return warnings


def test_shipped_files_have_no_warnings(tmp_path: Path) -> None:
    for f in sorted((REPO / "configs").glob("*.yaml")):
        warnings: list[str] = []
        load_unit_config(f, warnings)
        assert warnings == [], f


def test_an_app_point_no_driver_defines_is_refused_where_it_is_written(tmp_path: Path) -> None:
    """Before: validated ok, then every lot was decided "resample" with 0 increments."""
    text = edit(ORE, "app:\n", "app:\n  points:\n    total_t: total_tonnes\n")
    (p,) = refused(tmp_path, text)
    assert p.startswith("app.points.total_t: no driver defines a point named 'total_tonnes'")
    assert "did you mean 'total_t'?" in p and "drivers.belt_weigher define: rate_tph, speed_mps, total_t," in p
    assert p.endswith(f"(line {line_of(text, 'total_t: total_tonnes')})")


def test_a_driver_point_renamed_away_from_the_apps_name_is_refused(tmp_path: Path) -> None:
    text = edit(ORE, "{name: gamma_alarm,", "{name: gamma_alm,")
    (p,) = refused(tmp_path, text)
    assert p.startswith("app.points.gamma_alarm: no driver defines a point named 'gamma_alarm' "
                        "(did you mean 'gamma_alarms'?): rename the point in drivers.belt_portal")


def test_points_of_an_absent_optional_role_are_not_required(tmp_path: Path) -> None:
    start, end = ORE.index("  moisture:  "), ORE.index("  belt_portal:")
    assert accepted_with_warnings(tmp_path, ORE[:start] + ORE[end:]) == []


def test_a_role_the_app_does_not_read_is_a_warning(tmp_path: Path) -> None:
    text = edit(SCALE, "  scale:\n", "  scael:\n    driver: toledo-continuous\n    port: /dev/ttyUSB9\n  scale:\n")
    (w,) = accepted_with_warnings(tmp_path, text)
    assert w.startswith("drivers.scael: a scale unit reads no driver named 'scael' (it reads scale)")
    assert w.endswith(f"(line {line_of(text, 'scael:')})")


def test_line_settings_on_a_socket_port_are_a_warning(tmp_path: Path) -> None:
    text = edit(SCALE, "port: /dev/ttyUSB0", "port: socket://127.0.0.1:4001")
    text = edit(text, "    baudrate: 9600\n", "    baudrate: 9600\n    parity: E\n")
    warnings = accepted_with_warnings(tmp_path, text)
    assert [w.split(":", 1)[0] for w in warnings] == ["drivers.scale.baudrate", "drivers.scale.parity"]
    assert all("has no effect on a socket:// port" in w and "remove it" in w for w in warnings)
    assert warnings[0].endswith(f"(line {line_of(text, 'baudrate: 9600')})")


@pytest.mark.parametrize("port", ["192.0.2.10:4001", "tcp://192.0.2.10:4001"])
def test_a_tcp_address_without_socket_scheme_is_refused_with_the_url_to_write(tmp_path: Path, port: str) -> None:
    text = edit(ORE, "socket://192.0.2.10:4001", port)
    (p,) = refused(tmp_path, text)
    assert p.startswith(f"drivers.analyser.port: '{port}' is neither a device path nor a URL: "
                        "a TCP address is written 'socket://192.0.2.10:4001'")
    assert p.endswith(f"(line {line_of(text, port)})")


@pytest.mark.parametrize(("key", "written", "shown"), [
    ("device_id", "0755", "the number 493"),
    ("device_id", "1.10", "the number 1.1"),
    ("site", "no", "the boolean false"),
    ("site", "on", "the boolean true"),
    ("site", "12:30", "the number 750"),  # YAML 1.1 sexagesimal
])
def test_a_value_yaml_converted_names_the_quoted_form(tmp_path: Path, key: str, written: str, shown: str) -> None:
    text = edit(SCALE, f"{key}: {'scale-01' if key == 'device_id' else 'sample-room-1'}", f"{key}: {written}")
    (p,) = refused(tmp_path, text)
    assert p == (f'{key}: YAML 1.1 reads {written} as {shown}, not text: write it quoted, {key}: "{written}" '
                 f"(line {line_of(text, f'{key}: {written}')})")


def test_a_quoted_value_is_accepted(tmp_path: Path) -> None:
    text = edit(SCALE, "device_id: scale-01", 'device_id: "0755"')
    assert accepted_with_warnings(tmp_path, text) == []


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", *args], capture_output=True, text=True, timeout=60)


def test_validate_refuses_a_device_id_or_outbox_shared_by_two_files(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text(SCALE)
    b.write_text(edit(SCALE, "outbox.db", "other.db"))  # same device_id
    c.write_text(edit(SCALE, "device_id: scale-01", "device_id: scale-02"))  # same outbox as a
    res = cli("config", "validate", str(a), str(b), str(c))
    assert res.returncode == 1
    assert f"{b}: device_id: 'scale-01' is also the device_id of {a}: every unit needs its own" in res.stderr
    assert f"{c}: outbox.path: '/var/lib/customs-edge/scale-01/outbox.db' is also the outbox.path of {a}" \
        in res.stderr
    ok = cli("config", "validate", str(a))
    assert ok.returncode == 0, ok.stderr


def test_validate_prints_warnings_and_still_exits_0(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    f.write_text(edit(SCALE, "port: /dev/ttyUSB0", "port: socket://127.0.0.1:4001"))
    res = cli("config", "validate", str(f))
    assert res.returncode == 0
    assert f"{f}: warning: drivers.scale.baudrate: has no effect on a socket:// port" in res.stderr


@pytest.mark.parametrize(("key", "value", "words"), [
    ("device_id", "ore 07", "must be 1 to 64 letters, digits, '_', '.' or '-'"),
    ("sync.topic_prefix", "site/#", "must be topic levels of letters, digits"),
    ("drivers.belt_weigher.slaves.0.name", "Weigher", "must be lower-case letters, digits and '_'"),
    ("drivers.belt_weigher.slaves.0.points.0.name", "rate-tph", "must be lower-case letters, digits and '_'"),
])
def test_a_pattern_mismatch_is_said_in_words(tmp_path: Path, key: str, value: str, words: str) -> None:
    import yaml

    raw = yaml.safe_load(ORE)
    _set(key, value)(raw)
    problems = [p for p in refused(tmp_path, yaml.safe_dump(raw, sort_keys=False)) if p.startswith(f"{key}:")]
    assert problems and problems[0].startswith(f"{key}: {words}") and f"(got {value!r})" in problems[0]
    assert "pattern" not in problems[0]


# --- thirty-odd misconfigurations, each refused with a message that names the fix ---------------------

def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def apply(raw: dict[str, Any]) -> None:
        node: Any
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return apply


_DELETE = object()
SC, OR = "scale", "ore"
MISCONFIGURATIONS = [  # (base file, edit, the start of the problem line, what it must say)
    (SC, _set("drivers.scale.baudrat", 9600), "drivers.scale.baudrat:", "did you mean 'baudrate'?"),
    (SC, _set("sync.ackmode", "hub"), "sync.ackmode:", "did you mean 'ack_mode'?"),
    (SC, _set("drivers.scale.driver", "toledo-continous"), "drivers.scale.driver:",
     "did you mean 'toledo-continuous'?"),
    (SC, _set("type", "scales"), "type:", "did you mean 'scale'?"),
    (SC, _set("x_extra", 1), "x_extra:", "expected one of: device_id, type"),
    (SC, _set("drivers.scale.port", _DELETE), "drivers.scale.port:", "required key is missing"),
    (SC, _set("drivers.scale.port", "10.0.0.5:4001"), "drivers.scale.port:", "written 'socket://10.0.0.5:4001'"),
    (SC, _set("drivers.scale.port", "tcp://scale-1.local:23"), "drivers.scale.port:", "'socket://scale-1.local:23'"),
    (SC, _set("drivers.scale.parity", "X"), "drivers.scale.parity:", "'N', 'E', 'O', 'M' or 'S'"),
    (SC, _set("drivers.scale.bytesize", 9), "drivers.scale.bytesize:", "5, 6, 7 or 8"),
    (SC, _set("drivers.scale.stopbits", 3), "drivers.scale.stopbits:", "must be 1, 1.5 or 2"),
    (SC, _set("drivers.scale.checksum", "maybe"), "drivers.scale.checksum:", "'auto', 'on' or 'off'"),
    (SC, _set("drivers.scale.read_timeout_s", 20), "drivers.scale.read_timeout_s:", "less than or equal to 10"),
    (SC, _set("drivers.scale.driver", "modbus-rtu"), "drivers.scale", "required key is missing"),
    (SC, _set("drivers", {"scael": {"driver": "toledo-continuous", "port": "/dev/ttyUSB0"}}), "drivers.scale:",
     "needs a driver named 'scale'"),
    (SC, _set("device_id", "scale 01"), "device_id:", "letters, digits, '_', '.' or '-'"),
    (SC, _set("device_id", _DELETE), "device_id:", "required key is missing"),
    (SC, _set("sync.topic_prefix", "site/#"), "sync.topic_prefix:", "no wildcards"),
    (SC, _set("sync.port", 70000), "sync.port:", "less than 65536"),
    (SC, _set("sync.port", "abc"), "sync.port:", "valid integer"),
    (SC, _set("sync.keepalive_s", 1), "sync.keepalive_s:", "greater than or equal to 2"),
    (SC, _set("sync.ack_mode", "never"), "sync.ack_mode:", "'hub' or 'broker'"),
    (SC, _set("outbox.max_mb", 0), "outbox.max_mb:", "greater than 0"),
    (SC, _set("outbox.synchronous", "OFF"), "outbox.synchronous:", "'FULL' or 'NORMAL'"),
    (SC, _set("log_level", "verbose"), "log_level:", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    (SC, _set("app.deadbnd", 1), "app.deadbnd:", "did you mean 'deadband'?"),
    (OR, _set("app.points", {"total_t": "total_tonnes"}), "app.points.total_t:", "did you mean 'total_t'?"),
    (OR, _set("drivers.belt_weigher.slaves.0.points.2.name", "totaliser"), "app.points.total_t:",
     "rename the point in drivers.belt_weigher or set app.points.total_t"),
    (OR, _set("drivers.analyser", _DELETE), "drivers.analyser:", "needs a driver named 'analyser'"),
    (OR, _set("drivers.belt_weigher.slaves.0.points.0.name", "Rate"), "drivers.belt_weigher.slaves.0.points.0.name:",
     "lower-case letters, digits and '_'"),
    (OR, _set("app.tml_pct", 50), "app.tml_pct:", "less than or equal to 40"),
    (OR, _set("drivers.analyser.port", "192.0.2.10:4001"), "drivers.analyser.port:", "'socket://192.0.2.10:4001'"),
]


@pytest.mark.parametrize(("base", "apply", "where", "fix"), MISCONFIGURATIONS,
                         ids=[f"{m[0]}-{m[2].rstrip(':')}-{i}" for i, m in enumerate(MISCONFIGURATIONS)])
def test_a_misconfiguration_names_its_key_its_line_and_the_fix(tmp_path: Path, base: str,
                                                               apply: Callable[[dict[str, Any]], None],
                                                               where: str, fix: str) -> None:
    import yaml

    raw = yaml.safe_load(ORE if base == OR else SCALE)
    apply(raw)
    problems = refused(tmp_path, yaml.safe_dump(raw, sort_keys=False))
    hits = [p for p in problems if p.startswith(where) and fix in p]
    assert hits, problems
    assert all("(line " in p for p in problems if not p.startswith(("device_id: required",)))



def test_a_model_manifest_that_is_missing_is_refused_on_its_line(tmp_path: Path, monkeypatch: Any) -> None:
    """Before: validated ok, then the unit failed to start when the app loaded its model."""
    monkeypatch.chdir(tmp_path)  # a relative path is read from the working directory, as the app does
    key = "model_manifest"
    missing = "models/ore.json"
    text = edit(ORE, "app:\n", f"app:\n  {key}: {missing}\n")
    (p,) = refused(tmp_path, text)
    assert p.startswith(f"app.{key}: model manifest '{missing}' cannot be read (No such file or directory)")
    assert "remove the key to use the shipped model" in p
    assert p.endswith(f"(line {line_of(text, key)})")


def test_a_gate_model_manifest_that_is_unreadable_is_refused(tmp_path: Path, monkeypatch: Any) -> None:
    gate = (REPO / "configs" / "gate.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    a_directory = "models"  # exists, but is no file to read
    (tmp_path / a_directory).mkdir()
    text = edit(gate, "app:\n", f"app:\n  model: {a_directory}\n")
    (p,) = refused(tmp_path, text)
    assert p.startswith(f"app.model: model manifest '{a_directory}' cannot be read (Is a directory)")
    assert p.endswith(f"(line {line_of(text, 'model: ')})")


def test_an_option_yaml_turned_into_a_boolean_names_the_quoted_form(tmp_path: Path) -> None:
    """`checksum: on` is the boolean true in YAML 1.1; the driver's option is one of 'auto', 'on', 'off'."""
    text = edit(SCALE, "checksum: auto", "checksum: on")
    (p,) = refused(tmp_path, text)
    assert p == ("drivers.scale.checksum: Input should be 'auto', 'on' or 'off'; YAML 1.1 reads on as the boolean"
                 f' true, not text: write it quoted, checksum: "on" (line {line_of(text, "checksum: on")})')
