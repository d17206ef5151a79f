"""biip's GS1 Company Prefix table, kept in 0.9 MB instead of ~5 MB of Python dicts.

`biip.gs1_prefixes` loads GS1's company prefix list at import as a trie of nested dicts (21,792 nodes,
170,843 prefixes): about 5 MB of Python objects that every process parsing a GTIN keeps for its life, 4% of
a handheld's memory budget (docs/handheld.md, "Memory"). `compact_company_prefixes()` rebuilds the same
trie as one `array` of 10 slots per node and puts a read-only view of it in biip's place, so biip's own
`GS1CompanyPrefix.extract` (`digit in node`, `node[digit]`, an `int` at a leaf) walks it unchanged and
answers exactly as before (tests/test_gs1_prefixes.py compares every prefix in the list). The dicts are
freed. Nothing is parsed by hand: biip still reads the barcode, this only stores biip's table compactly.

If a biip release changes how it holds the table (not a dict of digit -> dict | int at module level), the
table is left as biip made it and the function says so (returns False).
"""

from __future__ import annotations

import logging
from array import array
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

_ABSENT = -1  # slot value: no such digit; >= 0: index of the child node; <= -2: a leaf, -(prefix length + 2)


class CompactTrieNode(dict):  # biip asserts isinstance(node, dict)
    """One node of the compact trie: `digit in node`, `node[digit]` (a node, or the prefix length at a
    leaf), as biip's nested dicts answer them. Holds no items of its own; made on each step of a lookup."""

    __slots__ = ("_base", "_slots")

    def __init__(self, slots: array[int], index: int) -> None:
        super().__init__()
        self._slots, self._base = slots, index * 10

    def _slot(self, digit: object) -> int:
        if isinstance(digit, str) and len(digit) == 1 and "0" <= digit <= "9":
            return self._slots[self._base + ord(digit) - 48]
        return _ABSENT

    def __contains__(self, digit: object) -> bool:
        return self._slot(digit) != _ABSENT

    def __getitem__(self, digit: str) -> CompactTrieNode | int:
        v = self._slot(digit)
        if v == _ABSENT:
            raise KeyError(digit)
        return CompactTrieNode(self._slots, v) if v >= 0 else -v - 2

    def get(self, digit: str, default: Any = None) -> Any:
        v = self._slot(digit)
        return default if v == _ABSENT else self[digit]

    def __len__(self) -> int:
        return sum(1 for d in range(10) if self._slots[self._base + d] != _ABSENT)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"<CompactTrieNode {self._base // 10} of {len(self._slots) // 10}>"


def compact(trie: dict[str, Any]) -> CompactTrieNode:
    """The compact form of a digit trie (dict: digit -> dict | int >= 0); ValueError if it is not one."""
    slots = array("i")
    queue: deque[dict[str, Any]] = deque([trie])
    count = 1
    while queue:
        node = queue.popleft()
        row = [_ABSENT] * 10
        for digit, child in node.items():
            if not (isinstance(digit, str) and len(digit) == 1 and digit.isdigit()):
                raise ValueError(f"not a digit trie: key {digit!r}")
            if isinstance(child, dict):
                row[int(digit)] = count
                count += 1
                queue.append(child)
            elif isinstance(child, int) and not isinstance(child, bool) and child >= 0:
                row[int(digit)] = -child - 2
            else:
                raise ValueError(f"not a digit trie: leaf {child!r}")
        slots.extend(row)
    return CompactTrieNode(slots, 0)


def compact_company_prefixes() -> bool:
    """Replace biip's company prefix trie with its compact form (see the module doc). True when it is
    compact (now or already); False when biip holds it in a way this does not know (left alone)."""
    from biip import gs1_prefixes

    trie = getattr(gs1_prefixes, "_GS1_COMPANY_PREFIX_TRIE", None)
    if isinstance(trie, CompactTrieNode):
        return True
    if not isinstance(trie, dict):
        log.info("biip keeps its company prefixes as %s: left as it is", type(trie).__name__)
        return False
    try:
        small = compact(trie)
    except ValueError as exc:
        log.info("biip's company prefix table left as it is: %s", exc)
        return False
    gs1_prefixes._GS1_COMPANY_PREFIX_TRIE = small
    return True
