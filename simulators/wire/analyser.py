"""The cross-belt analyser's result stream, as the analyser writes it (the format is ours:
docs/ore-station.md, "Elemental analyser result stream"; written from that page, not from
drivers/analyser.py). ASCII lines ending CR LF:

    $RESULT,<seq>,<UTC yyyy-mm-ddThh:mm:ssZ>,<interval_s>,<tonnes>,<OK|NOLOAD|FAULT>
    $ASSAY,Fe=..,SiO2=..,Al2O3=..,P=..,S=..,H2O=..      (empty after the comma for NOLOAD)
    $SPEC,<channels>,<live_time_s>,<keV per channel>,<offset keV>
    $CH,<first channel>,<64 counts>                      one line per 64 channels
    $END,<CRC-32 (zlib) of every byte from '$' of $RESULT to the LF before $END, 8 upper-case hex>
    $STAT,<UTC>,<state>,<detector °C>                    a heartbeat between blocks

and the result file the vendor's software writes into a directory (docs/ore-station.md, "Analyser
result files"): CSV, a header row, one result per row, times ISO 8601 with an offset:

    Sample ID,Time,Tonnes,Fe,SiO2,Al2O3,P,S,H2O[,other elements...],Status
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence

ASSAYS = ("Fe", "SiO2", "Al2O3", "P", "S", "H2O")
CHANNELS_PER_LINE = 64


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def result(seq: int, ts: float, interval_s: float, tonnes: float, status: str, assays: dict[str, float],
           counts: Sequence[int], live_time_s: float, kev_per_channel: float, offset_kev: float = 0.0) -> bytes:
    """One result block, $RESULT to $END."""
    lines = [f"$RESULT,{seq},{_utc(ts)},{interval_s:.1f},{tonnes:.2f},{status}",
             "$ASSAY," + ",".join(f"{name}={assays[name]:.3f}" for name in ASSAYS if name in assays),
             f"$SPEC,{len(counts)},{live_time_s:.2f},{kev_per_channel:.5f},{offset_kev:.3f}"]
    for first in range(0, len(counts), CHANNELS_PER_LINE):
        chunk = counts[first:first + CHANNELS_PER_LINE]
        lines.append(f"$CH,{first}," + ",".join(str(int(c)) for c in chunk))
    block = "".join(f"{text}\r\n" for text in lines).encode("ascii")
    return block + f"$END,{zlib.crc32(block):08X}\r\n".encode("ascii")


def status_line(ts: float, state: str, detector_c: float) -> bytes:
    return f"$STAT,{_utc(ts)},{state},{detector_c:.1f}\r\n".encode("ascii")


def result_csv(rows: Sequence[tuple[str, float, float, str, dict[str, float]]]) -> bytes:
    """A result file: one row per (sample id, UTC time, tonnes, status, assays by element name)."""
    others = sorted({name for *_, assays in rows for name in assays} - set(ASSAYS))
    lines = [",".join(["Sample ID", "Time", "Tonnes", *ASSAYS, *others, "Status"])]
    for sample, ts, tonnes, status, assays in rows:
        cells = [f"{assays[name]:.3f}" if name in assays else "" for name in (*ASSAYS, *others)]
        lines.append(",".join([sample, _utc(ts).replace("Z", "+00:00"), f"{tonnes:.2f}", *cells, status]))
    return "".join(f"{line}\r\n" for line in lines).encode("ascii")
