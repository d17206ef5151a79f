"""The lane's beam controller, as it writes its lines (the format is ours: docs/gate.md, "Passage
controller"; written from that page, not from drivers/passage.py). 9600 8N1, ASCII, CR LF:

    IN,<n>            a traveller broke the entry beam; n = the entry counter, 0-999999, wrapping
    OUT,<n>           a traveller broke the exit beam; n = the exit counter
    HB,<in>,<out>     heartbeat, once a second, with both counters
"""

from __future__ import annotations

COUNTER_WRAP = 1_000_000


TAGS = {"entry": "IN", "exit": "OUT"}


def beam(kind: str, count: int) -> bytes:
    """An 'entry' or 'exit' line."""
    return f"{TAGS[kind]},{count % COUNTER_WRAP}\r\n".encode("ascii")


def heartbeat(entries: int, exits: int) -> bytes:
    return f"HB,{entries % COUNTER_WRAP},{exits % COUNTER_WRAP}\r\n".encode("ascii")
