"""Snapshot specs ``VM@WHEN`` and their resolution against the snapshot list.

``WHEN`` is one of:

* ``latest``: the newest snapshot of the VM;
* ``YYYY-MM-DD``: the newest snapshot taken that day (local time);
* ``YYYY-MM-DDTHH:MM`` or ``YYYY-MM-DDTHH:MM:SS``: the snapshot taken in that
  minute or second (local time); several is ambiguous;
* a hex prefix of the snapshot id (at least 4 digits);

each optionally followed by ``~N``: the N-th snapshot of the VM before the
one named (``vm1@latest~1`` is the one before the newest).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo

from .errors import AmbiguousSnapshot, SnapshotNotFound, SpecError
from .snapshots import Snapshot

VM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?")
_HEX = re.compile(r"[0-9a-f]{4,64}")
_BACK = re.compile(r"(.*)~(\d+)")
MAX_LISTED = 10


@dataclass(frozen=True)
class Spec:
    vm: str
    when: str
    kind: str  # latest | day | time | id
    #: How many snapshots before the one ``when`` names (``~N``).
    back: int = 0

    def __str__(self) -> str:
        return f"{self.vm}@{self.when}{'~' + str(self.back) if self.back else ''}"


def parse_spec(text: str) -> Spec:
    vm, sep, when = text.partition("@")
    if not sep:
        raise SpecError(text, "expected VM@WHEN (e.g. vm1@latest, vm1@2024-05-01)")
    if not VM_NAME_RE.fullmatch(vm):
        raise SpecError(text, f"invalid VM name {vm!r}")
    back = 0
    m = _BACK.fullmatch(when)
    if m:
        when, back = m.group(1), int(m.group(2))
    if when == "latest":
        return Spec(vm, when, "latest", back)
    if _DAY.fullmatch(when):
        _check_time(text, when, "%Y-%m-%d")
        return Spec(vm, when, "day", back)
    if _TIME.fullmatch(when):
        _check_time(text, when, "%Y-%m-%dT%H:%M:%S" if when.count(":") == 2 else "%Y-%m-%dT%H:%M")
        return Spec(vm, when, "time", back)
    if _HEX.fullmatch(when.lower()):
        return Spec(vm, when.lower(), "id", back)
    raise SpecError(text, "WHEN must be latest, YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS] or an id "
                          "prefix of at least 4 hex digits, optionally followed by ~N")


def _check_time(text: str, when: str, fmt: str) -> None:
    try:
        datetime.strptime(when, fmt)
    except ValueError:
        raise SpecError(text, f"{when} is not a valid date or time") from None


def label(snap: Snapshot, tz: tzinfo | None = None) -> str:
    return f"{snap.vm}@{snap.short_id} ({snap.time.astimezone(tz):%Y-%m-%d %H:%M:%S})"


def _labels(snaps: Sequence[Snapshot], tz: tzinfo | None) -> list[str]:
    newest = sorted(snaps, key=lambda s: (s.time, s.id), reverse=True)
    out = [label(s, tz) for s in newest[:MAX_LISTED]]
    if len(newest) > MAX_LISTED:
        out.append(f"... {len(newest) - MAX_LISTED} more (see `vmrepo snapshots`)")
    return out


def resolve(spec: Spec, snapshots: Sequence[Snapshot], tz: tzinfo | None = None) -> Snapshot:
    """The one snapshot ``spec`` names; SnapshotNotFound or AmbiguousSnapshot otherwise."""
    mine = sorted((s for s in snapshots if s.vm == spec.vm), key=lambda s: (s.time, s.id))
    if spec.kind == "latest":
        matches = mine[-1:]
    elif spec.kind == "day":
        matches = [s for s in mine if f"{s.time.astimezone(tz):%Y-%m-%d}" == spec.when][-1:]
    elif spec.kind == "time":
        fmt = "%Y-%m-%dT%H:%M:%S" if spec.when.count(":") == 2 else "%Y-%m-%dT%H:%M"
        matches = [s for s in mine if s.time.astimezone(tz).strftime(fmt) == spec.when]
    else:
        matches = [s for s in mine if s.id.startswith(spec.when)]
    if not matches:
        raise SnapshotNotFound(str(spec), _labels(mine, tz))
    if len(matches) > 1:
        raise AmbiguousSnapshot(str(spec), _labels(matches, tz))
    at = mine.index(matches[0]) - spec.back
    if at < 0:
        raise SnapshotNotFound(str(spec), _labels(mine, tz))
    return mine[at]
