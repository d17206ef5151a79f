"""Log lines: one event, one line, whatever the values hold; every value reads back exactly."""

from __future__ import annotations

import logging
import re

from customs_edge.core.logs import LogfmtFormatter

FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ ]*)(?: |$)')


def unescape(text: str) -> str:
    simple = {"n": "\n", "r": "\r", "t": "\t"}
    return re.sub(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)',
                  lambda m: chr(int(m[1][1:], 16)) if m[1][0] in "xuU" and len(m[1]) > 1 else simple.get(m[1], m[1]),
                  text)


def parse(line: str) -> dict[str, str]:
    """A logfmt line back into its fields; fails on anything that is not one field after another."""
    fields, pos = {}, 0
    for m in FIELD.finditer(line):
        assert m.start() == pos, f"not logfmt at {pos}: {line[pos:]!r}"
        value = m[2]
        fields[m[1]] = unescape(value[1:-1]) if value.startswith('"') else value
        pos = m.end()
    assert pos == len(line), f"not logfmt at {pos}: {line[pos:]!r}"
    return fields


def line(msg: str, **extra: object) -> str:
    record = logging.LogRecord("customs_edge.hub.service", logging.WARNING, __file__, 1, msg, (), None)
    record.__dict__.update(extra)
    return LogfmtFormatter(with_time=False).format(record)


def test_a_value_holding_a_newline_cannot_forge_a_log_line() -> None:
    forged = "dev-1\nlevel=error event=\"hub stopped\""
    out = line("refused a records message", topic=f"customs-edge/v1/{forged}/records", device=forged)
    assert "\n" not in out
    assert parse(out) == {"level": "warning", "logger": "customs_edge.hub.service",
                          "event": "refused a records message", "topic": f"customs-edge/v1/{forged}/records",
                          "device": forged}


def test_every_control_character_is_escaped_and_reads_back() -> None:
    values = {"cr": "a\rb", "tab": "a\tb", "esc": "\x1b[2J", "nul": "a\x00b", "del": "\x7f", "nel": "a\x85b",
              "ls": "a\u2028b", "backslash": "C:\\new\\table", "quote": 'say "hi"', "empty": "", "plain": "dev-1",
              "eq": "a=b"}
    out = line("event\nwith a newline", **values)
    assert all(c.isprintable() for c in out)
    assert parse(out) == {"level": "warning", "logger": "customs_edge.hub.service",
                          "event": "event\nwith a newline", **values}
    assert "plain=dev-1 " in out and "esc=\"\\x1b[2J\"" in out and "ls=\"a\\u2028b\"" in out
