"""Damage records: what verify found unusable, so that snapshots do not build on it.

``damage/<random id>`` (docs/format.md §14) names packs that are unusable as a whole
(missing, truncated, or whose header is damaged) and single blob copies (a blob id in a
pack) that fail their checks. Writing sessions read them after taking their lock, like
prune marks, and use no entry they name: a blob whose every copy is named is stored
again, and readers try the new copy first. ``verify`` replaces the records with what
it found; ``repair`` removes them once it has dropped the bad copies.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vmrepo.storage.errors import ObjectNotFound

from .codec import RecordKind
from .errors import IncompatibleRepository, IntegrityError
from .format import DAMAGE_PREFIX, damage_key
from .store import RepoStore

DAMAGE_VERSION = 1


@dataclass
class Damage:
    """Unusable packs and blob copies (a union of records)."""

    packs: set[bytes] = field(default_factory=set)
    copies: set[tuple[bytes, bytes]] = field(default_factory=set)  # (blob id, pack id)
    records: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.packs or self.copies)

    def bad(self, blob_id: bytes, pack_id: bytes) -> bool:
        return pack_id in self.packs or (blob_id, pack_id) in self.copies


def load(store: RepoStore) -> Damage:
    """Every readable damage record, together; unreadable ones are reported and ignored."""
    out = Damage()
    for info in store.listing(DAMAGE_PREFIX):
        try:
            rec = store.get_record(RecordKind.DAMAGE, info.key, DAMAGE_VERSION)
            packs = {bytes(p) for p in rec["packs"]}
            copies = {(bytes(b), bytes(p)) for b, p in rec["copies"]}
        except ObjectNotFound:
            continue
        except (IntegrityError, IncompatibleRepository) as exc:
            store.problem(info.key, f"unreadable damage record, ignored ({exc})")
            continue
        except (KeyError, TypeError, ValueError) as exc:
            store.problem(info.key, f"malformed damage record, ignored ({exc})")
            continue
        out.packs |= packs
        out.copies |= copies
        out.records.append(info.key)
    return out


def replace(store: RepoStore, damage: Damage, old: Iterable[str]) -> str | None:
    """Write ``damage`` as one record (none if it is empty), then delete the ``old``
    records; return the new record's key."""
    key = None
    if damage:
        key = damage_key(secrets.token_hex(16))
        fields: dict[str, Any] = {
            "v": DAMAGE_VERSION, "time": datetime.now(UTC).isoformat(),
            "host": socket.gethostname(), "packs": sorted(damage.packs),
            "copies": [[b, p] for b, p in sorted(damage.copies)]}
        store.put_record(RecordKind.DAMAGE, key, fields)
    for k in old:
        if k != key:
            store.delete(k)
    return key
