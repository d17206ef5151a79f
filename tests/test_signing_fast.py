"""core/signing.py's batch hashing (record_hashes_utf8, the hub's fast pass) gives record_hash()'s hashes: its
float text, msgspec's where repr() writes plain notation, is repr()'s for every float, and repr() itself is used
for the rest (exponents, NaN, infinities, non-floats)."""

from __future__ import annotations

import math
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from customs_edge.core.signing import _reprs, record_hash, record_hashes_utf8


def test_float_text_is_repr_s_for_timestamps_and_any_double() -> None:
    rnd = random.Random(7)
    values = [1.7e9 + rnd.random() * 1e8 for _ in range(20_000)]  # timestamps, 16-17 significant digits
    values += [struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(20_000)]
    values += [rnd.random() * 10.0 ** rnd.randint(-6, 18) for _ in range(20_000)]
    values += [1e-4, 9.999999999999999e-05, 1e16, 9999999999999998.0, 0.1, 0.30000000000000004, 1.0, 5e-324]
    for chunk in [values[:20_000], [v for v in values if 1e-4 <= v < 1e16], *([v] for v in values[::97])]:
        assert _reprs(chunk) == [repr(v) for v in chunk]


def test_values_it_must_not_format_itself_get_repr() -> None:
    for values in ([1.0, math.nan], [math.nan, 1.0], [2.0, math.inf], [0.0], [-1.5], [1e-5, 2.0], [1e16], [1.0, 2],
                   [1.0, True], []):
        assert _reprs(values) == [repr(v) for v in values]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.none() | st.text(max_size=64), st.integers(1, 2**63 - 1), st.floats(),
                          st.text(max_size=10),
                          st.integers(0, 3), st.text(max_size=20)), max_size=8))
def test_batch_hashes_are_record_hash_s(records: list[tuple[str | None, int, float, str, int, str]]) -> None:
    assert record_hashes_utf8([r[:5] for r in records], [r[5].encode() for r in records]) == [
        record_hash(prev or "", seq, ts, type_, prio, payload) for prev, seq, ts, type_, prio, payload in records]
