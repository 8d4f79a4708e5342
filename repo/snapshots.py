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
from typing import Any

from vmrepo.storage.base import Backend

from .errors import IntegrityError
from .format import decode_record, encode_record, snapshot_key

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

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def disk(self, name: str) -> DiskRecord | None:
        return next((d for d in self.disks if d.name == name), None)

    def encode(self) -> bytes:
        return encode_record({
            "v": 1,
            "id": self.id,
            "vm": self.vm,
            "time": self.time.astimezone(UTC).isoformat(timespec="microseconds"),
            "host": self.host,
            "tags": self.tags,
            "source": {"plugin": self.source, "info": self.source_info},
            "disks": [d.to_map() for d in self.disks],
            "program": self.program,
        })

    @classmethod
    def decode(cls, raw: bytes, what: str) -> Snapshot:
        rec = decode_record(raw, what)
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


def save_snapshot(backend: Backend, snap: Snapshot) -> None:
    backend.put(snapshot_key(snap.id), snap.encode())


def load_snapshots(backend: Backend) -> list[Snapshot]:
    """Every snapshot record, oldest first."""
    snaps = []
    for info in backend.list("snapshots/"):
        key = info.key
        snap = Snapshot.decode(backend.get(key), key)
        if snapshot_key(snap.id) != key:
            raise IntegrityError(f"{key}: record names another id {snap.id}", key=key)
        snaps.append(snap)
    snaps.sort(key=lambda s: (s.time, s.id))
    return snaps
