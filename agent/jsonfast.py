"""JSON helpers used on hot paths (one call per record): compact separators, numpy scalars handled."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def _default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


_enc = json.JSONEncoder(separators=(",", ":"), default=_default, allow_nan=False)


def dumps(obj: Any) -> str:
    return _enc.encode(obj)


loads = json.loads
