"""Modbus RTU as a slave writes it, from the specifications, not from drivers/modbus.py.

"MODBUS over Serial Line, Specification and Implementation Guide V1.02", 2.5.1 and 6.2.2: an RTU frame
is the slave address, the PDU and a CRC-16 (polynomial 0x8005, reflected: 0xA001; initial 0xFFFF) sent low byte
first; frames are separated by at least 3.5 character times of silence. "MODBUS Application Protocol
V1.1b3", 6.1-6.4: read requests are function, start address, quantity (big-endian 16-bit); replies are
function, byte count, data (coils/inputs packed LSB first, registers big-endian); an exception reply
is function | 0x80 and one exception code. 32-bit values are packed by pymodbus's own converter.
"""

from __future__ import annotations

from typing import Literal

from pymodbus.client.mixin import ModbusClientMixin

FUNCTIONS = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}  # read function code -> table
MAX_QUANTITY = {1: 2000, 2: 2000, 3: 125, 4: 125}
ILLEGAL_FUNCTION, ILLEGAL_DATA_ADDRESS, ILLEGAL_DATA_VALUE = 1, 2, 3
_TYPES = {"uint16": ModbusClientMixin.DATATYPE.UINT16, "int16": ModbusClientMixin.DATATYPE.INT16,
          "uint32": ModbusClientMixin.DATATYPE.UINT32, "int32": ModbusClientMixin.DATATYPE.INT32,
          "float32": ModbusClientMixin.DATATYPE.FLOAT32}


def crc16(data: bytes) -> bytes:
    """The CRC as it goes on the wire, low byte first (spec 6.2.2, written out bit by bit)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def frame(body: bytes) -> bytes:
    """Address + PDU, with its CRC appended."""
    return body + crc16(body)


def registers(dtype: str, value: float | int, word_order: Literal["big", "little"] = "big") -> list[int]:
    """The register words holding `value` as `dtype` (pymodbus's conversion)."""
    number = float(value) if dtype == "float32" else int(value)
    return ModbusClientMixin.convert_to_registers(number, _TYPES[dtype], word_order=word_order)


def read_reply(slave: int, function: int, values: list[int]) -> bytes:
    """A normal reply to a read: bits (function 1, 2) or register words (3, 4)."""
    if function in (1, 2):
        data = bytearray((len(values) + 7) // 8)
        for i, bit in enumerate(values):
            data[i // 8] |= (1 if bit else 0) << (i % 8)
    else:
        data = bytearray(b"".join(w.to_bytes(2, "big") for w in values))
    return frame(bytes([slave, function, len(data)]) + bytes(data))


def exception_reply(slave: int, function: int, code: int) -> bytes:
    return frame(bytes([slave, function | 0x80, code]))
