"""Prune marks: packs condemned by a prune, deleted only by a later sweep (docs/format.md §13).

A mark is a record under ``marks/<random id>`` naming packs that no snapshot
needed when it was written. It is written in two steps: first *unarmed*
(``sessions`` is nil), then, after the locks were listed, *armed* with the
ids of the sessions (locks) alive at that moment. Every writing session reads
the marks after it took its lock and never uses a blob through a condemned
pack (it stores the blob again instead). A sweep deletes a mark's packs only
once it is armed, older than the grace period, and none of its sessions is
still alive: any session that could not have seen the mark has ended by then,
and the sweep checks again that no snapshot needs the packs.
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from vmrepo.storage.errors import ObjectNotFound

from .codec import RecordKind
from .errors import IncompatibleRepository, IntegrityError
from .format import MARK_PREFIX, mark_key
from .store import RepoStore

MARK_VERSION = 1


@dataclass(frozen=True)
class Mark:
    id: str
    time: datetime
    host: str
    packs: tuple[bytes, ...]
    #: Lock ids alive when the mark was armed; None while it is not armed.
    sessions: tuple[str, ...] | None = None

    @property
    def armed(self) -> bool:
        return self.sessions is not None

    def fields(self) -> dict[str, Any]:
        return {"v": MARK_VERSION, "id": self.id, "time": self.time.isoformat(),
                "host": self.host, "packs": list(self.packs),
                "sessions": None if self.sessions is None else list(self.sessions)}

    @classmethod
    def from_fields(cls, rec: dict[str, Any], key: str) -> Mark:
        try:
            mark = cls(str(rec["id"]), datetime.fromisoformat(rec["time"]), str(rec["host"]),
                       tuple(bytes(p) for p in rec["packs"]),
                       None if rec["sessions"] is None else tuple(str(s) for s in
                                                                  rec["sessions"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{key}: malformed mark ({exc})", key=key) from exc
        if mark_key(mark.id) != key or mark.time.tzinfo is None:
            raise IntegrityError(f"{key}: malformed mark", key=key)
        return mark


def new_mark(packs: list[bytes], now: datetime | None = None) -> Mark:
    return Mark(secrets.token_hex(16), now or datetime.now(UTC), socket.gethostname(),
                tuple(packs))


def save(store: RepoStore, mark: Mark) -> None:
    store.put_record(RecordKind.MARK, mark_key(mark.id), mark.fields())


def arm(store: RepoStore, mark: Mark, sessions: list[str]) -> Mark:
    armed = replace(mark, sessions=tuple(sorted(sessions)))
    save(store, armed)
    return armed


def load_marks(store: RepoStore, writer: bool = False) -> list[Mark]:
    """Every readable mark. A damaged mark is reported and ignored: no sweep can delete the
    packs it names (it cannot read them either), so using them stays safe. A mark of a newer
    version is ignored too, unless ``writer``: a writer refuses to run, since a newer prune
    can read it and delete what it condemns."""
    marks = []
    for info in store.listing(MARK_PREFIX):
        try:
            rec = store.get_record(RecordKind.MARK, info.key, MARK_VERSION)
            marks.append(Mark.from_fields(rec, info.key))
        except ObjectNotFound:
            continue  # swept while we listed
        except IncompatibleRepository as exc:
            if writer:
                raise IncompatibleRepository(f"{info.key} was written by a newer vmrepo "
                                             f"({exc}): upgrade vmrepo to write into this "
                                             "repository") from None
            store.problem(info.key, f"prune mark of a newer vmrepo, ignored ({exc})")
        except IntegrityError as exc:
            store.problem(info.key, f"unreadable prune mark, ignored ({exc})")
    return marks


def condemned(marks: list[Mark]) -> set[bytes]:
    """The packs some mark condemns."""
    return {p for m in marks for p in m.packs}


def delete(store: RepoStore, mark: Mark) -> None:
    store.delete(mark_key(mark.id))
