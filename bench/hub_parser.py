"""What the hub's parse process (hub/parser.py) saves the worker, per message size, beside the parse in the worker.

    python bench/hub_parser.py [--records-per-size 100000] [--sizes 1,5,20,50,100,500] [--json]

For each batch size (records per message, bench/hub.py's ~340-byte weighing records), the same messages:
  inline_us_per_msg     intake.prepare() in this process (the baseline: what the worker does without a child);
  handoff_us_per_msg    this process's CPU (every thread: submitting, the pipe's writer and reader, take() and its
                        MessagePack decode) for ParseProcess.submit() of every message and then take() of each,
                        the child's own CPU not counted: what one worker core still spends when the child parses;
  child_us_per_msg      the child's CPU for the same messages;
  saved_share           1 - handoff / inline.
Messages go in as a backlog's do, all submitted before the first take(): the hand-off's wake-ups are shared by many
messages. A steady fleet's messages come one at a time and pay a wake-up each; bench/hub.py's fleet measures that
(hence parser.MIN_BYTES).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import proc_cpu_s
from bench.hub import batches
from customs_edge.hub import intake, parser


def measure(pp: parser.ParseProcess, size: int, total: int) -> dict[str, Any]:
    msgs = [wire for _, wire, _ in batches(max(total, size * 40), size, 50, f"s{size}")]
    t0 = time.process_time()
    for m in msgs:
        intake.prepare(m)
    inline = (time.process_time() - t0) / len(msgs) * 1e6
    child = pp.pid
    if child is None:
        raise RuntimeError("no parse process runs")
    c0, t0 = proc_cpu_s(child), time.process_time()
    for m in msgs:
        pp.submit(m)
    for m in msgs:
        if pp.take(m) is parser.NOT_SUBMITTED:
            raise RuntimeError("the parse process did not answer")
    handoff = (time.process_time() - t0) / len(msgs) * 1e6
    child_us = (proc_cpu_s(child) - c0) / len(msgs) * 1e6
    return {"records_per_msg": size, "bytes_per_msg": round(sum(map(len, msgs)) / len(msgs)),
            "messages": len(msgs), "inline_us_per_msg": round(inline, 1), "handoff_us_per_msg": round(handoff, 1),
            "child_us_per_msg": round(child_us, 1), "saved_share": round(1 - handoff / inline, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records-per-size", type=int, default=100_000)
    ap.add_argument("--sizes", default="1,5,20,50,100,500")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    pp = parser.ParseProcess()
    if not pp.start():
        raise SystemExit("the parse process did not start")
    try:
        rows = [measure(pp, int(n), args.records_per_size) for n in args.sizes.split(",")]
    finally:
        pp.close()
    out = {"min_bytes": parser.MIN_BYTES, "sizes": rows}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
