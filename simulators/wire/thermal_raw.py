"""Raw Y16 thermal frames over a byte stream (TCP or serial), as docs/gate.md "Raw-frame thermal cameras"
specifies them. Written from that page, not from drivers/thermal_raw.py.

Frame, every field little-endian:
  0   4  magic b"TFR1"
  4   2  header length: 32
  6   2  width           8  2  height
  10  2  pixel format: 1 = kelvin x 100 (0.01 K: the FLIR Lepton's TLinear), 2 = kelvin x 10 (0.1 K)
  12  4  frame counter (wraps at 2**32)
  16  8  timestamp, microseconds since the camera powered on
  24  2  int16 housing (focal-plane) temperature, °C x 100
  26  2  flags: bit 0 = flat-field correction (shutter closed): the frame is not radiometric
  28  4  payload length = width x height x 2
  32  N  payload: width x height uint16, row-major, top row first
  32+N 4 CRC-32 (IEEE 802.3, as zlib.crc32) of bytes 0 .. 32+N-1
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"TFR1"
HEADER = struct.Struct("<4sHHHHIQhHI")  # 32 bytes
FORMATS = {1: 100.0, 2: 10.0}  # format -> counts per kelvin
FLAG_FFC = 0x0001
KELVIN = 273.15


def frame(pixels_c: np.ndarray, counter: int, uptime_us: int, housing_c: float, fmt: int = 1,
          ffc: bool = False) -> bytes:
    """One frame from an HxW image in °C."""
    if fmt not in FORMATS:
        raise ValueError(f"pixel format {fmt}: 1 (0.01 K) or 2 (0.1 K)")
    h, w = pixels_c.shape
    counts = np.clip(np.rint((np.asarray(pixels_c, dtype=np.float64) + KELVIN) * FORMATS[fmt]), 0, 65535)
    payload = counts.astype("<u2").tobytes()
    head = HEADER.pack(MAGIC, HEADER.size, w, h, fmt, counter & 0xFFFFFFFF, uptime_us,
                       int(np.clip(round(housing_c * 100), -32768, 32767)), FLAG_FFC if ffc else 0, len(payload))
    body = head + payload
    return body + struct.pack("<I", zlib.crc32(body))
