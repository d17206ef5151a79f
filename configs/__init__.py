"""Worked unit configs, one per unit type, shipped as package data (read with importlib.resources)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_path(unit_type: str) -> Path:
    """The shipped example config of a unit type, e.g. config_path('ore-station')."""
    return Path(str(files(__name__) / f"{unit_type}.yaml"))
