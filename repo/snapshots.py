"""Snapshot records: one per snapshot, naming a manifest root per disk.

A record is stored under ``snapshots/<id>``, where the id is 32 random bytes
in hex chosen when the snapshot begins (sources may name change-tracking
state after it). Its presence is what makes a snapshot exist: it is written
only after every blob it references is durable and indexed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from vmrepo.storage.errors import ObjectNotFound

from .codec import RecordKind
from .errors import IncompatibleRepository, IntegrityError
from .format import SNAPSHOT_PREFIX, parse_hex_name, snapshot_key

if TYPE_CHECKING:
    from .store import RepoStore

SNAPSHOT_VERSION = 1

#: How a disk was taken: a full read, or changes on top of a base snapshot.
TAKEN_AS = ("full", "incremental", "differential")


def new_snapshot_id() -> str:
    return secrets.token_hex(32)


@dataclass
class DiskRecord:
    """One disk of a snapshot."""

    name: str
    size: int
    root: bytes
    taken: str
    reason: str
    base: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def to_map(self) -> dict[str, Any]:
        return {
            "name": self.name, "size": self.size, "root": self.root, "taken": self.taken,
            "reason": self.reason, "base": self.base, "stats": self.stats,
            "source": self.source,
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> DiskRecord:
        return cls(str(m["name"]), int(m["size"]), bytes(m["root"]), str(m["taken"]),
                   str(m["reason"]), m.get("base"), dict(m.get("stats", {})),
                   dict(m.get("source", {})))


@dataclass
class Snapshot:
    """A committed snapshot of one VM."""

    id: str
    vm: str
    time: datetime
    host: str
    source: str
    disks: list[DiskRecord]
    tags: list[str] = field(default_factory=list)
    source_info: dict[str, Any] = field(default_factory=dict)
    program: str = ""
    #: Problems met after the record was written (not stored).
    warnings: list[str] = field(default_factory=list)
    #: The signal that came while the record was being committed (not stored).
    interrupted: str | None = None

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def disk(self, name: str) -> DiskRecord | None:
        return next((d for d in self.disks if d.name == name), None)

    def fields(self) -> dict[str, Any]:
        return {
            "v": SNAPSHOT_VERSION,
            "id": self.id,
            "vm": self.vm,
            "time": self.time.astimezone(UTC).isoformat(timespec="microseconds"),
            "host": self.host,
            "tags": self.tags,
            "source": {"plugin": self.source, "info": self.source_info},
            "disks": [d.to_map() for d in self.disks],
            "program": self.program,
        }

    @classmethod
    def from_fields(cls, rec: dict[str, Any], what: str) -> Snapshot:
        try:
            t = datetime.fromisoformat(rec["time"])
            if t.tzinfo is None:
                raise ValueError("time without zone")
            return cls(
                id=str(rec["id"]), vm=str(rec["vm"]), time=t, host=str(rec["host"]),
                source=str(rec["source"]["plugin"]),
                disks=[DiskRecord.from_map(d) for d in rec["disks"]],
                tags=[str(t) for t in rec.get("tags", [])],
                source_info=dict(rec["source"].get("info", {})),
                program=str(rec.get("program", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{what}: malformed snapshot record ({exc})", key=what) from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vm": self.vm,
            "time": self.time.astimezone(UTC).isoformat(timespec="seconds"),
            "host": self.host,
            "tags": self.tags,
            "source": {"plugin": self.source, "info": self.source_info},
            "disks": [
                {**d.to_map(), "root": d.root.hex()} for d in self.disks
            ],
        }


def save_snapshot(store: RepoStore, snap: Snapshot) -> None:
    store.put_record(RecordKind.SNAPSHOT, snapshot_key(snap.id), snap.fields())


def load_snapshots(store: RepoStore) -> list[Snapshot]:
    """Every snapshot record that decodes, oldest first; the others are reported as damaged
    and left out, names vmrepo never writes are reported as foreign."""
    listing = store.listing(SNAPSHOT_PREFIX,
                            lambda k: parse_hex_name(k, SNAPSHOT_PREFIX) is not None)
    store.forget_cached(SNAPSHOT_PREFIX, (i.key for i in listing))
    snaps = []
    for info in listing:
        try:
            rec = store.get_record(RecordKind.SNAPSHOT, info.key, SNAPSHOT_VERSION, info)
            snap = Snapshot.from_fields(rec, info.key)
            if snapshot_key(snap.id) != info.key:
                raise IntegrityError(f"{info.key}: record names another id {snap.id}",
                                     key=info.key)
        except (IntegrityError, IncompatibleRepository) as exc:
            store.problem(info.key, str(exc))
            continue
        except ObjectNotFound:
            continue  # deleted while we listed
        snaps.append(snap)
    snaps.sort(key=lambda s: (s.time, s.id))
    return snaps
