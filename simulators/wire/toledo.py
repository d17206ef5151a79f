"""Mettler-Toledo continuous output, as a weighing indicator sends it.

Written from the format's description, not from drivers/toledo.py: ../shared/PROTOCOLS.md (IND245 /
Kern FTC field table) and the status-byte tables of the Mettler-Toledo Wildcat user's manual
(12/00, appendix tables 6-9 to 6-11), which agree with the Toledo data format pages of Fairbanks'
FB2550 / FB3000 manuals.

    STX | status A | status B | status C | 6 weight digits | 6 tare digits | CR | [checksum]

Status A: bit 5 always 1, bit 6 always 0; bits 0-2 where the decimal point sits (0 = XXXX00, two dummy
zeros ... 2 = XXXXXX ... 7 = X.XXXXX); bits 3-4 the display increment (1 = x1, 2 = x2, 3 = x5).
Status B: bit 0 net, bit 1 negative, bit 2 out of range (over capacity), bit 3 motion, bit 4 kg
(else lb), bit 5 always 1, bit 6 power-up, not yet zeroed. Status C: bits 0-2 a unit other than
lb/kg (1 g, 2 t, 3 oz, 6 ton, 7 N), bit 3 print request, bit 4 expanded display, bit 5 always 1.
Digits: right-aligned, blank-padded, neither sign nor point. Checksum (optional, an indicator
setting): the 2's complement of the 7-bit sum of the 17 bytes before it.
"""

from __future__ import annotations

STX, CR = b"\x02", b"\r"
INCREMENT = {1: 0b01, 2: 0b10, 5: 0b11}
UNIT_C = {"g": 1, "t": 2, "oz": 3, "ton": 6, "N": 7}


def frame(weight: float, tare: float = 0.0, *, decimals: int = 2, unit: str = "kg", net: bool = False,
          motion: bool = False, over_range: bool = False, power_up: bool = False, increment: int = 1,
          checksum: bool = True) -> bytes:
    """One frame. `decimals` is the number of digits after the point (-2 .. 5; negative: dummy zeros)."""
    if not -2 <= decimals <= 5:
        raise ValueError("decimals must be -2 .. 5")
    status_a = 0x20 | (decimals + 2) | INCREMENT[increment] << 3
    status_b = 0x20 | net | (weight < 0) << 1 | over_range << 2 | motion << 3 | (unit == "kg") << 4 | power_up << 6
    status_c = 0x20 | UNIT_C.get(unit, 0)
    digits = b"".join(_six(v, decimals) for v in (abs(weight), abs(tare)))
    body = STX + bytes([status_a, status_b, status_c]) + digits + CR
    return body + bytes([-sum(body) & 0x7F]) if checksum else body


def _six(value: float, decimals: int) -> bytes:
    count = round(value * 10.0 ** decimals)
    text = str(count).rjust(6)
    if len(text) > 6:
        raise ValueError(f"{value} does not fit six digits with {decimals} decimals")
    return text.encode("ascii")
