"""`customs-edge hub verify [DEVICE]` and `customs-edge key CONFIG` (core/signing.py, hub/store.py verify)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from customs_edge.core import logs


def cmd_verify(db: str, device: str | None, as_json: bool, keys: str | None = None, all_signed: bool = False) -> int:
    """Exit 0 when every device's stored history is complete and unaltered, else 1 (the first bad seq named). With
    the hub's key registry, each registered device's kept batch signatures too; with `all_signed`, every chained
    record of a registered device must be covered by one."""
    from customs_edge.core.signing import load_registry
    from customs_edge.hub.storage import open_store

    registry = load_registry(keys) if keys else {}
    store = open_store(db, readonly=True)
    try:
        devices = [device] if device else [r.device_id for r in store.stats()]
        verdicts = [store.verify(d, registry.get(d), all_signed) for d in devices]
    finally:
        store.close()
    if as_json:
        print(json.dumps({v.device_id: asdict(v) for v in verdicts}, indent=2))
    for v in verdicts if not as_json else []:
        name = logs.escape(v.device_id)
        counts = (f"{v.records} records, {v.dropped} dropped (tombstones), {v.rejected} rejected,"
                  f" {v.unchained} unchained")
        if v.device_id in registry:
            counts += f"; signatures: {v.signed_batches} batches, {v.signed} records signed, {v.unsigned} before them"
        elif keys:
            counts += "; not in the key registry: signatures not checked"
        print(f"{name}: OK, {counts}" if v.bad_seq is None else f"{name}: BAD at seq {v.bad_seq}: {v.reason} ({counts}"
              " before it)")
    return 0 if verdicts and all(v.bad_seq is None for v in verdicts) else 1


def cmd_key(args: argparse.Namespace) -> int:
    """The unit's public key as a line of the hub's key registry (the key is made if the unit has none yet)."""
    from customs_edge.agent.config import load_unit_config
    from customs_edge.core.signing import DeviceKey

    cfg = load_unit_config(args.config)
    print(f"{cfg.device_id} {DeviceKey.beside(cfg.outbox.path).public}")
    return 0
