"""Model versions kept on a unit (pushed by `customs-edge fleet model push`, agent/model_update.py).

Layout, under the unit's `models.dir` (default `{outbox.path}.models`):
  {name}/{version}/manifest.json   a verified version: its manifest, `manifest.json.sig`, the files it names
  {name}/current                   the version the app runs (text); absent: the model the unit config names
  {name}/previous                  the version before it ("" = the unit config's own model): for a rollback
  .staging/{name}@{version}/       a transfer under way (never loaded)
The pointer files are replaced atomically (write, fsync, rename, directory fsync): a power cut leaves the old
version or the new one current, never a half-written one (versions are complete before a pointer names them).

An app key naming a model manifest (a Path field whose description says "manifest", as `config validate`
finds them) loads the store's current version of the model it would otherwise load, matched by manifest name.
A key left unset names its shipped model in the field's `json_schema_extra={"shipped_model": DIR}`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from customs_edge.agent.commands import write_synced
from customs_edge.agent.config import UnitConfig
from customs_edge.models import default_manifest

STAGING = ".staging"


def store_dir(cfg: UnitConfig) -> Path:
    return cfg.models.dir or Path(f"{cfg.outbox.path}.models")


def read_pointer(store: Path, name: str, which: str) -> str | None:
    """The version a pointer file names ("" for the config's own model); None when there is none."""
    try:
        return (store / name / which).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_pointer(store: Path, name: str, which: str, version: str | None) -> None:
    """Point `which` at `version` (durably); None removes the pointer (the config's own model)."""
    path = store / name / which
    if version is None:
        path.unlink(missing_ok=True)
    else:
        write_synced(path, version + "\n")


def version_manifest(store: Path, name: str, version: str) -> Path:
    return store / name / version / "manifest.json"


@lru_cache(maxsize=64)
def _manifest_name(path: Path, mtime_ns: int) -> str | None:
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def manifest_name(path: Path) -> str | None:
    try:
        return _manifest_name(path, path.stat().st_mtime_ns)
    except OSError:
        return None


def model_keys(app_cfg: BaseModel | dict[str, object]) -> dict[str, Path]:
    """App key -> the manifest it loads now (the key's value, or its shipped model's manifest)."""
    if not isinstance(app_cfg, BaseModel):
        return {}
    out = {}
    for field, info in type(app_cfg).model_fields.items():
        if "manifest" not in (info.description or ""):
            continue
        value = getattr(app_cfg, field)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        shipped = extra.get("shipped_model")
        if isinstance(value, Path):
            out[field] = value
        elif value is None and isinstance(shipped, str):
            out[field] = default_manifest(shipped)
    return out


def app_models(cfg: UnitConfig) -> dict[str, str]:
    """Manifest name -> app key, of every model the unit's app loads."""
    out = {}
    for field, path in model_keys(cfg.app).items():
        name = manifest_name(path)
        if name is not None:
            out[name] = field
    return out


def effective_app(cfg: UnitConfig) -> BaseModel | dict[str, object]:
    """The app section with each model key pointing at the store's current version of its model, if any."""
    store = store_dir(cfg)
    if not isinstance(cfg.app, BaseModel) or not store.is_dir():
        return cfg.app
    update = {}
    for name, field in app_models(cfg).items():
        version = read_pointer(store, name, "current")
        if version:
            update[field] = version_manifest(store, name, version)
    return cfg.app.model_copy(update=update) if update else cfg.app
