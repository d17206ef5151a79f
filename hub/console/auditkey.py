"""The secret key of the console's audit chain, in a file of its own (never in the console's database).

Without it, someone who can write the console's file could drop its triggers, edit an entry and recompute
every SHA-256 after it; with it, each entry's hash is an HMAC-SHA256 that only the key's holder can make.
The file is made on the console's first start (0600, never overwritten), beside the console's file
(`console.db.key`) or where `--audit-key` says, as JSON: the key, and `keyed_after`, the last entry of the
trail made before there was a key (0 for a trail keyed from its start). Those older entries are proven by
their plain SHA-256 chain; the number is kept here, out of the database's reach, so that a database reset to
look older than its key proves nothing it should not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from customs_edge.core.errors import CustomsEdgeError

ABOUT = ("customs-edge console audit key: keep it (and its backups) apart from the console's file; without it the"
         " audit trail cannot be proven or continued")


class AuditKeyError(CustomsEdgeError):
    """An audit key file that is missing, unreadable, open to others or not the trail's; names the file."""


@dataclass(frozen=True)
class AuditKey:
    path: Path
    secret: bytes
    keyed_after: int

    def mac(self, text: bytes) -> str:
        return hmac.new(self.secret, text, hashlib.sha256).hexdigest()

    def switch_mac(self, keyed_after: int) -> str:
        """What the console's file keeps beside its switch point: shows a wrong key, or a switch moved."""
        return self.mac(f"customs-edge console audit keyed after {keyed_after}".encode())

    @classmethod
    def create(cls, path: Path, keyed_after: int) -> AuditKey:
        """A new key in `path` (0600); an existing file is never overwritten (FileExistsError)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"about": ABOUT, "key": secret.hex(), "keyed_after": keyed_after}, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return cls(path, secret, keyed_after)

    @classmethod
    def load(cls, path: Path) -> AuditKey:
        try:
            mode = path.stat().st_mode & 0o777
            text = path.read_text()
        except FileNotFoundError:
            raise AuditKeyError(f"audit key {path} is missing: restore it from backup, or name it with"
                                " --audit-key") from None
        except OSError as exc:
            raise AuditKeyError(f"audit key {path} cannot be read ({exc.strerror}): run as the console's user")\
                from None
        if mode & 0o077:
            raise AuditKeyError(f"audit key {path} is readable by others (mode {mode:o}): chmod 600 {path}")
        try:
            doc = json.loads(text)
            secret = bytes.fromhex(doc["key"])
            after = doc["keyed_after"]
            if len(secret) < 32 or not isinstance(after, int) or isinstance(after, bool) or after < 0:
                raise ValueError
        except (ValueError, TypeError, KeyError):
            raise AuditKeyError(f"audit key {path} is not a console audit key (JSON with a 64-digit hex `key` and"
                                " `keyed_after`): restore it from backup") from None
        return cls(path, secret, after)
