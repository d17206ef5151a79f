"""The hub's config file (`customs-edge hub --config /etc/customs-edge/hub.yaml`), read like a unit's.

The same loader as unit files (bounded YAML, every problem at once with its line, did-you-mean for unknown
keys, YAML 1.1 conversions named, secrets never echoed); command-line flags override the file's values.
Files the hub needs before it can run (the key registry, TLS files, the password file, the database's
directory) are checked here, so that `hub --check-config` (the unit's ExecStartPre) refuses a bad file
before the hub starts. `${CREDENTIALS_DIRECTORY}` in a path is the directory systemd fills from the unit's
`LoadCredential=` (systemd/customs-edge-hub.service): key and password files never appear on a command line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from customs_edge.agent.config import Positions, _at_line, _clip, echo, format_errors, read_yaml_marked
from customs_edge.core.errors import ConfigError
from customs_edge.hub.service import HubConfig

CREDENTIALS_VAR = "CREDENTIALS_DIRECTORY"
_VAR = re.compile(r"\$\{?CREDENTIALS_DIRECTORY\}?")
# keys whose value is a file the hub reads at start (must exist and be readable)
READ_FILES = ("keys", "tls_ca", "tls_cert", "tls_key", "password_file")
PATH_KEYS = (*READ_FILES, "db", "photos_dir")


def load_hub_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> HubConfig:
    """The hub's config: the file at `path` (if any) with `overrides` (the command line's flags) on top."""
    overrides = overrides or {}
    raw: dict[str, Any] = {}
    positions: Positions | None = None
    source = str(path) if path is not None else "customs-edge hub"
    if path is not None:
        try:
            data, positions = read_yaml_marked(Path(path))
        except ConfigError as exc:
            if exc.problems and exc.problems[0].startswith("empty"):
                raise ConfigError(source, ["empty: write at least `host:` and `port:` of the broker "
                                           "(configs/hub/hub.yaml is an example)"]) from exc
            raise
        if not isinstance(data, dict):
            raise ConfigError(source, [f"top level must be a mapping of keys to values (got {echo(data)})"])
        raw = dict(data)
    problems: list[str] = []
    merged = {**raw, **overrides}
    unresolved: set[str] = set()
    for key in PATH_KEYS:
        value = merged.get(key)
        if isinstance(value, str) and _VAR.search(value):
            where = _where(key, overrides, positions)
            directory = os.environ.get(CREDENTIALS_VAR)
            if not directory:
                problems.append(where(f"{key}: uses ${CREDENTIALS_VAR}, which systemd sets only for a unit with "
                                      "LoadCredential= (systemd/customs-edge-hub.service): check the file there "
                                      "(`systemctl restart customs-edge-hub` runs --check-config first), or write "
                                      "the file's path"))
                unresolved.add(key)
                continue
            merged[key] = _VAR.sub(directory.replace("\\", "\\\\"), value)
    try:
        cfg = HubConfig.model_validate(merged)
    except ValidationError as exc:
        for line in format_errors(exc, HubConfig, positions=positions):
            top = line.split(".", 1)[0].split(":", 1)[0]
            if top in overrides:
                problems.append(_clip(f"--{top.replace('_', '-')} (option): {line.split(': ', 1)[-1]}"))
            else:
                problems.append(_at_line(_clip(line if path else line.replace("(top level)", "options", 1)),
                                         positions))
        raise ConfigError(source, problems) from exc
    for key in READ_FILES:
        value = getattr(cfg, key)
        if value is None or key in unresolved:
            continue
        where = _where(key, overrides, positions)
        shown = "(path not shown: secret)" if key == "password_file" else str(value)
        if not value.is_file():
            problems.append(where(f"{key}: {shown}: no such file: write the path of an existing file"
                                  + (" (under systemd: put it in /etc/customs-edge/hub-credentials/)"
                                     if key != "keys" else "")))
        elif not os.access(value, os.R_OK):
            problems.append(where(f"{key}: {shown}: not readable by this user: under systemd, load it with "
                                  "LoadCredential= (the hub runs as a dynamic user)"))
    if cfg.photos_dir is not None and not (cfg.photos_dir.is_dir() or cfg.photos_dir.parent.is_dir()):
        problems.append(_where("photos_dir", overrides, positions)(
            f"photos_dir: {cfg.photos_dir}: neither it nor its parent directory exists: create it"))
    parent = cfg.db.parent
    if cfg.postgres is None and not parent.is_dir():
        problems.append(_where("db", overrides, positions)(
            f"db: {cfg.db}: the directory {parent} does not exist: create it, or point db into an existing one "
            "(the unit's is /var/lib/customs-edge-hub, made by StateDirectory=)"))
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _where(key: str, overrides: dict[str, Any], positions: Positions | None) -> Callable[[str], str]:
    """How a problem with `key` names its origin: the option, or the file's line."""
    if key in overrides:
        return lambda p: _clip(f"--{key.replace('_', '-')} (option): {p.split(': ', 1)[-1]}")
    return lambda p: _at_line(_clip(p), positions)
