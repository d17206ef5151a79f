"""The hub's store as an interface, and the two stores behind it.

`HubStorage` is what the hub service and the `hub stats|fleet|verify` commands use. Two implementations
keep the same guarantees (tests/test_store_contract.py runs one suite over both):
  - hub/store.py `HubStore`: one SQLite file, the embedded default, one hub process;
  - hub/store_pg.py `PgHubStore`: PostgreSQL (psycopg 3), for several hub workers on one MQTT shared
    subscription writing into one database (docs/scale.md).
Both: a record is kept once per (device_id, seq) (the primary key in the database); a redelivery is dropped
and counted; other content for a stored seq is a conflict, kept apart and counted; `store()` returns only
after its transaction committed durably, so the hub acks only what survives a crash of the hub.

`open_store(target)`: a `postgresql://` (or `postgres://`) URL or a libpq `key=value` string opens
PostgreSQL; anything else is the path of a SQLite file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from customs_edge.hub.intake import Incoming
from customs_edge.hub.store import MAX_SEQ_JUMP, DeviceStats, FleetRow, HubStore, Stored, Verdict


class HubStorage(Protocol):
    db: Any  # the database connection (sqlite3 or psycopg), for read-only reports (hub/lanes.py gate_records)

    def store(self, batches: Iterable[Incoming], refused: Mapping[str, int] | None = None) -> list[Stored]: ...
    def set_status(self, device_id: str, status: str, unit_type: str | None = None,
                   site: str | None = None) -> None: ...
    def put_health(self, messages: Iterable[tuple[str, float, str]], refused: Mapping[str, int]) -> int: ...
    def health_history(self, device_id: str, limit: int = ...) -> list[tuple[float, str]]: ...
    def fleet(self) -> list[FleetRow]: ...
    def stats(self) -> list[DeviceStats]: ...
    def refused(self) -> dict[str, int]: ...
    def gap_ranges(self, device_id: str, limit: int = 20) -> list[tuple[int, int]]: ...
    def verify(self, device_id: str, key: Ed25519PublicKey | None = None, all_signed: bool = False) -> Verdict: ...
    def close(self) -> None: ...


def is_postgres(target: str | Path) -> bool:
    text = str(target)
    return text.startswith(("postgresql://", "postgres://")) or ("=" in text and "dbname" in text)


def open_store(target: str | Path, synchronous: str = "FULL", *, readonly: bool = False,
               postgres: bool | None = None, max_seq_jump: int = MAX_SEQ_JUMP) -> HubStorage:
    """The store `target` names: PostgreSQL for a URL or conninfo string (or with postgres=True), else a SQLite
    file (`synchronous` applies to SQLite only)."""
    if postgres or (postgres is None and isinstance(target, str) and is_postgres(target)):
        from customs_edge.hub.store_pg import PgHubStore

        return PgHubStore(str(target), readonly=readonly, max_seq_jump=max_seq_jump)
    return HubStore(target, synchronous, readonly=readonly, max_seq_jump=max_seq_jump)
