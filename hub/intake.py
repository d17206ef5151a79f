"""What the hub accepts from a records message: the envelope first, then each record on its own.

A record that fails validation (a non-finite number anywhere, a wrong type, a priority out of range, a
payload over MAX_PAYLOAD_BYTES) never costs its neighbours: it is rejected (named in the ack's
`rejected` ranges, counted per device, traced in the store's `rejected` table) and the others are stored.
Only a message whose envelope is unusable (not JSON, no device_id or batch, records not a list) or whose
device_id is not the one its topic names is refused whole: counted, logged, never acked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from customs_edge.core.wire import MAX_PAYLOAD_BYTES, SEQ_MAX, Batch, WireRecord

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


class Refused(Exception):
    """A whole message the hub cannot use. `kind` is the counter it goes to."""

    def __init__(self, kind: Literal["malformed", "device_mismatch"], reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _Envelope(Batch):
    records: list[Any]  # validated one by one


_RECORD = TypeAdapter(WireRecord)


def parse(topic: str, payload: bytes | str) -> Incoming:
    """A records message -> the rows to store and the records rejected. Raises Refused."""
    try:  # fast path, one call: every record is well-formed (payloads are still checked one by one)
        whole = Batch.model_validate_json(payload, strict=True)
        device_id, batch_id, records = whole.device_id, whole.batch, list(whole.records)
    except ValidationError:
        try:
            env = _Envelope.model_validate_json(payload, strict=True)
        except ValidationError as exc:
            raise Refused("malformed", _reason(exc, "message")) from None
        device_id, batch_id, records = env.device_id, env.batch, env.records
    if topic.split("/")[-2] != device_id:
        raise Refused("device_mismatch", f"device_id {device_id!r} is not the topic's device")
    rows: list[Row] = []
    rejected: list[Rejected] = []
    for obj in records:
        try:
            r = obj if isinstance(obj, WireRecord) else _RECORD.validate_python(obj, strict=True)
        except ValidationError as exc:
            rejected.append(Rejected(_seq_of(obj), _reason(exc, "record"), _trace(obj)))
            continue
        text = pydantic_core.to_json(r.payload, inf_nan_mode="constants")
        if len(text) > MAX_PAYLOAD_BYTES:
            rejected.append(Rejected(r.seq, f"payload: {len(text)} bytes of JSON, over the {MAX_PAYLOAD_BYTES}"
                                            " limit", _trace(r.model_dump())))
        elif (b"NaN" in text or b"Infinity" in text) and not _finite(r.payload):
            rejected.append(Rejected(r.seq, "payload: a non-finite number (NaN or infinity); every number on"
                                            " the wire must be finite", _trace(r.model_dump())))
        else:
            rows.append((r.seq, r.ts, r.boot, r.mono, r.type, r.prio, text.decode()))
    return Incoming(device_id, batch_id, rows, rejected)


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

