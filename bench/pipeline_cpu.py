"""CPU per record of each stage of the pipeline, in one process, without a broker: the figures that add up to
bench/pipeline.py's throughput, and steadier than it on a shared machine (CPU time, best of --repeat runs).

    python bench/pipeline_cpu.py [--records 20000] [--repeat 3] [--json]

Agent (the production calls, batches of 1,000 as in bench/pipeline.py):
  app_us      the app makes its RecordIns (pydantic validation, the finite-number check)
  put_us      outbox.put(): encode, chain hash, INSERT, commit (synchronous=FULL)
  begin_us    outbox.begin(1000): the rows handed to sync
  encode_us   encode_batch(), signed with a device key
  ack_us      outbox.ack() of the batch
Hub (the signed batches above, 8 batches per store transaction as under load):
  parse_us    intake.parse(): validation, chain hashes, signature check (the agent's batches take its fast pass)
  parse_strict_us  the same by the strict pydantic pass alone (every batch before the fast pass): a baseline,
              not in hub_us
  store_us    HubStore.store(): duplicate/conflict check, INSERT, commit (FULL)
agent_us and hub_us are the sums; *_records_per_s = 1e6 / that: the rate one core could carry.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import PAYLOAD
from customs_edge.agent.outbox import SqliteOutbox
from customs_edge.core.records import Priority, RecordIn
from customs_edge.core.signing import DeviceKey, parse_public
from customs_edge.core.wire import encode_batch
from customs_edge.hub import intake
from customs_edge.hub.store import HubStore

T = TypeVar("T")
DEVICE = "bench-cpu"
TOPIC = f"customs-edge/v1/{DEVICE}/records"


class Stages:
    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], T]) -> T:
        c0 = time.thread_time()
        out = fn()
        self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c0
        return out


def strict_parse(message: bytes, keys: intake.Keys) -> intake.Incoming:
    """intake.parse() by its strict pydantic pass alone (the fast pass off): the baseline of parse_us."""
    fast, intake._clean = intake._clean, lambda _payload: None  # type: ignore[assignment]
    try:
        return intake.parse(TOPIC, message, keys)
    finally:
        intake._clean = fast  # type: ignore[assignment]


def once(work: Path, records: int) -> dict[str, float]:
    st = Stages()
    ob = SqliteOutbox(work / "outbox.db", synchronous="FULL")
    key = DeviceKey.beside(work / "outbox.db")
    messages: list[bytes] = []
    for i in range(records // 1000):
        recs = st.run("app", lambda: [RecordIn(type="bench", priority=Priority.EVENT, ts=time.time(),
                                               payload={**PAYLOAD, "created": time.monotonic(), "k": k})
                                      for k in range(1000)])
        st.run("put", lambda: ob.put(recs))  # noqa: B023
        batch = st.run("begin", lambda: ob.begin(1000))
        messages.append(st.run("encode", lambda: encode_batch(DEVICE, f"b-{i}", batch, key)))  # noqa: B023
        st.run("ack", lambda: ob.ack([(batch[0].seq, batch[-1].seq)]))  # noqa: B023
    ob.close()
    store = HubStore(work / "hub.db")
    keys = {DEVICE: parse_public(key.public)}
    for i in range(0, len(messages), 8):
        incoming = st.run("parse", lambda: [intake.parse(TOPIC, m, keys) for m in messages[i:i + 8]])  # noqa: B023
        stored = st.run("store", lambda: store.store(incoming))  # noqa: B023
        assert sum(s.stored for s in stored) == 1000 * len(incoming), "every record stored"
    store.close()
    for m in messages:  # the baseline, after: its objects never weigh on the fast pass's garbage collections
        assert intake._clean(m) is not None, "the agent's batches take the fast pass"
        strict = st.run("parse_strict", lambda: strict_parse(m, keys))  # noqa: B023
        assert strict == intake.parse(TOPIC, m, keys), "both passes give the same rows and hashes"
    n = records // 1000 * 1000
    return {k: v / n * 1e6 for k, v in st.cpu.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="ce-bench-cpu-") as d:
            runs.append(once(Path(d), args.records))
    best = {k: min(run[k] for run in runs) for k in runs[0]}
    out: dict[str, Any] = {f"{k}_us": round(v, 2) for k, v in best.items()}
    agent = sum(best[k] for k in ("app", "put", "begin", "encode", "ack"))
    hub = best["parse"] + best["store"]
    out.update(agent_us=round(agent, 2), hub_us=round(hub, 2), agent_records_per_s=round(1e6 / agent),
               hub_records_per_s=round(1e6 / hub), records=args.records, repeat=args.repeat)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v:,}")


if __name__ == "__main__":
    main()
