"""hub/intake.py's two passes give one result: the fast pass (msgspec, payload bytes kept as they arrived) takes
only batches the strict pydantic pass would store unchanged, and for those gives the same rows and chain hashes;
anything else (a record to reject, a payload written with spaces or other escapes, an envelope to refuse) is the
strict pass's to decide, with the same ack, the same stored text and the same signature check as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic_core
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from customs_edge.core.jsonfast import dumps
from customs_edge.core.records import Pending
from customs_edge.core.signing import GENESIS, DeviceKey, parse_public, record_hash
from customs_edge.core.wire import MAX_PAYLOAD_BYTES, encode_batch
from customs_edge.hub import intake

TOPIC = "customs-edge/v1/d1/records"


def outcome(message: bytes | str, keys: intake.Keys | None = None) -> intake.Incoming | tuple[str, str]:
    try:
        return intake.parse(TOPIC, message, keys)
    except intake.Refused as exc:
        return exc.kind, exc.reason


def strict(message: bytes | str, keys: intake.Keys | None = None) -> intake.Incoming | tuple[str, str]:
    """What the strict pass alone makes of a message (the fast pass switched off)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(intake, "_clean", lambda _payload: None)
        return outcome(message, keys)


def chained(n: int, payloads: list[str] | None = None) -> list[Pending]:
    out, prev = [], GENESIS
    for i in range(n):
        payload = payloads[i] if payloads else dumps({"weight": 12.34 + i, "unit": "kg", "note": "é\n\"x\"", "k": i})
        out.append(Pending(i + 1, 1.7e9 + i / 3, "boot-a", 5.0 + i, "weighing", 1, payload, prev))
        prev = record_hash(prev, i + 1, 1.7e9 + i / 3, "weighing", 1, payload)
    return out


def test_agent_batches_take_the_fast_pass_with_the_strict_pass_s_rows_and_hashes(tmp_path: Path) -> None:
    key = DeviceKey.load_or_create(tmp_path / "k")
    keys = {"d1": parse_public(key.public)}
    for message, k in ((encode_batch("d1", "b1", chained(50), key), keys),
                       (encode_batch("d1", "b2", chained(50)), None),
                       (encode_batch("d1", "b3", chained(50)).decode(), None)):  # a str message too
        assert intake._clean(message) is not None, "an agent's batch is clean"
        fast = outcome(message, k)
        assert isinstance(fast, intake.Incoming) and len(fast.rows) == 50 and not fast.rejected
        assert fast == strict(message, k)
        assert fast.rows[0][6] == chained(1)[0].payload  # the agent's text, stored as it was sent
    # a changed record fails the signature on both passes alike
    forged = encode_batch("d1", "b1", chained(50), key).replace(b'"k":7}', b'"k":8}')
    assert outcome(forged, keys) == strict(forged, keys) and outcome(forged, keys)[0] == "forged"


def record(payload: str = '{"a":1}', **fields: Any) -> str:
    r = {"seq": 1, "ts": 1.5, "boot": "b", "mono": 2.5, "type": "t", "prio": 1, **fields}
    return json.dumps(r)[:-1] + f',"payload":{payload}}}'


def message(*records: str, **envelope: Any) -> bytes:
    env = {"v": 1, "device_id": "d1", "batch": "b", **envelope}
    return (json.dumps(env)[:-1] + ',"records":[' + ",".join(records) + "]}").encode()


@pytest.mark.parametrize("msg", [
    message(record()),
    message(record('{ "a" : 1 }')),  # spaces: the strict pass stores the compact form
    message(record('{"a":1.50}'), record('{"a":1E5}', seq=2), record('{"a":1e16}', seq=3)),
    message(record('{"a":"\\u00e9\\/"}')),  # escapes the serializer does not write
    message(record('{"a":"é"}')),
    message(record('{"a":1,"a":2}')),  # a repeated key
    message(record('{"a":NaN}'), record(seq=2)),  # a non-finite number: rejected alone
    message(record('{"a":"NaN and Infinity"}')),  # only text
    message(record('{"a":123456789012345678901234567890}')),
    message(record('{"a":1e400}'), record(seq=2)),
    message(record("[1]"), record('"x"', seq=2), record("null", seq=3), record(seq=4)),
    message(record('{"a":"' + "x" * MAX_PAYLOAD_BYTES + '"}'), record(seq=2)),
    message(record('{"a":' + "[" * 300 + "]" * 300 + "}")),
    message(record('{"a":' + "[" * 220 + "]" * 220 + "}")),  # deeper than the strict parser goes: refused whole
    message(record('{"a":' + "[" * 3000 + "]" * 3000 + "}")),  # deeper than msgspec goes: refused, no RecursionError
    message(record('{"a":' + "[" * 150 + "]" * 150 + "}")),  # deep, taken by the fast pass
    message(record('{"a":' + "[" * 170 + "]" * 170 + ',"b":"]"}')),  # deeper than it takes: the strict pass's
    message(*(record('{"a":' + "[" * 150 + "]" * 150 + ',"b":"]]"}', seq=i) for i in range(1, 4))),  # walked
    message(record('{"a":1e16,"b":1e-7,"c":-2.5e300}'), record('{"a":1e+16}', seq=2)),  # exponents: pydantic-core's
    message(record(ts=5, mono=7)),  # whole numbers where floats are wanted
    message(record(seq=0), record(seq=2, prio=4), record(seq=True), record(seq=1.0), record(seq=2**63)),
    message(record(ts=1e400)),
    message(record('{"a":"\\ud800"}')),  # a lone surrogate
    message(record(extra=[1, 2]), record(seq=2, prev=None), record(seq=3, prev="f" * 64)),
    message(record(boot="b\u0000"), record(seq=2, type="\u0000t"), record(seq=3, prev="\u0000"), record(seq=4),
            record('{"a":"\\u0000"}', seq=5)),  # a NUL in a text field (PostgreSQL's text has none): rejected alone
    message('{"seq":1,"seq":2,"ts":1.5,"boot":"b","mono":2.5,"type":"t","prio":1,"payload":{}}'),
    message('{"seq":1,"ts":1.5}', record(seq=2)),  # fields missing
    message(record(), v=2),
    message(record(), device_id="d2"),
    message(record(), sig=None, key=None),
    b'{"v":1,"device_id":"d1","batch":"b","records":{}}',
    b'{"v":1,"device_id":"d1","batch":"b","records":[]}',
    b"[]",
    b"not json",
])
def test_any_message_gets_the_strict_pass_s_answer(msg: bytes) -> None:
    assert outcome(msg) == strict(msg)


def test_the_fast_pass_takes_payloads_up_to_its_depth_whatever_their_strings_hold() -> None:
    for depth, note, taken in ((150, "", True), (150, "[" * 20 + "]]", True), (170, "", False), (170, "]]", False)):
        msg = message(record('{"a":' + "[" * depth + "]" * depth + f',"b":"{note}"}}'))
        assert (intake._clean(msg) is not None) == taken, (depth, note)
        assert outcome(msg) == strict(msg)


def test_a_nul_character_in_a_stored_text_field_rejects_that_record_alone() -> None:
    """PostgreSQL's text cannot hold U+0000: a batch carrying one in a boot id, type or chain hash failed to store
    whole, was never acked, and was resent for ever. In a payload it is JSON's escape, six characters: stored."""
    got = outcome(message(record(boot="b\u0000"), record(seq=2, type="\u0000t"), record(seq=3, prev="\u0000"),
                          record(seq=4), record('{"a":"\\u0000"}', seq=5)))
    assert isinstance(got, intake.Incoming)
    assert [r.seq for r in got.rejected] == [1, 2, 3] and all("NUL character" in r.reason for r in got.rejected)
    assert [(row[0], row[6]) for row in got.rows] == [(4, '{"a":1}'), (5, '{"a":"\\u0000"}')]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
ENCODERS = {
    "agent": dumps,
    "stdlib": json.dumps,  # spaces after separators, \\u escapes
    "compact": lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False),
    "indented": lambda v: pydantic_core.to_json(v, indent=1).decode(),
}


@settings(max_examples=150, deadline=None)
@given(payloads=st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=5), min_size=1, max_size=4),
       encoder=st.sampled_from(sorted(ENCODERS)))
def test_payloads_of_any_encoder_get_the_strict_pass_s_rows(payloads: list[dict[str, Any]], encoder: str) -> None:
    msg = message(*(record(ENCODERS[encoder](p), seq=i + 1) for i, p in enumerate(payloads)))
    fast = outcome(msg)
    assert fast == strict(msg)
    assert isinstance(fast, intake.Incoming) and len(fast.rows) == len(payloads)
    if encoder == "agent":
        assert intake._clean(msg) is not None, "the agent's payloads are taken as they arrived"
