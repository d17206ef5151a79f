"""Evidence-grade records: a per-device hash chain and Ed25519-signed batches.

Chain: every record carries `prev`, the chain hash of the device's previous record (GENESIS for the first);
its own chain hash is sha256 over prev, seq, ts, type, priority and the payload's JSON text
(`record_hash`). The outbox computes it where the seq is given (the same transaction), so it survives
restarts. Records the outbox cap drops are replaced by a `tombstone` record (TOMBSTONE_TYPE, ALERT
priority, never dropped) naming each dropped run of seqs with the hashes at both ends, so the gap is
explained and the chain still links across it.

Batch: the agent signs `batch_message` (device id, batch id and every record's chain hash, in order) with
its device key; the hub recomputes each hash from what it received, so a changed record, another batch id
or another device's key fails the signature.

Keys: the device key lives beside the outbox (`<outbox>.key`, PEM, 0600), made on first start; the hub
reads a registry file, one `DEVICE_ID ed25519:BASE64` line per device (`customs-edge key CONFIG` prints it).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from customs_edge.core.errors import CustomsEdgeError

GENESIS = "0" * 64  # the `prev` of a device's first chained record
TOMBSTONE_TYPE = "tombstone"  # payload {"runs": [[lo, hi, prev of lo, hash of hi], ...], "count": n}
TOMBSTONE_RUNS = 200  # runs per tombstone record: its payload stays far below the wire's 64 KiB
_PREFIX = "ed25519:"


class SigningError(CustomsEdgeError):
    """A device key or key registry that cannot be used; the message names the file and the fix."""


def record_hash(prev: str, seq: int, ts: float, type_: str, priority: int, payload: str) -> str:
    """The chain hash of one record (type length-prefixed, payload last: no two records share an encoding)."""
    return record_hash_ts(prev, seq, repr(ts), type_, priority, payload)


def record_hash_ts(prev: str, seq: int, ts_text: str, type_: str, priority: int, payload: str) -> str:
    """record_hash() with the stamp given as repr(ts): formatted once for records that share a stamp. The one
    place the chain's text is written (record_hashes_utf8 writes the same, from the payload's bytes)."""
    return hashlib.sha256(f"{prev}\n{seq}\n{ts_text}\n{priority}\n{len(type_)}:{type_}\n{payload}".encode()).hexdigest()


def record_hashes_utf8(records: Iterable[tuple[str | None, int, float, str, int]], payloads: Iterable[bytes]
                       ) -> list[str]:
    """record_hash() of many records, (prev or None, seq, ts, type, priority) each, with their payloads given
    as UTF-8 bytes (as they arrived on the wire): the same hashes, in one loop."""
    sha256 = hashlib.sha256
    records = list(records)
    return [sha256(f"{prev or ''}\n{seq}\n{ts}\n{priority}\n{len(type_)}:{type_}\n".encode() + payload).hexdigest()
            for (prev, seq, _, type_, priority), ts, payload in zip(records, _reprs([r[2] for r in records]), payloads,
                                                                    strict=True)]


def _reprs(values: list[float]) -> list[str]:
    """repr() of each float, at a tenth of its cost: msgspec writes the same shortest round-trip digits, in the same
    plain notation wherever repr uses it (1e-4 <= x < 1e16, where every timestamp falls); outside it (repr's
    exponents are written 1e+16 and 1e-05) repr itself. tests/test_signing_fast.py holds the two together."""
    if values and {*map(type, values)} == {float} and min(values) >= 1e-4 and max(values) < 1e16:
        text = msgspec.json.encode(values)
        if b"n" not in text:  # no NaN or infinity (written null), which min() and max() may step past
            return text[1:-1].decode().split(",")
    return [repr(v) for v in values]


def batch_message(device_id: str, batch_id: str, hashes: list[str]) -> bytes:
    return "\n".join(["customs-edge batch v1", device_id, batch_id, *hashes]).encode()


def public_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _PREFIX + base64.b64encode(raw).decode()


def key_id(public: str) -> str:
    """A short, stable name of a public key (sent in each signed batch)."""
    return hashlib.sha256(public.encode()).hexdigest()[:16]


def parse_public(text: str) -> Ed25519PublicKey:
    if not text.startswith(_PREFIX):
        raise ValueError(f"a public key is written {_PREFIX}BASE64")
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text[len(_PREFIX):], validate=True))


class DeviceKey:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = public_text(private.public_key())
        self.key_id = key_id(self.public)

    @classmethod
    def beside(cls, outbox_path: str | Path) -> DeviceKey:
        return cls.load_or_create(Path(f"{outbox_path}.key"))

    @classmethod
    def load_or_create(cls, path: Path) -> DeviceKey:
        """The key in `path`, made there (0600, never overwritten) if there is none."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return cls._load(path)
        private = Ed25519PrivateKey.generate()
        with os.fdopen(fd, "wb") as f:
            f.write(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
            f.flush()
            os.fsync(f.fileno())
        return cls(private)

    @classmethod
    def _load(cls, path: Path) -> DeviceKey:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise SigningError(f"device key {path} is readable by others (mode {mode:o}): chmod 600 {path}")
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), None)
        except ValueError as exc:
            raise SigningError(f"device key {path} is unreadable ({exc}): restore it from backup, or delete it to make"
                            " a new one and register the new public key with the hub") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningError(f"device key {path} is not an Ed25519 key: delete it to make a new one")
        return cls(private)

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._private.sign(message)).decode()


def verify(public: Ed25519PublicKey, signature: str, message: bytes) -> bool:
    try:
        public.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_registry(path: str | Path) -> dict[str, Ed25519PublicKey]:
    """device_id -> public key, from `DEVICE_ID ed25519:BASE64` lines ('#' comments and blank lines skipped)."""
    out: dict[str, Ed25519PublicKey] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            device_id, text = line.split()
            out[device_id] = parse_public(text)
        except ValueError as exc:
            raise SigningError(f"{path}:{n}: expected `DEVICE_ID {_PREFIX}BASE64` as printed by `customs-edge key"
                            f" CONFIG` ({exc})") from None
    return out
