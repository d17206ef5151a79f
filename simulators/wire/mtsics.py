"""MT-SICS (Mettler-Toledo Standard Interface Command Set) replies, as a balance sends them.

Written from the balance manuals' MT-SICS chapter, not from drivers/mtsics.py (e.g. METTLER TOLEDO
AT balances operating instructions, "S - Send stable weight value"; AL-IC operating instructions;
reference manual "MT-SICS 11780711"): every command is answered with one line ending CR LF.

    S   -> S S <weight> <unit>    stable weight
           S I                    not executable (busy, e.g. taring, or no stable value in time)
           S +  /  S -            balance in overload / underload range
    SI  -> S S ... | S D <weight> <unit> (not stable: dynamic) | S I | S + | S -
    Z   -> Z A (zeroed) | Z I (not executable) | Z + / Z - (upper / lower limit of the zero range)
    ZI  -> ZI S / ZI D (zeroed under stable / dynamic conditions) | ZI I | ZI + | ZI -
    I4  -> I4 A "<serial number>"      @ (reset) -> I4 A "<serial number>"
    ES syntax error (command not recognised), ET transmission error, EL logical error.
The weight value is right-aligned in a 10-character field, one blank either side.
"""

from __future__ import annotations

EOL = b"\r\n"
SYNTAX_ERROR, TRANSMISSION_ERROR, LOGICAL_ERROR = b"ES\r\n", b"ET\r\n", b"EL\r\n"


def line(*fields: str) -> bytes:
    """Fields joined by single blanks, CR LF appended."""
    return " ".join(fields).encode("ascii") + EOL


def weight(value: float, unit: str = "g", *, stable: bool = True, decimals: int = 2) -> bytes:
    """'S S     100.00 g' (stable) or 'S D ...' (dynamic)."""
    field = f"{value:.{decimals}f}"
    if len(field) > 10:
        raise ValueError(f"{field} does not fit the 10-character weight field")
    return line("S", "S" if stable else "D", field.rjust(10), unit)


def status(command: str, code: str) -> bytes:
    """A reply without a weight: 'S I', 'S +', 'S -', 'Z A', 'Z I', ..."""
    return line(command, code)


def serial_number(text: str) -> bytes:
    return line("I4", "A", f'"{text}"')
