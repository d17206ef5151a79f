"""Barcode / 2-D code scanner in serial mode, scanning the goods of an inspection.

Written from ISO/IEC 15424 (AIM symbology identifiers: ]E0 EAN-13, ]C1 GS1-128, ]d2 GS1 DataMatrix,
]Q3 GS1 QR, ]Q1 QR, ]I1 ITF-14), the GS1 General Specifications (element strings: AI (01) GTIN-14
with its mod-10 check digit, (17) expiry YYMMDD, (10) batch/lot and (21) serial, variable-length
values ended by FNC1, sent as GS 0x1D, unless last) and GS1 Digital Link (a URI path /01/<gtin>/10/
<lot>/21/<serial> with ?17=<yymmdd>), never from drivers/scanner.py nor with a GS1 library: the check
digits here are computed from the standard's own rule (weights 3 and 1 from the right).

Each read is one line, ended by CR (or CR LF with `crlf`). Content: products from a seeded catalogue
(GTINs with valid check digits, lots, serials, expiry dates), traceability URLs (GS1 Digital Link and
plain ones), plain traceability codes, and damaged reads (a wrong check digit, a month 13, letters in
a GTIN) at `damaged_rate` or on demand. `ScannerSim.truth` lists every line sent with what it means.

    customs-edge simulate scanner [--period 2] [--damaged-rate 0.05] [--crlf] [--link /tmp/scanner0]
prints {"urls": {"scanner": {"pty": "/dev/pts/N", "socket": "socket://127.0.0.1:P"}}} and runs until stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import string
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from customs_edge.simulators.base import (
    Conn,
    Faults,
    PeriodicSim,
    add_endpoint_args,
    endpoints_from_args,
    run_until_signalled,
)

GS = "\x1d"
KINDS = ("gs1-128", "gs1-datamatrix", "gs1-qr", "ean-13", "itf-14", "digital-link", "url", "text")
DAMAGES = ("check-digit", "bad-date", "letters-in-gtin")


def check_digit(digits: str) -> str:
    """GS1 mod-10: weights 3, 1, 3, ... from the rightmost digit of the data (without the check digit)."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(digits)))
    return str((10 - total % 10) % 10)


@dataclass(frozen=True, slots=True)
class ScanTruth:
    line: str  # as sent, without CR / CR LF
    kind: str
    gtin: str | None = None  # 14 digits
    batch: str | None = None
    serial: str | None = None
    expiry: dt.date | None = None
    text: str | None = None  # the payload of a non-GS1 read
    damage: str | None = None  # None: a good read


@dataclass(frozen=True, slots=True)
class Product:
    gtin: str  # 14 digits, valid check digit
    batch: str
    expiry: dt.date


class ScanWorld:
    """Deterministic for a seed: the catalogue and the sequence of reads."""

    def __init__(self, seed: int | None = None, damaged_rate: float = 0.05, products: int = 20) -> None:
        self.rng = random.Random(seed)
        self.damaged_rate = damaged_rate
        self.catalogue = [self._product() for _ in range(products)]
        self._damage_next: list[str] = []
        self._lock = threading.Lock()

    def _product(self) -> Product:
        body = "0" + "".join(self.rng.choice(string.digits) for _ in range(12))  # indicator 0, 12 digits
        batch = "".join(self.rng.choice(string.ascii_uppercase + string.digits + "-") for _ in range(
            self.rng.randint(3, 10)))
        expiry = dt.date(2026, 1, 1) + dt.timedelta(days=self.rng.randint(0, 1500))
        return Product(body + check_digit(body), batch, expiry)

    def damage_next(self, kind: str = "check-digit") -> None:
        """The next read is damaged this way (one of DAMAGES)."""
        if kind not in DAMAGES:
            raise ValueError(f"damage must be one of {', '.join(DAMAGES)}")
        with self._lock:
            self._damage_next.append(kind)

    def _serial(self) -> str:
        return "".join(self.rng.choice(string.ascii_uppercase + string.digits) for _ in range(self.rng.randint(6, 12)))

    def read(self) -> ScanTruth:
        with self._lock:
            damage = self._damage_next.pop(0) if self._damage_next else (
                self.rng.choice(DAMAGES) if self.rng.random() < self.damaged_rate else None)
            kind = self.rng.choice(KINDS[:5]) if damage else self.rng.choice(KINDS)
            return self._make(kind, self.rng.choice(self.catalogue), self._serial(), damage)

    def _make(self, kind: str, p: Product, serial: str, damage: str | None) -> ScanTruth:
        gtin, yymmdd = p.gtin, p.expiry.strftime("%y%m%d")
        if damage == "check-digit":
            gtin = gtin[:-1] + str((int(gtin[-1]) + 1 + self.rng.randrange(9)) % 10)
        elif damage == "letters-in-gtin":
            gtin = gtin[:5] + "AB" + gtin[7:]
        elif damage == "bad-date":
            yymmdd = yymmdd[:2] + "13" + yymmdd[4:]
            if kind in ("ean-13", "itf-14"):  # no date in a bare GTIN
                kind = "gs1-128"
        line = {
            "gs1-128": f"]C101{gtin}17{yymmdd}10{p.batch}{GS}21{serial}",  # fixed-length AIs first, GS after a lot
            "gs1-datamatrix": f"]d201{gtin}21{serial}{GS}17{yymmdd}10{p.batch}",
            "gs1-qr": f"]Q301{gtin}10{p.batch}{GS}17{yymmdd}",
            "ean-13": f"]E0{gtin[1:]}",
            "itf-14": f"]I1{gtin}",
            "digital-link": f"]Q1https://id.example.cn/01/{gtin}/10/{p.batch}/21/{serial}?17={yymmdd}",
            "url": f"]Q1https://trace.example.cn/q/{serial}",
            "text": f"]d1溯源码 {serial}",  # a plain traceability code, not GS1 (UTF-8 on the wire)
        }[kind]
        if damage is not None:
            return ScanTruth(line, kind, damage=damage)
        lot = kind in ("gs1-128", "gs1-datamatrix", "gs1-qr", "digital-link")
        return ScanTruth(line, kind, gtin=p.gtin if kind not in ("url", "text") else None,
                         batch=p.batch if lot else None, expiry=p.expiry if lot else None,
                         serial=serial if kind in ("gs1-128", "gs1-datamatrix", "digital-link") else None,
                         text=line[3:] if kind in ("digital-link", "url", "text") else None)


class ScannerSim(PeriodicSim):
    """Sends one read every `period` seconds (an officer scanning the goods of an inspection)."""

    def __init__(self, world: ScanWorld, period_s: float = 2.0, crlf: bool = False,
                 faults: Faults | None = None) -> None:
        super().__init__(faults)
        self.world = world
        self.period = period_s
        self.suffix = b"\r\n" if crlf else b"\r"
        self.truth: list[ScanTruth] = []

    def tick(self, conn: Conn) -> None:
        t = self.world.read()
        self.truth.append(t)
        conn.write(self.faults.mangle(t.line.encode("utf-8") + self.suffix))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="customs-edge simulate scanner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--period", type=float, default=2.0, help="seconds between reads")
    p.add_argument("--damaged-rate", type=float, default=0.05, help="share of damaged reads (bad GS1 content)")
    p.add_argument("--crlf", action="store_true", help="end lines with CR LF (default: CR)")
    add_endpoint_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sim = ScannerSim(ScanWorld(args.seed, args.damaged_rate), args.period, args.crlf,
                     Faults(args.corrupt_rate, args.seed))
    run_until_signalled({"scanner": endpoints_from_args(sim, args)}, args=args)
