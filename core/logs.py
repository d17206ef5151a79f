"""Structured log lines on stderr (journald keeps them): `level=warning event="..." key=value ...`.

Log events, not per-record chatter: connects, faults, drops, reloads. Pass fields with `extra={...}`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _hex(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def escape(text: str) -> str:
    """`text` on one line, unambiguous: backslash, double quote, \\n, \\r and \\t backslash-escaped, any other
    non-printable character (control characters, U+2028, ...) as \\xNN / \\uNNNN. A device id or topic
    holding "\\nlevel=error" must not forge a line in the log or in `hub stats`."""
    if text.isprintable() and "\\" not in text and '"' not in text:
        return text
    return "".join(_ESCAPES.get(c) or (c if c.isprintable() else _hex(c)) for c in text)


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")


def redact(text: str) -> str:
    """`text` with the `user:password@` of every URL in it replaced by `***@` (a camera's rtsp:// URL, a
    broker URL): what goes into a log line, an error message or a record sent to the hub."""
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text


def _fmt(value: Any) -> str:
    text = redact(str(value))
    if text and text.isprintable() and not any(c in text for c in ' ="\\'):
        return text
    return '"' + escape(text) + '"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.with_time:
            parts.append("ts=" + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                         + f".{int(record.msecs):03d}Z")
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}", f"event={_fmt(record.getMessage())}"]
        parts += [f"{k}={_fmt(v)}" for k, v in record.__dict__.items() if k not in _STANDARD]
        if record.exc_info:
            parts.append("exc=" + _fmt(self.formatException(record.exc_info).replace("\n", " | ")))
        return " ".join(parts)


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd, journald stamps each line itself.
    import os

    handler.setFormatter(LogfmtFormatter(with_time="JOURNAL_STREAM" not in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
