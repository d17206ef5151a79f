"""What the hub accepts from a records message: the envelope first, then each record on its own.

A record that fails validation (a non-finite number anywhere, a wrong type, a priority out of range, a
payload over MAX_PAYLOAD_BYTES, a NUL character in its boot id, type or chain hash) never costs its neighbours:
it is rejected (named in the ack's `rejected` ranges, counted per device, traced in the store's `rejected`
table) and the others are stored.
Only a message over MAX_MESSAGE_BYTES (the broker's packet limit; refused before parsing), whose envelope is
unusable (not JSON, no device_id or batch, a NUL character in its batch id, records not a list) or whose device_id
is not the one its topic names is refused whole: counted, logged, never acked.

Signatures (core/signing.py): with a key registry, a batch of a registered device must carry a valid
signature by that device's key over its batch id and every record's chain hash, recomputed here from what
arrived; a batch that fails (another key, a changed record, another batch id) or comes unsigned is refused
whole as `forged` or `unsigned`. Stripping the signature is no way round it: a registered device's batches
are always checked. With `require`, batches of unregistered devices are refused too (`unsigned`).

Two passes, one result. The fast one (msgspec, `_clean`) takes a batch only if every record is clean: typed
and in range as WireRecord wants, its payload a JSON object under MAX_PAYLOAD_BYTES, already in the canonical
form the strict path would store (pydantic-core's parse and re-serialisation give back the very bytes that
arrived, so every number in it is finite). Then the payload bytes are stored and hashed as they
are, with no model objects and no re-serialisation. Any other batch (a record to reject, an envelope to refuse,
a payload an older agent wrote with spaces) goes through the strict pydantic path, which names what is wrong:
so the fast pass only ever accepts what the strict one accepts, with the same rows and the same chain hashes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import pydantic_core
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import TypeAdapter, ValidationError

from customs_edge.core.signing import batch_message, record_hash, record_hashes_utf8, verify
from customs_edge.core.wire import MAX_MESSAGE_BYTES, MAX_PAYLOAD_BYTES, SEQ_MAX, Batch, WireRecord

TRACE_CHARS = 500  # of a rejected record's text kept in the trace

# seq, ts, boot, mono, type, prio, payload JSON: a record as the store keeps it
Row = tuple[int, float, str, float, str, int, str]


@dataclass(frozen=True)
class Rejected:
    seq: int | None  # None: the record had no usable seq, so no ack can name it
    reason: str
    raw: str  # the record as received, cut at TRACE_CHARS


@dataclass(frozen=True)
class Incoming:
    device_id: str
    batch: str
    rows: list[Row]
    rejected: list[Rejected]
    links: dict[int, tuple[str | None, str]] = field(default_factory=dict)  # seq -> (prev, chain hash)
    # the batch's signature, verified on arrival against the device's registered key (None: not signed, or the device
    # not registered), and the (seq, chain hash) pairs it covers, in the order signed: kept for `hub verify --keys`
    sig: str | None = None
    signed: list[tuple[int, str]] = field(default_factory=list)


Keys = dict[str, Ed25519PublicKey]  # device_id -> its registered public key


class Refused(Exception):
    """A whole message the hub cannot use. `kind` is the counter it goes to."""

    def __init__(self, kind: Literal["too_large", "malformed", "device_mismatch", "forged", "unsigned"],
                 reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _Envelope(Batch):
    records: list[Any]  # validated one by one


_RECORD = TypeAdapter(WireRecord)


class _CleanRecord(msgspec.Struct, gc=False):
    """WireRecord for the fast pass: the same fields, types and bounds (msgspec refuses a bool for an int, a
    float for an int and a number out of a double's range, as the strict path does); the payload kept as bytes."""

    seq: Annotated[int, msgspec.Meta(ge=1, le=SEQ_MAX)]
    ts: float
    boot: str
    mono: float
    type: str
    prio: Annotated[int, msgspec.Meta(ge=0, le=3)]
    payload: msgspec.Raw
    prev: str | None = None


class _CleanBatch(msgspec.Struct, gc=False):
    device_id: str
    batch: str
    records: list[_CleanRecord]
    v: Literal[1] = 1
    key: str | None = None
    sig: str | None = None


_CLEAN = msgspec.json.Decoder(_CleanBatch)
_VALUES = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder().encode
_EXP = re.compile(rb"e[0-9]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH = 160  # nesting levels of a payload the fast pass takes (the strict path's parser goes to 197)


def _shallow(joined: bytes) -> bool:
    """Whether the brackets of `joined` (in strings too) nest at most _DEPTH deep: each round sheds the innermost
    pair of each kind, so what is left after _DEPTH // 2 rounds nested deeper (or does not pair up)."""
    b = joined.translate(None, _NOT_BRACKETS)
    for _ in range(_DEPTH // 2):
        shed = b.replace(b"{}", b"").replace(b"[]", b"")
        if len(shed) == len(b):
            break
        b = shed
    return not b


def _within(value: Any, depth: int) -> bool:
    """Whether a decoded JSON value nests at most `depth` deep (never recursing further than that)."""
    if type(value) is dict:
        return depth > 0 and all(_within(v, depth - 1) for v in value.values())
    if type(value) is list:
        return depth > 0 and all(_within(v, depth - 1) for v in value)
    return True


def _clean(payload: bytes | str) -> tuple[_CleanBatch, list[bytes]] | None:
    """The batch and each record's payload bytes if every record is clean (see the module's docstring), else
    None: the strict path decides."""
    try:
        env = _CLEAN.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    # a NUL character in a stored text field: the strict pass rejects the record (refuses the message, in its batch
    # id). JSON writes one only as \u0000: the records are looked at only when the message holds that
    nul = b"\\u0000" in payload if isinstance(payload, bytes) else "\\u0000" in payload
    if nul and ("\x00" in env.batch or any(
            "\x00" in r.boot or "\x00" in r.type or "\x00" in (r.prev or "") for r in env.records)):
        return None
    raws = [bytes(r.payload) for r in env.records]
    joined = b"[" + b",".join(raws) + b"]"
    try:  # msgspec's values equal pydantic-core's wherever the comparison below can hold (a float correctly
        # rounded, an int, a string); where they could differ (a repeated key, a number out of range) it fails
        values = _VALUES.decode(joined)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    longest = max(map(len, raws), default=0)
    if not all(type(v) is dict for v in values) or longest > MAX_PAYLOAD_BYTES:
        return None
    # Payloads nested deeper than the strict path's parser goes (200 levels, the envelope's 3 included) are
    # refused there: the fast pass takes those at most _DEPTH deep. Cheap bounds first (a level takes 2 bytes;
    # every payload is an object, so holds a "{"; brackets in strings count too), the values walked only where
    # those are in doubt.
    if (longest >= 2 * _DEPTH and joined.count(b"{") + joined.count(b"[") - len(raws) > _DEPTH
            and not _shallow(joined) and not all(_within(v, _DEPTH) for v in values)):
        return None
    # The bytes are what the strict path stores: its parse, re-serialised, gives them back unchanged. Written
    # with NaN and infinities as null, so that a non-finite number (a NaN, an Infinity, 1e400) never matches.
    # msgspec's serializer writes what pydantic-core's does at a third of its cost, but for a float's positive
    # exponent (1e16 here, 1e+16 there): where the bytes could hold one (an e before a digit), or msgspec's
    # differ (1e+16 was written by pydantic-core), pydantic-core's serializer decides.
    if _ENCODE(values) == joined and _EXP.search(joined) is None:
        return env, raws
    try:
        if pydantic_core.to_json(values, inf_nan_mode="null") != joined:
            return None
    except (ValueError, pydantic_core.PydanticSerializationError):  # nested deeper than the serializer goes
        return None
    return env, raws


class Prepared(msgspec.Struct, array_like=True, gc=False):
    """The part of parse() that needs neither the topic nor the key registry, for a batch whose every record is clean:
    what a parse process (hub/parser.py) hands back, encoded with msgspec's MessagePack (PREPARED decodes it)."""

    device_id: str
    batch: str
    sig: str | None
    key: str | None
    rows: list[Row]
    prevs: list[str | None]
    hashes: list[str]  # each record's chain hash, recomputed from what arrived


PREPARED = msgspec.msgpack.Decoder(Prepared | None)


def prepare(payload: bytes | str) -> Prepared | None:
    """The rows and chain hashes of a message whose every record is clean (see the module's docstring); None: the
    strict pass decides, in parse(). A message over MAX_MESSAGE_BYTES is the caller's to refuse first."""
    clean = _clean(payload)
    if clean is None:
        return None
    env, raws = clean
    recs = env.records
    rows: list[Row] = [(r.seq, r.ts, r.boot, r.mono, r.type, r.prio, raw.decode())
                       for r, raw in zip(recs, raws, strict=True)]
    hashes = record_hashes_utf8([(r.prev, r.seq, r.ts, r.type, r.prio) for r in recs], raws)
    return Prepared(env.device_id, env.batch, env.sig, env.key, rows, [r.prev for r in recs], hashes)


NOT_PREPARED: Any = object()  # parse()'s default: prepare() here


def parse(topic: str, payload: bytes | str, keys: Keys | None = None, require: bool = False,
          prepared: Prepared | None = NOT_PREPARED) -> Incoming:
    """A records message -> the rows to store and the records rejected. Raises Refused. `prepared`: what prepare()
    gave for this very payload elsewhere (a parse process), so that only the topic and signature checks run here."""
    if len(payload) > MAX_MESSAGE_BYTES:  # before any parsing: never a 100 MB string, let alone its objects
        raise Refused("too_large", f"{len(payload)} bytes, at most {MAX_MESSAGE_BYTES}")
    if prepared is NOT_PREPARED:
        prepared = prepare(payload)
    if prepared is not None:
        return _parse_clean(topic, prepared, keys, require)
    try:  # one call: every record is well-formed (payloads are still checked one by one)
        env: Batch = Batch.model_validate_json(payload, strict=True)
    except ValidationError:
        try:
            env = _Envelope.model_validate_json(payload, strict=True)
        except ValidationError as exc:
            raise Refused("malformed", _reason(exc, "message")) from None
    device_id, batch_id, records = env.device_id, env.batch, list(env.records)
    key = _key(topic, device_id, env.sig, keys, require)
    rows: list[Row] = []
    rejected: list[Rejected] = []
    links: dict[int, tuple[str | None, str]] = {}
    signed: list[tuple[int, str]] = []  # (seq, chain hash) in the batch's order: what its signature covers
    for obj in records:
        try:
            r = obj if isinstance(obj, WireRecord) else _RECORD.validate_python(obj, strict=True)
        except ValidationError as exc:
            if key is not None:  # no hash to check: not from the signing agent, whose records always parse
                raise Refused("forged", f"a signed batch holds a record that does not parse ({_reason(exc, 'record')})"
                              ) from None
            rejected.append(Rejected(_seq_of(obj), _reason(exc, "record"), _trace(obj)))
            continue
        text = pydantic_core.to_json(r.payload, inf_nan_mode="constants")
        decoded = text.decode()  # the agent's payload text again: the same serializer, on the values it wrote
        links[r.seq] = (r.prev, record_hash(r.prev or "", r.seq, r.ts, r.type, r.prio, decoded))
        signed.append((r.seq, links[r.seq][1]))
        if len(text) > MAX_PAYLOAD_BYTES:
            rejected.append(Rejected(r.seq, f"payload: {len(text)} bytes of JSON, over the {MAX_PAYLOAD_BYTES}"
                                            " limit", _trace(r.model_dump())))
        elif (b"NaN" in text or b"Infinity" in text) and not _finite(r.payload):
            rejected.append(Rejected(r.seq, "payload: a non-finite number (NaN or infinity); every number on"
                                            " the wire must be finite", _trace(r.model_dump())))
        else:
            rows.append((r.seq, r.ts, r.boot, r.mono, r.type, r.prio, decoded))
    if key is None:
        return Incoming(device_id, batch_id, rows, rejected, links)
    _check_signature(key, env.sig, env.key, device_id, batch_id, [h for _, h in signed])
    return Incoming(device_id, batch_id, rows, rejected, links, env.sig, signed)


def _parse_clean(topic: str, p: Prepared, keys: Keys | None, require: bool) -> Incoming:
    """parse() of a batch whose every record is clean: each payload's bytes are its stored text."""
    key = _key(topic, p.device_id, p.sig, keys, require)
    hashes = p.hashes
    links = {r[0]: (prev, h) for r, prev, h in zip(p.rows, p.prevs, hashes, strict=True)}
    _check_signature(key, p.sig, p.key, p.device_id, p.batch, hashes)
    if key is None:
        return Incoming(p.device_id, p.batch, p.rows, [], links)
    signed = [(r[0], h) for r, h in zip(p.rows, hashes, strict=True)]
    return Incoming(p.device_id, p.batch, p.rows, [], links, p.sig, signed)


def _key(topic: str, device_id: str, sig: str | None, keys: Keys | None, require: bool) -> Ed25519PublicKey | None:
    """The device's registered key (None: none, the batch is taken unsigned). Raises Refused."""
    if topic.split("/")[-2] != device_id:
        raise Refused("device_mismatch", f"device_id {device_id!r} is not the topic's device")
    key = (keys or {}).get(device_id)
    if sig is None and (key is not None or require):
        raise Refused("unsigned", f"an unsigned batch of {'registered' if key else 'unregistered'} device"
                                  f" {device_id!r}: the hub takes only batches signed by the key it holds for the"
                                  " device (`customs-edge key CONFIG` prints it)")
    if key is None and require:
        raise Refused("unsigned", f"device {device_id!r} has no registered key: add `customs-edge key` output of"
                                  " its unit to the hub's key registry")
    return key


def _check_signature(key: Ed25519PublicKey | None, sig: str | None, key_id: str | None, device_id: str,
                     batch_id: str, hashes: list[str]) -> None:
    if key is not None and not verify(key, sig or "", batch_message(device_id, batch_id, hashes)):
        raise Refused("forged", f"batch {batch_id!r} of {device_id!r}: its signature does not match its records and"
                                f" id under the device's registered key (key id {key_id!r})")


def _reason(exc: ValidationError, whole: str) -> str:
    """`loc: msg` of the first errors: "mono: Input should be a finite number"."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or whole}: {e['msg']}"
                     for e in exc.errors(include_url=False)[:3])


def _seq_of(obj: Any) -> int | None:
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if type(seq) is int and 1 <= seq <= SEQ_MAX else None


def _trace(obj: Any) -> str:
    return pydantic_core.to_json(obj, inf_nan_mode="constants", fallback=repr).decode()[:TRACE_CHARS]


def _finite(obj: Any) -> bool:
    """No NaN or infinity anywhere in a JSON value (the substring test above only found a candidate)."""
    try:
        json.dumps(obj, allow_nan=False)
    except ValueError:
        return False
    return True

