"""What `customs-edge probe --hexdump` says about each frame it shows, per protocol: Modbus RTU and TCP
requests and replies, the GY-MCU90640's commands and frames. A decoder is called with the direction ("TX",
"RX") and one block of bytes, and returns one line."""

from __future__ import annotations

import struct

from customs_edge.drivers.mlx90640 import (
    BAUD_ARGS,
    CMD_BAUD,
    CMD_MODE,
    CMD_RATE,
    COLS,
    FRAME_LEN,
    HEADER,
    MODE_AUTO,
    MODE_QUERY,
    RATE_ARGS,
    ROWS,
    checksum,
    command,
)
from customs_edge.drivers.modbus import EXCEPTIONS, FUNCTION, MBAP, crc16


class ModbusRtuDecoder:
    """Modbus RTU frames in words: a read request's slave, function, address and count; a reply's values
    (registers as unsigned 16-bit words, coils and inputs as bits) or its exception; and the CRC."""

    TABLE = {fc: table for table, fc in FUNCTION.items()}

    def __init__(self) -> None:
        self.asked: tuple[int, int, int, int] | None = None  # slave, function, address, count

    def __call__(self, direction: str, frame: bytes) -> str:
        if len(frame) < 5:
            return f"modbus: {len(frame)} bytes, too short for an RTU frame (a timeout, or a cut reply)"
        crc = "crc ok" if crc16(frame[:-2]) == frame[-2:] else "CRC MISMATCH (baud rate, parity, noise?)"
        return f"modbus {self.pdu(direction, frame[0], frame[1:-2])}, {crc}"

    def pdu(self, direction: str, slave: int, pdu: bytes) -> str:
        """One request or reply PDU (function code and data) to or from `slave`, in words."""
        fc = pdu[0]
        table = self.TABLE.get(fc & 0x7F, "?")
        if direction == "TX":
            if len(pdu) != 5:
                return f"request: slave {slave} function {fc}, {len(pdu)} bytes of PDU"
            address, count = struct.unpack(">HH", pdu[1:5])
            self.asked = (slave, fc, address, count)
            return f"request: slave {slave} read {table} (function {fc}) address {address} count {count}"
        if fc & 0x80:
            code = pdu[1] if len(pdu) > 1 else -1
            why = EXCEPTIONS.get(code, "unknown code")
            return f"reply: slave {slave} function {fc & 0x7F} EXCEPTION {code} ({why})"
        data = pdu[2:]
        asked = self.asked if self.asked and self.asked[:2] == (slave, fc) else None
        if fc in (1, 2):
            values = [(b >> i) & 1 for b in data for i in range(8)][:asked[3] if asked else None]
        else:
            values = list(struct.unpack(f">{len(data) // 2}H", data[:len(data) // 2 * 2]))
        at = f" address {asked[2]}" if asked else ""
        return f"reply: slave {slave} {table} (function {fc}){at} count {len(values)} values {values}"


class ModbusTcpDecoder(ModbusRtuDecoder):
    """Modbus TCP: the MBAP header's transaction id, then the PDU as for RTU (TCP has no CRC)."""

    def __call__(self, direction: str, frame: bytes) -> str:
        if len(frame) < MBAP.size + 1:
            return f"modbus tcp: {len(frame)} bytes, too short for an MBAP frame"
        tid, _, length, unit = MBAP.unpack_from(frame)
        end = 6 + length
        more = f" (and {len(frame) - end} bytes of a next frame)" if len(frame) > end else ""
        return f"modbus tcp transaction {tid} {self.pdu(direction, unit, frame[MBAP.size:end])}{more}"


class Mlx90640Decoder:
    """GY-MCU90640 traffic in words: the commands sent (rate, output mode, baud rate) and each frame's
    checksum."""

    COMMANDS = {CMD_RATE: ("refresh rate", {a: f"{hz:g} Hz" for hz, a in RATE_ARGS.items()}),
                CMD_MODE: ("output mode", {MODE_QUERY: "query one frame", MODE_AUTO: "automatic output"}),
                CMD_BAUD: ("baud rate", {a: str(b) for b, a in BAUD_ARGS.items()})}

    def __call__(self, direction: str, frame: bytes) -> str:
        if direction == "TX":
            if len(frame) != 4 or frame[0] != 0xA5:
                return f"mlx90640: {len(frame)} bytes written, not a command (A5 cmd arg sum)"
            name, args = self.COMMANDS.get(frame[1], (f"command 0x{frame[1]:02x}", {}))
            ok = "sum ok" if command(frame[1], frame[2]) == frame else "SUM MISMATCH"
            return f"mlx90640 command: {name} {args.get(frame[2], f'argument 0x{frame[2]:02x}')}, {ok}"
        parts, pos = [], 0  # a block may also hold skipped bytes, or what was read when the probe stopped
        while pos < len(frame):
            start = frame.find(HEADER, pos)
            if start != pos:
                end = len(frame) if start < 0 else start
                parts.append(f"{end - pos} bytes that are no frame (a frame cut by the start, or noise)")
                pos = end
            elif len(frame) - pos < FRAME_LEN:
                parts.append(f"{len(frame) - pos} bytes of a frame not yet whole")
                break
            else:
                whole = frame[pos:pos + FRAME_LEN]
                good = checksum(whole[:-2]) == int.from_bytes(whole[-2:], "little")
                parts.append(f"a {ROWS}x{COLS} frame, checksum {'ok' if good else 'MISMATCH'}")
                pos += FRAME_LEN
        return "mlx90640: " + "; ".join(parts)
