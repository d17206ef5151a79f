"""The command line as a new user meets it: a version, help on every option and every simulator, and
one line naming the fix (never a traceback) for an expected failure."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from customs_edge.cli import main as cli_main
from customs_edge.simulators import SIMULATORS


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", *args], capture_output=True, text=True, timeout=60)


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"customs-edge {version('customs-edge')}"


def _parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [p]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                out += _parsers(sp)
    return out


def test_every_option_of_every_command_has_help_text() -> None:
    missing = [f"{p.prog} {a.dest}" for p in _parsers(cli_main.build_parser()) for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert missing == []


@pytest.mark.parametrize("sim", sorted(SIMULATORS))
def test_simulate_type_help_shows_that_simulators_options(sim: str) -> None:
    res = run("simulate", sim, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: customs-edge simulate {sim} ")
    assert "Traceback" not in res.stderr


def test_simulate_help_lists_the_types() -> None:
    res = run("simulate", "--help")
    assert res.returncode == 0, res.stderr
    assert all(t in res.stdout for t in SIMULATORS) and "simulate TYPE --help" in res.stdout


def test_an_os_error_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = run("demo", "--broker", "embedded", "--duration", "1", "--workdir", str(blocker / "sub"))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: ") and str(blocker) in res.stderr


def test_demo_without_mosquitto_names_the_embedded_broker(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import customs_edge.hub.brokers as brokers

    monkeypatch.setattr(brokers, "mosquitto_path", lambda: None)
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["demo", "--broker", "mosquitto", "--duration", "1"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "mosquitto is not installed" in err and "--broker embedded" in err


def test_run_logs_the_config_warnings(tmp_path: Path) -> None:
    from customs_edge.hub.brokers import free_port
    from customs_edge.simulators.base import Endpoints
    from customs_edge.simulators.scale import ScaleSim, ScaleWorld
    from tests.conftest import unit_dict, wait_for
    from tests.fleet import AgentProc

    with Endpoints(ScaleSim(ScaleWorld(seed=2), rate_hz=20), use_pty=False) as urls:
        cfg = unit_dict(tmp_path, urls["socket"], free_port())
        cfg["drivers"]["scale"]["baudrate"] = 19200  # ignored on a socket:// port
        agent = AgentProc(cfg, tmp_path).start()
        try:
            wait_for(lambda: "drivers.scale.baudrate: has no effect on a socket:// port" in agent.log_text(), 30,
                     "the warning in the agent's log")
        finally:
            agent.terminate()
