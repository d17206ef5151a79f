"""Mettler-Toledo MT-SICS (Standard Interface Command Set), request/response, level 0 commands.

Commands and replies are ASCII lines ending CR LF, typically 9600 8N1. Reply codes as the MT-SICS
manuals give them (e.g. METTLER TOLEDO AT balances operating instructions, "S - Send stable weight
value"; reference manual MT-SICS 11780711):
  S   stable weight       -> "S S     100.00 g"  | "S I" (not executable: busy, or no stable value in
                             time) | "S +" (overload range) | "S -" (underload range)
  SI  weight immediately  -> "S S     100.00 g"  | "S D     99.87 g" (dynamic)     | "S I" | "S +" | "S -"
  Z   zero when stable    -> "Z A" (done) | "Z I" (not executed, busy) | "Z +" / "Z -" (out of zero range)
  ZI  zero immediately    -> "ZI S" / "ZI D" (done, stable / dynamic) | "ZI I" | "ZI +" | "ZI -"
  @   reset               -> 'I4 A "serial number"'
  I4  serial number       -> 'I4 A "serial number"'
  any command             -> "ES" (syntax: command unknown) | "ET" (transmission error) | "EL" (logic error)
The weight field is right-aligned in 10 characters between single blanks; the unit follows. A status
code the manual does not list for that reply (e.g. "S A") is a garbled line.

Only "S S" is a stable weight. "S D" is motion; "S I" is no value and not stable (motion, `busy`);
"S +" / "S -" are no value and out of range (`overload` / `underload`): none of them is a weight to
settle on or to average.

The driver polls with `command` (SI by default, so the app sees motion) every `poll_interval_s`.
A reply that fits none of these shapes is counted in stats.corrupt and dropped (a garbled line);
no reply within read_timeout_s is counted in stats.extra['timeouts']; no valid reply at all for
silent_after_s raises DriverSilent. ES/ET/EL are counted per kind and the poll is simply repeated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import serial
from pydantic import Field

from customs_edge.core.errors import DriverFault
from customs_edge.core.readings import Weight
from customs_edge.drivers.base import SerialDriver, SerialPortConfig, poll_due

EOL = b"\r\n"
_WEIGHT = re.compile(r"^S ([SD]) +(-?\d+(?:\.\d+)?) (\S{1,5})$")
UNITS = {"g", "kg", "mg", "ug", "ct", "lb", "oz", "ozt", "GN", "dwt", "t", "mom", "tl"}
STATUS_CODES = {"S": "I+-", "Z": "AI+-", "ZI": "SDI+-"}  # replies without a weight, per command
_SERIAL = re.compile(r'^I4 A "([^"]*)"$')
ERRORS = {"ES": "syntax error", "ET": "transmission error", "EL": "logical error"}


@dataclass(frozen=True, slots=True)
class SicsReply:
    """One decoded reply line. kind: weight, status (I/+/-/A), error (ES/ET/EL), serial."""

    kind: Literal["weight", "status", "error", "serial"]
    command: str = ""  # S or Z family for status replies
    status: str = ""  # S, D, I, +, -, A, or the error code
    weight: float | None = None
    unit: str = ""
    text: str = ""

    def reading(self, source: str) -> Weight:
        """The reply as a Weight, the type the Toledo driver yields too, so the same apps consume both."""
        return Weight(source=source, value=self.weight, unit=self.unit, stable=self.status == "S",
                      overload=self.status == "+", underload=self.status == "-")


def parse_reply(line: bytes) -> SicsReply | None:
    """Decode one line (without CR LF). None when the line is not a valid MT-SICS reply."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.isprintable():
        return None
    if text in ERRORS:
        return SicsReply("error", status=text, text=ERRORS[text])
    m = _WEIGHT.match(text)
    if m:
        field = text[4:14]  # the 10-character weight field
        if len(text) < 16 or field.strip() != m.group(2) or text[14] != " " or m.group(3) not in UNITS:
            return None
        return SicsReply("weight", "S", m.group(1), float(m.group(2)), m.group(3))
    command, _, code = text.partition(" ")
    if len(code) == 1 and code in STATUS_CODES.get(command, ""):
        return SicsReply("status", command, code)
    m = _SERIAL.match(text)
    if m:
        return SicsReply("serial", "I4", "A", text=m.group(1))
    return None


def format_weight(weight: float, unit: str = "g", *, stable: bool = True, decimals: int = 2) -> bytes:
    """A weight reply as a balance sends it: 'S S     100.00 g' + CR LF (round-trip tests; the
    simulator has its own)."""
    value = f"{weight:.{decimals}f}"
    if len(value) > 10:
        raise ValueError("weight does not fit the 10-character field")
    return f"S {'S' if stable else 'D'} {value:>10} {unit}".encode() + EOL


class MtSicsConfig(SerialPortConfig):
    driver: Literal["mt-sics"] = "mt-sics"
    command: Literal["S", "SI"] = Field("SI", description="SI reports motion too; S only stable weights")
    poll_interval_s: float = Field(0.25, gt=0, le=60)
    zero_on_open: bool = Field(False, description="send Z once after opening (platform must be empty)")


class MtSics(SerialDriver):
    """Bench balance speaking MT-SICS. Yields Weight; a missing weight (busy, overload, underload)
    comes as value=None, with `overload` / `underload` set for '+' / '-'."""

    Config = MtSicsConfig
    PRODUCES = (Weight,)
    config: MtSicsConfig

    def __init__(self, role: str, config: MtSicsConfig) -> None:
        super().__init__(role, config)
        self._next_poll = 0.0
        self.serial_number: str | None = None
        for key in ("timeouts", "ES", "ET", "EL"):
            self.stats.extra[key] = 0

    def open(self) -> None:
        super().open()
        self._next_poll = 0.0
        if self.config.zero_on_open:
            reply = self.command("Z")
            if reply is None or reply.status != "A":
                self.stats.faults += 1
                raise DriverFault(f"{self.role}: zero on open refused: {reply}")

    def command(self, cmd: str) -> SicsReply | None:
        """Send one command, return its decoded reply; None on a timeout or a garbled reply (counted)."""
        port = self._require_port()
        try:
            port.reset_input_buffer()  # a late reply to the last poll must not answer this one
            port.write(cmd.encode("ascii") + EOL)
            line = port.read_until(EOL, 128)
        except (serial.SerialException, OSError) as exc:
            raise self._io_fault(exc) from exc
        self.stats.bytes_in += len(line)
        if not line.endswith(EOL):
            if line:
                self.stats.corrupt += 1  # a partial line: bytes lost on the way
            else:
                self.stats.extra["timeouts"] += 1
            return None
        reply = parse_reply(line[:-2])
        if reply is None:
            self.stats.corrupt += 1
            return None
        self._watch.reset()
        if reply.kind == "error":
            self.stats.extra[reply.status] += 1
        return reply

    def read(self) -> Weight | None:
        due = poll_due(self._next_poll, self.config.poll_interval_s, self.config.read_timeout_s)
        if due is None:
            return None
        self._next_poll = due
        reply = self.command(self.config.command)
        if reply is not None and (reply.kind == "weight" or (reply.kind == "status" and reply.command == "S")):
            self.stats.frames += 1
            return reply.reading(self.role)
        self._check_silence()
        return None
