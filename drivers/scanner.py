"""Barcode / 2-D code scanner in serial mode (RS-232 or USB-CDC: Honeywell, Zebra, Datalogic, Newland ...).

Wire: one read per line, the data as decoded, prefixed by its AIM symbology identifier (ISO/IEC 15424:
`]E0` EAN-13/UPC-A, `]E4` EAN-8, `]C1` GS1-128, `]C0` Code 128, `]Q1` QR, `]Q3` GS1 QR, `]d1` Data
Matrix, `]d2` GS1 DataMatrix, `]I1` ITF-14, `]I0` ITF, ...) when the scanner is set to send it, and
ended by CR or CR LF. GS1 element strings carry the FNC1 separator as GS (0x1D).

Content is parsed with `biip`, never by hand. A GS1 symbology (`]C1`, `]d2`, `]Q3`, `]e0`, EAN/UPC,
`]I1`) is read as GS1: its element strings (or its GTIN) become `ais`, `gtin`, `batch`, `serial`,
`expiry` of the CodeScan. Another symbology carrying an http(s) URL is tried as a GS1 Digital Link
URI (the QR code on goods and many traceability labels); a URL that is not one, and any other
payload, is kept as text with its symbology.

Damaged reads: a line that arrived whole but whose GS1 content is wrong (a bad check digit, an AI
whose value breaks its format, a date that does not exist, an unknown symbology identifier) is a
CodeScan with valid=False and `error` naming the fault, and is counted in `invalid`. It is kept
because a scan is an officer's deliberate act: the app must say "rescan" rather than hear nothing,
and a mangled code on goods is itself worth recording. Bytes that are not a line at all (not
`encoding`, or longer than `max_line` without a line end) are counted corrupt and skipped.
"""

from __future__ import annotations

import codecs
from typing import Any, Literal

import biip
from biip.symbology import GS1Symbology, SymbologyIdentifier
from pydantic import Field, field_validator

from customs_edge.core.readings import CodeScan
from customs_edge.drivers.base import SerialPortConfig, StreamSerialDriver
from customs_edge.drivers.gs1_prefixes import compact_company_prefixes

compact_company_prefixes()  # biip's company prefix table in 0.9 MB instead of ~5 MB (drivers/gs1_prefixes.py)

GS1_SYMBOLOGIES = GS1Symbology.with_gs1_messages() | GS1Symbology.with_gtin()


def _gs1_fields(result: biip.ParseResult) -> dict[str, Any]:
    """CodeScan's GS1 fields from a parse result; ValueError naming a damaged element."""
    message = result.gs1_message or (result.gs1_digital_link_uri.as_gs1_message()
                                     if result.gs1_digital_link_uri is not None else None)
    ais: dict[str, str] = {}
    expiry = None
    for es in message.element_strings if message is not None else []:
        bad = es.gtin_error or es.gln_error or es.sscc_error
        if bad:
            raise ValueError(f"AI ({es.ai.ai}): {bad}")
        ais[es.ai.ai] = es.value
        if es.ai.ai == "17" and es.date is not None:
            expiry = es.date.isoformat()
    gtin = result.gtin.as_gtin_14() if result.gtin is not None else None
    if not ais and gtin is None:
        raise ValueError("no GS1 element strings")
    return {"gs1": True, "ais": ais, "gtin": gtin, "batch": ais.get("10"), "serial": ais.get("21"),
            "expiry": expiry}


def decode(line: str, source: str = "scanner") -> CodeScan:
    """One scanner line (without its CR / CR LF) as a CodeScan; never raises for what a scanner sends."""
    try:
        return _decode(line, source)
    except (biip.BiipException, ValueError, IndexError) as exc:  # biip trips on some malformed input
        return CodeScan(source=source, text=line, valid=False, error=f"unreadable: {type(exc).__name__}: {exc}")


def _decode(line: str, source: str) -> CodeScan:
    ident = None
    if line.startswith("]"):
        try:
            ident = SymbologyIdentifier.extract(line)
        except (biip.ParseError, ValueError, IndexError):  # ']', ']Y ' ... are not identifiers
            ident = None
        if ident is None or len(ident.value) < 3:  # ']C': biip takes it for one
            return CodeScan(source=source, text=line, valid=False,
                            error=f"unknown AIM symbology identifier {line[:3]!r}")
    sym = ident.value if ident is not None else ""
    text = line[len(sym):]
    name = (ident.gs1_symbology or ident.iso_symbology).name if ident is not None else "unknown"
    common: dict[str, Any] = {"source": source, "text": text, "symbology": sym, "symbology_name": name}
    if ident is not None and ident.gs1_symbology in GS1_SYMBOLOGIES:
        result = biip.parse(line)
        if result.gs1_message is None and result.gtin is None:
            why = result.gs1_message_error or result.gtin_error or "no GS1 content"
            return CodeScan(**common, gs1=True, valid=False, error=why)
    elif text.startswith(("http://", "https://")):
        result = biip.parse(text)
        if result.gs1_digital_link_uri is None:
            return CodeScan(**common)  # a URL, not a GS1 Digital Link: kept as text
    else:
        return CodeScan(**common)
    try:
        return CodeScan(**common, **_gs1_fields(result))
    except ValueError as exc:
        return CodeScan(**common, gs1=True, valid=False, error=str(exc))


class ScanLineParser:
    """Incremental parser: lines ended by CR, LF or CR LF. Counters: frames (lines), corrupt."""

    def __init__(self, encoding: str = "utf-8", max_line: int = 4096) -> None:
        self.buf = bytearray()
        self.encoding = encoding
        self.max_line = max_line
        self.frames = 0
        self.corrupt = 0
        self._overlong = False  # dropping the rest of a line that ran past max_line

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> str | None:
        while True:
            ends = [i for i in (self.buf.find(b"\r"), self.buf.find(b"\n")) if i >= 0]
            if not ends:
                if len(self.buf) > self.max_line:
                    if not self._overlong:
                        self.corrupt += 1
                    self._overlong = True
                    self.buf.clear()
                return None
            end = min(ends)
            raw = bytes(self.buf[:end])
            del self.buf[: end + 1]
            if self._overlong:  # the tail of a line already counted
                self._overlong = False
                continue
            if not raw:
                continue  # the LF of a CR LF
            try:
                line = raw.decode(self.encoding)
            except UnicodeDecodeError:
                self.corrupt += 1
                continue
            self.frames += 1
            return line


class BarcodeSerialConfig(SerialPortConfig):
    driver: Literal["barcode-serial"] = "barcode-serial"
    encoding: str = Field("utf-8", description="how the scanner sends text beyond ASCII (utf-8, latin-1, gb18030)")
    max_line: int = Field(4096, ge=16, le=1 << 20, description="a longer line without CR/LF is noise")
    silent_after_s: float = Field(
        86400.0, gt=0, description="a scanner sends nothing between scans: no silence fault unless lowered")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r}: use a Python codec name such as utf-8 or gb18030") from None
        return v


class BarcodeSerial(StreamSerialDriver):
    """Barcode / QR / DataMatrix scanner in serial mode. Yields CodeScan (valid=False for a damaged read)."""

    Config = BarcodeSerialConfig
    PRODUCES = (CodeScan,)
    config: BarcodeSerialConfig
    parser: ScanLineParser

    def __init__(self, role: str, config: BarcodeSerialConfig) -> None:
        super().__init__(role, config)
        self.parser = ScanLineParser(self.config.encoding, self.config.max_line)
        self.stats.extra["invalid"] = 0

    def _next(self) -> CodeScan | None:
        line = self.parser.next()
        self.stats.frames, self.stats.corrupt = self.parser.frames, self.parser.corrupt
        if line is None:
            return None
        scan = decode(line, self.role)
        if not scan.valid:
            self.stats.extra["invalid"] += 1
        return scan
