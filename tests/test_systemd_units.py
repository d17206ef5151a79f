"""The shipped systemd units: `systemd-analyze verify` passes, `systemd-analyze security` scores each at or below
2.5, and the agent, the hub and the officers' console still do their job under the units' process restrictions
(tests/unit_sandbox.py applies them without systemd as PID 1: system call filter, MemoryDenyWriteExecute, address
families, capabilities). systemd-analyze missing fails the tests when CI is set (apt-get install systemd)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from customs_edge.hub.brokers import Mosquitto
from tests.conftest import need_mosquitto, wait_for
from tests.unit_sandbox import unit_settings

ROOT = Path(__file__).resolve().parent.parent
AGENT_UNIT = ROOT / "systemd" / "customs-edge@.service"
HUB_UNIT = ROOT / "systemd" / "customs-edge-hub.service"
CONSOLE_UNIT = ROOT / "systemd" / "customs-edge-console.service"
CONSOLE_ENV = ROOT / "configs" / "console" / "console.env"
INSTALLED = "/opt/customs-edge/.venv/bin/customs-edge"
MAX_EXPOSURE = 2.5


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is not installed and CI is set: the unit tests must run "
                        "(apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    return exe


def local_copy(unit: Path, tmp_path: Path, name: str) -> Path:
    """The unit with its executable pointed at this checkout's entry point: `verify` checks that ExecStart's
    program exists, and /opt/customs-edge is only there after install.sh."""
    exe = Path(sys.executable).with_name("customs-edge")
    out = tmp_path / name
    out.write_text(unit.read_text().replace(INSTALLED, str(exe if exe.exists() else sys.executable)))
    return out


@pytest.mark.parametrize(("unit", "name"), [(AGENT_UNIT, "customs-edge@ore-01.service"),
                                            (HUB_UNIT, "customs-edge-hub.service"),
                                            (CONSOLE_UNIT, "customs-edge-console.service")])
def test_unit_passes_systemd_analyze_verify(unit: Path, name: str, tmp_path: Path) -> None:
    exe = systemd_analyze()
    r = subprocess.run([exe, "verify", "--man=no", str(local_copy(unit, tmp_path, name))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert name not in r.stderr, r.stderr  # no warning about our unit (unknown keys, bad values)


@pytest.mark.parametrize("unit", [AGENT_UNIT, HUB_UNIT, CONSOLE_UNIT], ids=["agent", "hub", "console"])
def test_unit_exposure_is_at_most_2_5(unit: Path) -> None:
    exe = systemd_analyze()
    r = subprocess.run([exe, "security", "--offline=true", "--threshold=25", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout
    assert r.returncode == 0, r.stdout  # --threshold=25: above 2.5 is an error


def test_units_carry_the_fences_the_issue_names() -> None:
    """What the score alone would let slip: each named directive is set as documented."""
    for unit in (AGENT_UNIT, HUB_UNIT, CONSOLE_UNIT):
        s = unit_settings(unit)
        assert s["CapabilityBoundingSet"] == [""] and s["NoNewPrivileges"] == ["yes"]
        assert s["SystemCallFilter"][0] == "@system-service" and s["SystemCallArchitectures"] == ["native"]
        assert s["MemoryDenyWriteExecute"] == ["yes"] and s["UMask"] == ["0077"] and "MemoryMax" in s
        assert s["DevicePolicy"] == ["closed"]
    agent = unit_settings(AGENT_UNIT)
    assert {d.split()[0] for d in agent["DeviceAllow"]} == {
        "char-ttyUSB", "char-ttyACM", "char-ttyAMA", "char-ttyS", "char-video4linux"}
    assert agent["User"] == ["customs-edge"] and unit_settings(HUB_UNIT)["DynamicUser"] == ["yes"]


def sandboxed(unit: Path, argv: list[str]) -> list[str]:
    """The unit's restrictions, then `customs-edge ARGS` of this checkout (the same command line)."""
    return [sys.executable, str(ROOT / "tests" / "unit_sandbox.py"), str(unit), "--",
            sys.executable, "-m", "customs_edge", *argv]


def unit_args(unit: Path, key: str, subst: dict[str, str]) -> list[str]:
    """The arguments of the unit's `key` command after the program, with its paths moved to the test's."""
    words = unit_settings(unit)[key][-1].split()
    assert words[0] == INSTALLED, words
    out = []
    for w in words[1:]:
        for a, b in subst.items():
            w = w.replace(a, b)
        out.append(w)
    return out


def test_the_sandbox_really_applies_the_restrictions(tmp_path: Path) -> None:
    """Without this, the runs below could pass because nothing was restricted."""
    systemd_analyze()
    probe = ("import mmap, os, socket\n"
             "def tries(f):\n"
             "    try:\n        f()\n        return 'allowed'\n"
             "    except OSError as e:\n        return e.errno\n"
             "print(tries(lambda: mmap.mmap(-1, 4096, prot=7)), tries(lambda: os.setgroups([])),"
             " tries(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),"
             " tries(lambda: os.sched_setaffinity(0, {0})))")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "unit_sandbox.py"), str(AGENT_UNIT), "--",
                        sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1", "97", "1"], r.stdout + r.stderr  # EPERM, EPERM, EAFNOSUPPORT, EPERM


@pytest.fixture
def gate_sim() -> Iterator[dict[str, dict[str, str]]]:
    proc = subprocess.Popen([sys.executable, "-m", "customs_edge", "simulate", "gate", "--seed", "3", "--speed", "30",
                             "--rate-per-h", "4000"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        yield json.loads(proc.stdout.readline())["urls"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_agent_and_hub_work_under_their_units_restrictions(tmp_path: Path,
                                                           gate_sim: dict[str, dict[str, str]]) -> None:
    """A gate unit (serial thermal frames -> ONNX fever model -> SQLite outbox -> MQTT) and the hub run their
    units' command lines under the units' system call filters and MemoryDenyWriteExecute; screenings (the
    model's output) reach the hub's database."""
    systemd_analyze()
    need_mosquitto()
    broker = Mosquitto(tmp_path / "broker", persistence=False).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        etc, hub_dir = tmp_path / "etc", tmp_path / "hub"
        etc.mkdir()
        hub_dir.mkdir()
        cfg = yaml.safe_load((ROOT / "configs" / "gate.yaml").read_text())
        cfg["device_id"] = "gate-sbx"
        cfg["app"]["warmup_s"] = 0
        for role, urls in gate_sim.items():
            cfg["drivers"][role]["port"] = urls["socket"]
        cfg["outbox"]["path"] = str(tmp_path / "agent" / "outbox.db")
        cfg["sync"].update(host="127.0.0.1", port=broker.port)
        (etc / "gate-sbx.yaml").write_text(yaml.safe_dump(cfg))
        (etc / "hub.yaml").write_text(yaml.safe_dump({"host": "127.0.0.1", "port": broker.port, "parse_process": True,
                                                      "db": str(hub_dir / "hub.db")}))
        subst = {"/etc/customs-edge/%i.yaml": str(etc / "gate-sbx.yaml"), "/etc/customs-edge/": f"{etc}/",
                 "/var/lib/customs-edge-hub/": f"{hub_dir}/"}
        logs = tmp_path / "logs"
        logs.mkdir()
        for unit in (HUB_UNIT, AGENT_UNIT):  # the config checks systemd runs first
            pre = subprocess.run(sandboxed(unit, unit_args(unit, "ExecStartPre", subst)),
                                 capture_output=True, text=True, timeout=60)
            assert pre.returncode == 0, pre.stdout + pre.stderr
        procs.append(subprocess.Popen(sandboxed(HUB_UNIT, unit_args(HUB_UNIT, "ExecStart", subst)),
                                      stderr=(logs / "hub.log").open("wb")))
        procs.append(subprocess.Popen(sandboxed(AGENT_UNIT, unit_args(AGENT_UNIT, "ExecStart", subst)),
                                      stderr=(logs / "agent.log").open("wb")))
        hub_db = hub_dir / "hub.db"

        def screenings_at_hub() -> int:
            for p in procs:
                assert p.poll() is None, ((logs / "agent.log").read_text()[-3000:]
                                          + (logs / "hub.log").read_text()[-3000:])
            if not hub_db.exists():
                return 0
            with sqlite3.connect(f"file:{hub_db}?mode=ro", uri=True) as db:
                try:
                    return int(db.execute("SELECT count(*) FROM records WHERE type = 'screening'").fetchone()[0])
                except sqlite3.OperationalError:
                    return 0

        wait_for(screenings_at_hub, 60, "screenings (the fever model's output) stored by the sandboxed hub")
        agent_log = (logs / "agent.log").read_text()
        assert "Operation not permitted" not in agent_log and "Traceback" not in agent_log, agent_log[-3000:]
        hub_log = (logs / "hub.log").read_text()
        assert "Traceback" not in hub_log
        # the shipped hub.yaml's parse process (hub/parser.py) runs inside the unit's fence: started, never lost
        assert "parse process started" in hub_log and "parse process lost" not in hub_log, hub_log[-3000:]
        assert "parse process did not start" not in hub_log, hub_log[-3000:]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        broker.stop()


def env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads it: KEY=value lines, `#` comments."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def exec_words(unit: Path, env: dict[str, str], creds: Path, subst: dict[str, str]) -> list[str]:
    """ExecStart's arguments after the program as systemd builds them: `$VAR` alone is split into words (none
    if empty), `${VAR}` is put in place, `%d` is the credentials directory; then the unit's paths moved."""
    words = shlex.split(unit_settings(unit)["ExecStart"][-1])
    assert words[0] == INSTALLED, words
    out: list[str] = []
    for w in words[1:]:
        if re.fullmatch(r"\$[A-Z_]+", w):
            out += env[w[1:]].split()
            continue
        w = re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], w.replace("%d", str(creds)))
        for a, b in subst.items():
            w = w.replace(a, b)
        out.append(w)
    return out


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_the_console_shares_the_hub_s_user_and_keeps_its_audit_key_apart() -> None:
    """The console reads hub.db in the hub's 0700 state directory: both units are the one dynamic user (systemd
    keys dynamic users by name) and the console names that directory too. Its own file and its audit key lie in
    two other state directories (backed up apart); the first-user command in install.sh and docs/console.md runs
    with that identity and those paths, so the files it makes are the console's."""
    hub, console = unit_settings(HUB_UNIT), unit_settings(CONSOLE_UNIT)
    assert hub["DynamicUser"] == console["DynamicUser"] == ["yes"] and hub["User"] == console["User"]
    dirs = console["StateDirectory"][-1].split()
    assert hub["StateDirectory"][-1] in dirs and console["StateDirectoryMode"] == ["0700"]
    words = shlex.split(console["ExecStart"][-1])
    state, key = option(words, "--state"), option(words, "--audit-key")
    assert state.split("/")[3] in dirs and key.split("/")[3] in dirs and state.split("/")[3] != key.split("/")[3]
    assert state.split("/")[3] != hub["StateDirectory"][-1] and key.split("/")[3] != hub["StateDirectory"][-1]
    hub_db = yaml.safe_load((ROOT / "configs" / "hub" / "hub.yaml").read_text())["db"]
    assert env_file(CONSOLE_ENV)["CONSOLE_DB"] == hub_db
    install = (ROOT / "systemd" / "install.sh").read_text()
    cmd = re.search(r"console_user_cmd='([^']+)'", install)
    assert cmd, "install.sh prints the first-user command"
    docs = (ROOT / "docs" / "console.md").read_text()
    assert " ".join(cmd.group(1).replace("NAME", "ops").split()) in " ".join(docs.replace("\\\n", " ").split())
    argv = shlex.split(cmd.group(1))
    props = [argv[i + 1] for i, a in enumerate(argv) if a == "-p"]
    assert f"User={console['User'][-1]}" in props and f"StateDirectory={' '.join(dirs)}" in props
    assert "DynamicUser=yes" in props and f"UMask={console['UMask'][-1]}" in props
    assert option(argv, "--state") == state and option(argv, "--audit-key") == key


def test_the_console_serves_its_login_under_its_unit_s_restrictions(tmp_path: Path) -> None:
    """The console's own command line (from the unit and the shipped console.env) under the unit's system call
    filter, MemoryDenyWriteExecute and address families: TLS from the credentials directory, a user added the
    way the docs say, the login page served over HTTPS on 127.0.0.1 and a login (scrypt, session and audit trail
    written to its state file, the audit key made 0600) against a hub file made by the hub's own store."""
    systemd_analyze()
    from customs_edge.cli import certs
    from tests.consolekit import Client, gate_records, put

    hub_dir, state_dir, key_dir, creds = (tmp_path / d for d in ("hub", "console", "audit", "creds"))
    for d in (hub_dir, state_dir, key_dir, creds):
        d.mkdir()
    put(hub_dir / "hub.db", "gate-01", gate_records())
    env = env_file(CONSOLE_ENV) | {"CONSOLE_LISTEN": "127.0.0.1:0"}
    ca = tmp_path / "ca"
    certs.init_ca(ca)
    crt, key = certs.issue(ca, "console.local", "broker", sans=["127.0.0.1"])
    shutil.copyfile(crt, creds / f"cred_{env['CONSOLE_TLS_CERT']}")
    shutil.copyfile(key, creds / f"cred_{env['CONSOLE_TLS_KEY']}")
    subst = {"/var/lib/customs-edge-hub/": f"{hub_dir}/", "/var/lib/customs-edge-console/": f"{state_dir}/",
             "/var/lib/customs-edge-console-audit/": f"{key_dir}/"}
    argv = exec_words(CONSOLE_UNIT, env, creds, subst)
    assert argv[:2] == ["console", "serve"] and option(argv, "--db") == str(hub_dir / "hub.db")
    (tmp_path / "pw").write_text("correct horse battery\n")
    add = subprocess.run(sandboxed(CONSOLE_UNIT, ["console", "user", "ops", "--role", "admin", "--password-file",
                                                  str(tmp_path / "pw"), "--state", option(argv, "--state"),
                                                  "--audit-key", option(argv, "--audit-key")]),
                         capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stdout + add.stderr
    assert (key_dir / "audit.key").is_file() and not list(state_dir.glob("*.key"))  # the key apart from the file
    log = tmp_path / "console.log"
    proc = subprocess.Popen(sandboxed(CONSOLE_UNIT, argv), stdout=subprocess.PIPE, stderr=log.open("wb"), text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "console: URL ..." once it listens; EOF if it died
        assert first.startswith("console: https://127.0.0.1:"), first + log.read_text()[-3000:]
        client = Client(first.split()[1].rstrip("/"))
        ctx = ssl.create_default_context(cafile=str(ca / "ca.crt"))
        import urllib.request

        client.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(client.jar),
                                                    urllib.request.HTTPSHandler(context=ctx))
        status, page = client.get("/login")
        assert status == 200 and 'name=password' in page, page[:500]
        status, page = client.login("ops", "correct horse battery")
        assert status == 200 and "Alerts" in page, page[:500]
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)
    text = log.read_text()
    assert "Traceback" not in text and "Operation not permitted" not in text, text[-3000:]
    assert (key_dir / "audit.key").stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(f"file:{state_dir / 'console.db'}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM audit WHERE action = 'login'").fetchone()[0] == 1
