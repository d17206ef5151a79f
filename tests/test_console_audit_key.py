"""The console's audit chain is keyed: an HMAC-SHA256 under a key file outside the console's database. Someone
who can write the database (drop its triggers, edit an entry, recompute every hash after it) cannot make a chain
that proves; a console file from before the key keeps its plain SHA-256 entries up to the switch and goes on
keyed; a missing or wrong key is an error that names the file (`customs-edge console verify-audit`)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
from pathlib import Path

import pytest

from customs_edge.hub.console.auditkey import AuditKeyError
from customs_edge.hub.console.state import GENESIS, SCHEMA, ConsoleState, _audit_hash
from tests.cmdtools import cli

COLS = "id, at, user, role, action, device_id, seq, detail, prev, h"


def _trail(st: ConsoleState) -> None:
    st.record("li", "officer", "login", detail="127.0.0.1")
    st.record("li", "officer", "ack", "gate-01", 2)
    st.record("li", "officer", "dispose", "gate-01", 2, "seized")
    st.record("li", "officer", "logout")


def _forge(db_path: Path, sql: str) -> None:
    """What a tool with write access to the file can do: drop the triggers, edit, and recompute the whole chain
    as the unkeyed code did (SHA-256 of the previous hash and the fields)."""
    db = sqlite3.connect(db_path)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute(sql)
    prev = GENESIS
    for id_, at, user, role, action, device_id, seq, detail, _, _ in db.execute(
            f"SELECT {COLS} FROM audit ORDER BY id").fetchall():
        h = _audit_hash(prev, at, user, role, action, device_id, seq, detail)
        db.execute("UPDATE audit SET prev = ?, h = ? WHERE id = ?", (prev, h, id_))
        prev = h
    db.commit()
    db.close()


def test_an_edit_with_the_chain_recomputed_without_the_key_is_found(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "console.db"
    st = ConsoleState(path)
    _trail(st)
    assert st.verify_audit() == (4, None)
    st.close()
    _forge(path, "UPDATE audit SET detail = 'released' WHERE action = 'dispose'")
    st = ConsoleState(path)
    assert st.verify_audit() == (0, 1)  # every recomputed hash is wrong: the first entry already
    st.close()
    code, out, _ = cli(capsys, "console", "verify-audit", "--state", str(path))
    assert code == 1 and "ALTERED at entry 1" in out and str(path) in out


def test_the_key_file_is_the_owner_s_made_once_and_not_in_the_database(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "console.db"
    ConsoleState(path).close()
    key = tmp_path / "console.db.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = json.loads(key.read_text())["key"]
    assert len(bytes.fromhex(secret)) == 32 and secret.encode() not in path.read_bytes()
    st = ConsoleState(path)  # the next start reads it, does not make another
    _trail(st)
    st.close()
    assert json.loads(key.read_text())["key"] == secret
    code, out, _ = cli(capsys, "console", "verify-audit", "--state", str(path))
    assert code == 0 and "intact, 4 entries proven" in out and str(key) in out
    elsewhere = tmp_path / "keys" / "audit.key"  # --audit-key: kept apart from the console's file
    ConsoleState(tmp_path / "other.db", elsewhere).close()
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o600 and not (tmp_path / "other.db.key").exists()


def _old_console_file(path: Path, n: int) -> None:
    """A console file as the code before keys wrote it: schema 1, an unkeyed SHA-256 chain."""
    db = sqlite3.connect(path)
    db.executescript("BEGIN;" + SCHEMA[0] + ";PRAGMA user_version=1;COMMIT;")
    prev = GENESIS
    for i in range(n):
        at = 1_780_000_000.0 + i
        h = _audit_hash(prev, at, "li", "officer", "ack", "gate-01", i, "")
        db.execute("INSERT INTO audit (at, user, role, action, device_id, seq, detail, prev, h) VALUES"
                   " (?,?,?,?,?,?,?,?,?)", (at, "li", "officer", "ack", "gate-01", i, "", prev, h))
        prev = h
    db.commit()
    db.close()


def test_an_old_unkeyed_trail_still_proves_and_goes_on_keyed(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "console.db"
    _old_console_file(path, 3)
    code, out, _ = cli(capsys, "console", "verify-audit", "--state", str(path))  # verifying keys nothing
    assert code == 0 and "3 entries proven" in out and "not keyed yet" in out
    assert not (tmp_path / "console.db.key").exists()
    st = ConsoleState(path)  # the first start: the key made, the switch after entry 3
    assert json.loads((tmp_path / "console.db.key").read_text())["keyed_after"] == 3
    _trail(st)
    assert st.verify_audit() == (7, None)
    rows = st.db.execute(f"SELECT {COLS} FROM audit ORDER BY id").fetchall()
    plain = [_audit_hash(*r[8:9], *r[1:8]) == r[9] for r in rows]
    assert plain == [True] * 3 + [False] * 4  # keyed after the switch only
    st.close()
    code, out, _ = cli(capsys, "console", "verify-audit", "--state", str(path))
    assert code == 0 and "7 entries proven" in out and "after entry 3" in out
    # an old entry edited (its plain chain recomputed) is found as before; so is a keyed one
    _forge(path, "UPDATE audit SET user = 'someone' WHERE id = 2")
    st = ConsoleState(path)
    assert st.verify_audit() == (3, 4)  # the old three re-chained by the forger; the first keyed one betrays it
    st.close()
    for f in tmp_path.glob("console.db*"):  # a new console file beside the old key: keyed from its start
        if f.suffix != ".key":
            f.unlink()
    st = ConsoleState(path)
    _trail(st)
    assert (st.keyed_after, st.verify_audit()) == (0, (4, None))
    st.close()


def test_a_trail_made_to_look_older_than_its_key_proves_nothing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The switch point moved: the keyed rows recomputed unkeyed, the switch record dropped, schema 1 again."""
    path = tmp_path / "console.db"
    st = ConsoleState(path)
    _trail(st)
    st.close()
    db = sqlite3.connect(path)
    db.executescript("DROP TRIGGER audit_key_no_delete; DELETE FROM audit_key; DROP TABLE audit_key;"
                     " PRAGMA user_version=1;")
    db.close()
    _forge(path, "UPDATE audit SET detail = 'released' WHERE action = 'dispose'")
    code, out, _ = cli(capsys, "console", "verify-audit", "--state", str(path))
    assert code == 1 and "ALTERED at entry 1" in out
    with pytest.raises(AuditKeyError, match="made for a trail keyed after entry 0"):
        ConsoleState(path)


def test_a_switch_point_moved_later_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Moving the switch after the edited entries would let their plain SHA-256 prove: its record's HMAC says no."""
    path = tmp_path / "console.db"
    st = ConsoleState(path)
    _trail(st)
    st.close()
    db = sqlite3.connect(path)
    db.executescript("DROP TRIGGER audit_key_no_update; UPDATE audit_key SET keyed_after = 4;")
    db.close()
    _forge(path, "UPDATE audit SET detail = 'released' WHERE action = 'dispose'")
    with pytest.raises(AuditKeyError, match="switch record was edited"):
        ConsoleState(path)
    code, _, err = cli(capsys, "console", "verify-audit", "--state", str(path))
    assert code == 1 and "switch record was edited" in err


def test_a_missing_or_wrong_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, key = tmp_path / "console.db", tmp_path / "console.db.key"
    st = ConsoleState(path)
    _trail(st)
    st.close()
    ConsoleState(tmp_path / "other.db").close()  # another console's key
    code, _, err = cli(capsys, "console", "verify-audit", "--state", str(path), "--audit-key",
                       str(tmp_path / "other.db.key"))
    assert code == 1 and f"audit key {tmp_path / 'other.db.key'} is not the key of {path}" in err
    with pytest.raises(AuditKeyError, match="is not the key of"):
        ConsoleState(path, tmp_path / "other.db.key")  # the console does not start with it either
    key.chmod(0o644)
    code, _, err = cli(capsys, "console", "verify-audit", "--state", str(path))
    assert code == 1 and f"audit key {key} is readable by others" in err
    key.rename(tmp_path / "moved.key")
    code, _, err = cli(capsys, "console", "verify-audit", "--state", str(path))
    assert code == 1 and f"audit key {key} is missing" in err
    with pytest.raises(AuditKeyError, match="is missing"):
        ConsoleState(path)  # never a new key for a keyed trail: its entries would all look altered
    assert not key.exists()
    (tmp_path / "moved.key").chmod(0o600)
    code, out, _ = cli(capsys, "console", "verify-audit", "--state", str(path), "--audit-key",
                       str(tmp_path / "moved.key"))
    assert code == 0 and "intact, 4 entries proven" in out
    key.write_text("not json")
    key.chmod(0o600)
    code, _, err = cli(capsys, "console", "verify-audit", "--state", str(path))
    assert code == 1 and f"audit key {key} is not a console audit key" in err


def test_the_unkeyed_hash_is_unchanged(tmp_path: Path) -> None:
    """Old files are proven by the same text as before: sha256 of the JSON list."""
    text = json.dumps([GENESIS, repr(1.5), "li", "officer", "ack", "gate-01", 2, ""], separators=(",", ":"))
    assert _audit_hash(GENESIS, 1.5, "li", "officer", "ack", "gate-01", 2, "") == hashlib.sha256(
        text.encode()).hexdigest()
