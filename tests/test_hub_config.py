"""`customs-edge hub --config FILE`: the hub's config file, validated like a unit's (file, line, key, fix),
options on top, secrets from files (systemd credentials), never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from customs_edge.cli.hubconfig import load_hub_config
from customs_edge.core.errors import ConfigError
from tests.cmdtools import cli

ROOT = Path(__file__).resolve().parent.parent


def problems(path: Path, overrides: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_hub_config(path, overrides)
    assert str(path) in str(exc.value)
    return exc.value.problems


def test_the_shipped_hub_config_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "hub", "--config", str(ROOT / "configs" / "hub" / "hub.yaml"),
                         "--db", str(tmp_path / "hub.db"), "--check-config")
    assert code == 0, err
    assert "ok (broker 127.0.0.1:1883" in out
    assert not (tmp_path / "hub.db").exists()  # checking creates nothing


def test_options_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "hub.yaml"
    f.write_text(f"host: 10.0.0.5\nport: 1883\ndb: {tmp_path}/hub.db\nshare_group: null\n")
    cfg = load_hub_config(f, {"port": 8883})
    assert (cfg.host, cfg.port, cfg.share_group, cfg.db) == ("10.0.0.5", 8883, None, tmp_path / "hub.db")
    assert load_hub_config(None, {"db": tmp_path / "x.db"}).port == 1883  # flags alone still work


def test_each_mistake_names_its_line_and_the_fix(tmp_path: Path) -> None:
    f = tmp_path / "hub.yaml"
    f.write_text(f"host: 127.0.0.1\nprot: 1883\nport: eighty\ndb: {tmp_path}/hub.db\nshare_group: no\n"
                 "keepalive_s: 10\n")
    lines = problems(f)
    assert any(p.startswith("prot: unknown key (did you mean 'port'?)") and p.endswith("(line 2)") for p in lines)
    assert any(p.startswith("port: ") and "eighty" in p and p.endswith("(line 3)") for p in lines)
    assert any(p.startswith("share_group: YAML 1.1 reads no as the boolean false") and 'share_group: "no"' in p
               and p.endswith("(line 5)") for p in lines), lines


def test_an_option_error_names_the_option_not_a_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "hub.yaml"
    f.write_text(f"port: 1883\ndb: {tmp_path}/hub.db\n")
    code, _, err = cli(capsys, "hub", "--config", str(f), "--port", "70000", "--check-config")
    assert code == 1
    assert "--port (option): " in err and "(line" not in err and "Traceback" not in err


def test_files_the_hub_reads_must_exist(tmp_path: Path) -> None:
    f = tmp_path / "hub.yaml"
    f.write_text(f"db: {tmp_path}/nodir/hub.db\ntls_ca: {tmp_path}/ca.pem\nkeys: {tmp_path}/keys.txt\n")
    lines = problems(f)
    assert any(f"tls_ca: {tmp_path}/ca.pem: no such file" in p and "(line 2)" in p for p in lines), lines
    assert any(f"keys: {tmp_path}/keys.txt: no such file" in p and "(line 3)" in p for p in lines), lines
    assert any(f"the directory {tmp_path}/nodir does not exist" in p and "(line 1)" in p for p in lines), lines


def test_secrets_come_from_credential_files_and_are_never_echoed(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cred_password").write_text("s3cret-pw\n")
    f = tmp_path / "hub.yaml"
    f.write_text(f"db: {tmp_path}/hub.db\nusername: hub-01\npassword_file: ${{CREDENTIALS_DIRECTORY}}/cred_password\n")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    lines = problems(f)
    assert len(lines) == 1 and "LoadCredential=" in lines[0] and "(line 3)" in lines[0]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_hub_config(f)
    assert cfg.credentials()["password"] == "s3cret-pw" and "s3cret" not in repr(cfg)
    # a password in the file and a password file: refused, and the password is not shown
    f.write_text(f"db: {tmp_path}/hub.db\npassword: s3cret-pw\npassword_file: {creds}/cred_password\n")
    assert all("s3cret" not in p for p in problems(f))
    f.write_text(f"db: {tmp_path}/hub.db\npassword: [s3cret-pw]\n")
    lines = problems(f)
    assert lines and all("s3cret" not in p for p in lines) and "(line 2)" in lines[0]


def test_empty_and_broken_files_are_named(tmp_path: Path) -> None:
    f = tmp_path / "hub.yaml"
    f.write_text("")
    assert "configs/hub/hub.yaml is an example" in problems(f)[0]
    f.write_text("port: [1883\n")
    assert problems(f)[0].startswith("not valid YAML")
    assert "cannot read" in problems(tmp_path / "missing.yaml")[0]
