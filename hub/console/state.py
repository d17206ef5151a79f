"""The console's own file: users (scrypt password hashes), sessions, and the audit trail.

The audit trail is append-only: triggers refuse UPDATE and DELETE, and each row carries the HMAC-SHA256, under
a key kept outside this file (auditkey.py), of the previous row's hash and its own fields, so a row changed or
removed with another tool breaks the chain (`verify_audit`) even if the whole chain after it is recomputed.
A trail begun before the key (schema 1) keeps its plain SHA-256 rows up to the switch (`audit_key`), proven as
before. Sessions are stored by the hash of their token, so a copy of this file opens no session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from customs_edge.core.errors import CustomsEdgeError
from customs_edge.hub.console.auditkey import AuditKey, AuditKeyError

ROLES = ("officer", "technician", "admin")
# who may do what: officers and admins act on alerts and ask for remote inspection; technicians look
MAY = {"act": {"officer", "admin"}, "look": set(ROLES), "users": {"admin"}}
SESSION_S = 12 * 3600.0  # one shift
GENESIS = "0" * 64
_DECOY: str | None = None  # ConsoleState.decoy()
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # the cryptography docs' interactive-login parameters

SCHEMA = [
    """
    CREATE TABLE users (
        name    TEXT PRIMARY KEY,
        role    TEXT NOT NULL CHECK (role IN ('officer', 'technician', 'admin')),
        pw      TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,
        user       TEXT NOT NULL,
        role       TEXT NOT NULL,
        csrf       TEXT NOT NULL,
        expires    REAL NOT NULL
    );
    CREATE TABLE audit (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        at        REAL NOT NULL,
        user      TEXT NOT NULL,
        role      TEXT NOT NULL,
        action    TEXT NOT NULL,      -- ack, dispose, inspect, login, login_failed, logout, user_added
        device_id TEXT,
        seq       INTEGER,
        detail    TEXT NOT NULL,
        prev      TEXT NOT NULL,
        h         TEXT NOT NULL
    );
    CREATE INDEX audit_by_record ON audit (device_id, seq);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail cannot be edited'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail cannot be edited'); END;
    """,
]
# schema 2: the audit chain keyed (HMAC-SHA256); entries up to keyed_after are the plain SHA-256 chain of schema 1.
# Run by ConsoleState._key_the_trail in the transaction that makes the key, one statement at a time.
KEYED = [
    """CREATE TABLE audit_key (
        keyed_after INTEGER NOT NULL,
        mac         TEXT NOT NULL     -- AuditKey.switch_mac(keyed_after): a wrong key file shows at once
    )""",
    """CREATE TRIGGER audit_key_no_update BEFORE UPDATE ON audit_key
        BEGIN SELECT RAISE(ABORT, 'the audit trail cannot be edited'); END""",
    """CREATE TRIGGER audit_key_no_delete BEFORE DELETE ON audit_key
        BEGIN SELECT RAISE(ABORT, 'the audit trail cannot be edited'); END""",
]


class ConsoleError(CustomsEdgeError):
    """A console request that cannot be done as asked (an unknown user, a bad role)."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(password.encode())
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(key).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, key = stored.split("$")
        if kind != "scrypt":
            return False
        Scrypt(salt=base64.b64decode(salt), length=32, n=int(n), r=int(r), p=int(p)).verify(
            password.encode(), base64.b64decode(key))
        return True
    except (ValueError, InvalidKey):
        return False


def _audit_hash(prev: str, at: float, user: str, role: str, action: str, device_id: str | None, seq: int | None,
                detail: str, key: AuditKey | None = None) -> str:
    """HMAC-SHA256 under `key` of the entry's text; without a key (entries before the switch) its SHA-256."""
    text = json.dumps([prev, repr(at), user, role, action, device_id, seq, detail], separators=(",", ":")).encode()
    return key.mac(text) if key is not None else hashlib.sha256(text).hexdigest()


@dataclass(frozen=True)
class Session:
    user: str
    role: str
    csrf: str

    def may(self, what: str) -> bool:
        return self.role in MAY[what]


@dataclass(frozen=True)
class Action:
    id: int
    at: float
    user: str
    role: str
    action: str
    device_id: str | None
    seq: int | None
    detail: str


class ConsoleState:
    def __init__(self, path: str | Path, audit_key: str | Path | None = None, *, verify_only: bool = False) -> None:
        """`audit_key`: the audit chain's key file (default: beside this file, `<path>.key`), made on the first
        start if there is none. `verify_only`: a trail not keyed yet stays so (no key made, nothing recorded)."""
        self.path = Path(path)
        self.key_path = Path(audit_key) if audit_key else Path(f"{self.path}.key")
        self.key: AuditKey | None = None
        self.keyed_after = 0  # entries up to this id are proven by the plain SHA-256 chain
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # password hashes: for this user only (SQLite gives its -wal and -shm the same mode)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.lock = threading.Lock()  # one writer at a time from the server's threads
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        for v in range(version, len(SCHEMA)):
            self.db.executescript("BEGIN;" + SCHEMA[v] + f";PRAGMA user_version={v + 1};COMMIT;")
        if self.db.execute("PRAGMA user_version").fetchone()[0] < 2 and not verify_only:
            self._key_the_trail()
        self._open_key()

    def _key_the_trail(self) -> None:
        """Schema 1 -> 2: the switch point is the last entry so far; the key is made now (or, made by a start
        cut short before its commit, reused)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")  # no entry added between the count and the switch
            try:
                if self.db.execute("PRAGMA user_version").fetchone()[0] >= 2:  # another process was first
                    self.db.execute("ROLLBACK")
                    return
                last = self.db.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0]
                try:
                    key = AuditKey.create(self.key_path, last)
                except FileExistsError:
                    key = AuditKey.load(self.key_path)
                    if key.keyed_after < last:
                        raise AuditKeyError(
                            f"audit key {self.key_path} was made for a trail keyed after entry {key.keyed_after}, but"
                            f" {self.path} has {last} entries made without a key: give this file a key of its own"
                            " (--audit-key NEW-PATH, made on start), or restore the file the key belongs to") from None
                for stmt in KEYED:
                    self.db.execute(stmt)
                self.db.execute("INSERT INTO audit_key VALUES (?, ?)", (last, key.switch_mac(last)))
                self.db.execute("PRAGMA user_version=2")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _open_key(self) -> None:
        """The trail's key and switch point, checked: a missing or wrong key is an error naming the file."""
        if self.db.execute("PRAGMA user_version").fetchone()[0] < 2:  # verify_only, a trail from before keys
            if self.key_path.exists():  # a key was made for it: what follows its switch must be keyed
                self.key = AuditKey.load(self.key_path)
                self.keyed_after = self.key.keyed_after
            else:
                self.keyed_after = 1 << 62
            return
        key = AuditKey.load(self.key_path)
        row = self.db.execute("SELECT keyed_after, mac FROM audit_key").fetchone()
        after = row[0] if row else 0  # the switch removed: every entry must be keyed
        if row is not None and not hmac.compare_digest(key.switch_mac(after), str(row[1])):
            raise AuditKeyError(f"audit key {self.key_path} is not the key of {self.path}'s audit trail (or the"
                                " trail's switch record was edited): give the right one with --audit-key (by default"
                                f" the console's file's own, beside it: {self.path}.key)")
        self.key, self.keyed_after = key, min(after, key.keyed_after)

    # -- users --------------------------------------------------------------------------------------
    def add_user(self, name: str, role: str, password: str, *, by: str = "cli") -> None:
        if role not in ROLES:
            raise ConsoleError(f"role {role!r}: one of {', '.join(ROLES)}")
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConsoleError(f"user name {name!r}: letters, digits, '-', '_' and '.', at most 64")
        if len(password) < 10:
            raise ConsoleError("the password must have at least 10 characters")
        with self.lock:
            self.db.execute("INSERT INTO users VALUES (?,?,?,?) ON CONFLICT(name) DO UPDATE SET role = excluded.role,"
                            " pw = excluded.pw", (name, role, hash_password(password), time.time()))
            self.db.execute("DELETE FROM sessions WHERE user = ?", (name,))  # a new password ends old sessions
        self.record(by, "admin" if by != "cli" else "cli", "user_added", detail=f"{name} ({role})")

    def users(self) -> list[tuple[str, str]]:
        return self.db.execute("SELECT name, role FROM users ORDER BY name").fetchall()

    # -- sessions -----------------------------------------------------------------------------------
    def login(self, name: str, password: str, *, addr: str = "") -> str | None:
        """A new session's token, or None (the failure is in the audit trail, with the client's address)."""
        row = self.db.execute("SELECT role, pw FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            check_password(password, self.decoy())  # one scrypt, as a wrong password costs
        if row is None or not check_password(password, row[1]):
            self.record(name[:64] or "-", "-", "login_failed", detail=addr)
            return None
        token = secrets.token_urlsafe(32)
        with self.lock:
            self.db.execute("DELETE FROM sessions WHERE expires < ?", (time.time(),))
            self.db.execute("INSERT INTO sessions VALUES (?,?,?,?,?)", (_token_hash(token), name, row[0],
                                                                        secrets.token_urlsafe(32),
                                                                        time.time() + SESSION_S))
        self.record(name, row[0], "login", detail=addr)
        return token

    @staticmethod
    def decoy() -> str:
        """A hash no password matches, made once: checked for a name that is no user."""
        global _DECOY
        if _DECOY is None:
            _DECOY = hash_password(secrets.token_urlsafe(32))
        return _DECOY

    def session(self, token: str | None) -> Session | None:
        if not token:
            return None
        row = self.db.execute("SELECT user, role, csrf FROM sessions WHERE token_hash = ? AND expires > ?",
                              (_token_hash(token), time.time())).fetchone()
        return None if row is None else Session(*row)

    def logout(self, token: str) -> None:
        s = self.session(token)
        with self.lock:
            self.db.execute("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),))
        if s:
            self.record(s.user, s.role, "logout")

    # -- the audit trail ----------------------------------------------------------------------------
    def record(self, user: str, role: str, action: str, device_id: str | None = None, seq: int | None = None,
               detail: str = "") -> Action:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT h FROM audit ORDER BY id DESC LIMIT 1").fetchone()
                prev = row[0] if row else GENESIS
                at = time.time()
                if self.key is None:
                    raise ConsoleError(f"{self.path} was opened to verify its audit trail only")
                h = _audit_hash(prev, at, user, role, action, device_id, seq, detail, self.key)
                cur = self.db.execute("INSERT INTO audit (at, user, role, action, device_id, seq, detail, prev, h)"
                                      " VALUES (?,?,?,?,?,?,?,?,?)",
                                      (at, user, role, action, device_id, seq, detail, prev, h))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return Action(int(cur.lastrowid or 0), at, user, role, action, device_id, seq, detail)

    def actions(self, device_id: str, seq: int) -> list[Action]:
        return [Action(*r) for r in self.db.execute(
            "SELECT id, at, user, role, action, device_id, seq, detail FROM audit WHERE device_id = ? AND seq = ?"
            " ORDER BY id", (device_id, seq))]

    def states(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """new / acknowledged / disposed, per (device_id, seq)."""
        out: dict[tuple[str, int], str] = {}
        for i in range(0, len(keys), 400):
            chunk = keys[i:i + 400]
            where = " OR ".join("(device_id = ? AND seq = ?)" for _ in chunk)
            for d, s, act in self.db.execute(f"SELECT device_id, seq, action FROM audit WHERE action IN ('ack',"
                                             f" 'dispose') AND ({where})", [x for k in chunk for x in k]):
                if act == "dispose" or out.get((d, s)) != "disposed":
                    out[(d, s)] = "disposed" if act == "dispose" else "acknowledged"
        return {k: out.get(k, "new") for k in keys}

    def labels(self, keys: list[tuple[str, int]] | None = None) -> dict[tuple[str, int], Action]:
        """The latest specialist's label (a `label` action) per identification, of `keys` or of all."""
        rows = self.db.execute("SELECT id, at, user, role, action, device_id, seq, detail FROM audit WHERE"
                               " action = 'label' ORDER BY id").fetchall()
        out = {(r[5], r[6]): Action(*r) for r in rows}
        return out if keys is None else {k: out[k] for k in keys if k in out}

    def audit(self, limit: int = 200) -> list[Action]:
        return [Action(*r) for r in self.db.execute(
            "SELECT id, at, user, role, action, device_id, seq, detail FROM audit ORDER BY id DESC LIMIT ?",
            (limit,))]

    def verify_audit(self) -> tuple[int, int | None]:
        """(rows proven, the id of the first row whose hash or link is wrong, or None)."""
        prev = GENESIS
        n = 0
        for id_, at, user, role, action, device_id, seq, detail, p, h in self.db.execute(
                "SELECT id, at, user, role, action, device_id, seq, detail, prev, h FROM audit ORDER BY id"):
            key = self.key if id_ > self.keyed_after else None
            if p != prev or not hmac.compare_digest(_audit_hash(p, at, user, role, action, device_id, seq, detail, key),
                                                    str(h)):
                return n, id_
            prev, n = h, n + 1
        return n, None

    def close(self) -> None:
        self.db.close()


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
