"""Retention: which snapshots ``vmrepo forget`` keeps, and why.

:func:`apply` is a pure function of the snapshot list, a :class:`Policy`, the current time
``now`` and a time zone: no I/O and no clock reads. It returns one :class:`Decision` per
snapshot, naming every rule that keeps it.

Each VM's snapshots are judged on their own. Within a VM, snapshots are ordered newest first
by ``(time, id)``, so equal times are broken by id. The rules, as in restic's ``forget``:

* ``last N``: the N newest snapshots. Reason ``last K``, K the snapshot's position
  (``last 1`` is the newest).
* ``hourly``, ``daily``, ``weekly``, ``monthly``, ``yearly N``: walking from the newest snapshot
  to the oldest, the first snapshot met in each period (the newest of that period) is kept,
  for the N most recent periods *that hold a snapshot*: periods without snapshots are not
  counted, so ``daily 7`` keeps seven days' newest snapshots even if they span a month.
  Reason: the rule and the period, e.g. ``daily 2024-05-01``.
* ``within D``: every snapshot whose time is strictly after ``now - D``. Reason ``within 7d``.
* ``tags``: every snapshot carrying one of the policy's tags. Reason ``tag NAME``, once per
  policy tag the snapshot carries.

A count of -1 means unlimited (every snapshot for ``last``, every period for the calendar
rules); 0 leaves the rule unused. A snapshot is kept if any rule keeps it, and its reasons
list all of them in the order above. A removed snapshot has no reasons.

Calendar periods are taken in local time: ``tz``, or the system's local time zone when ``tz``
is None. Hours are wall-clock hours (``2024-05-01T13``; the hour repeated when summer time
ends is one period), days are local dates (``2024-05-01``), weeks are ISO 8601 weeks
labelled with their ISO year (``2024-W18``; weeks start on Monday and week 1 holds the year's
first Thursday, so 2024-12-30 is in ``2025-W01`` and 2021-01-03 in ``2020-W53``), months
``2024-05`` and years ``2024``.

Safety: a policy with no rule at all is refused (ValueError ``no keep rule given``) unless
``allow_empty``, in which case everything is removed. A policy that would remove every
snapshot of a VM keeps that VM's newest snapshot instead, with the reason :data:`SAFETY_REASON`,
unless ``allow_empty``.

Durations (``within``) are one or more ``<count><unit>`` terms, units in the order
``y`` (365 days), ``m`` (months of 30 days; not minutes), ``w`` (7 days), ``d`` (days) and
``h`` (hours), each unit at most once, total above zero: ``36h``, ``7d``, ``2w``, ``1y6m``,
``1w2d12h``. :func:`format_duration` writes a duration back as days and hours (``1d12h``).

Example: with one snapshot a day at noon from 2024-04-01 to Friday 2024-05-10, ``last 3,
daily 7, weekly 4`` keeps May 10, 9 and 8 (``last`` and ``daily``), May 7 to 4 (``daily``),
and the newest of ISO weeks 2024-W19 to W16: May 10, Sunday May 5, Sundays April 28 and 21.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any

from .snapshots import Snapshot

#: The reason given to a VM's newest snapshot when the policy would remove all of them.
SAFETY_REASON = "newest of VM (a policy never removes every snapshot; use --keep-none to allow it)"
#: Calendar rules and the label of the period a local time falls in.
CALENDAR: tuple[tuple[str, Callable[[datetime], str]], ...] = (
    ("hourly", lambda t: f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}"),
    ("daily", lambda t: f"{t.year:04d}-{t.month:02d}-{t.day:02d}"),
    ("weekly", lambda t: f"{t.isocalendar().year:04d}-W{t.isocalendar().week:02d}"),
    ("monthly", lambda t: f"{t.year:04d}-{t.month:02d}"),
    ("yearly", lambda t: f"{t.year:04d}"),
)
COUNT_KEYS = ("last",) + tuple(name for name, _ in CALENDAR)
KEYS = frozenset(COUNT_KEYS + ("within", "tags"))

_UNITS = {"y": timedelta(days=365), "m": timedelta(days=30), "w": timedelta(weeks=1),
          "d": timedelta(days=1), "h": timedelta(hours=1)}
_DURATION = re.compile(r"(?:([0-9]+)y)?(?:([0-9]+)m)?(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?")
_DURATION_HELP = "expected terms like 36h, 7d, 2w, 6m or 1y6m (units y, m, w, d, h, in this order)"


def parse_duration(text: str) -> timedelta:
    """The duration ``text`` names (grammar in the module docstring); ValueError otherwise."""
    m = _DURATION.fullmatch(text)
    if not text or m is None:
        raise ValueError(f"invalid duration {text!r}: {_DURATION_HELP}")
    try:
        total = sum((int(n) * unit for n, unit in zip(m.groups(), _UNITS.values(), strict=True)
                     if n is not None), timedelta())
    except OverflowError:
        raise ValueError(f"duration {text!r} is too long") from None
    if total <= timedelta():
        raise ValueError(f"duration {text!r} must be longer than zero")
    return total


def format_duration(d: timedelta) -> str:
    """``d`` as days and hours (``7d``, ``1d12h``, ``36h`` -> ``1d12h``); other values as
    :class:`timedelta` prints them."""
    if d <= timedelta() or d % timedelta(hours=1):
        return str(d)
    hours = d // timedelta(hours=1)
    days, hours = divmod(hours, 24)
    return (f"{days}d" if days else "") + (f"{hours}h" if hours else "")


@dataclass(frozen=True)
class Policy:
    """What to keep. Counts: 0 leaves a rule unused, -1 means unlimited."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    #: Keep everything newer than ``now - within``.
    within: timedelta | None = None
    #: Keep every snapshot carrying any of these tags.
    tags: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for key in COUNT_KEYS:
            value = getattr(self, key)
            if type(value) is not int or value < -1:
                raise ValueError(f"retention {key}: expected a count (-1 for unlimited, 0 for "
                                 f"unused), got {value!r}")
        if self.within is not None and (not isinstance(self.within, timedelta)
                                        or self.within <= timedelta()):
            raise ValueError(f"retention within: expected a positive duration, "
                             f"got {self.within!r}")
        if not isinstance(self.tags, frozenset) or not all(
                isinstance(t, str) and t for t in self.tags):
            raise ValueError(f"retention tags: expected a set of tag names, got {self.tags!r}")

    @property
    def empty(self) -> bool:
        """True if no rule is set (the policy would keep nothing)."""
        return (all(getattr(self, key) == 0 for key in COUNT_KEYS)
                and self.within is None and not self.tags)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> Policy:
        """The policy of a config table such as ``{daily = 7, within = "2d", tags = ["keep"]}``;
        ValueError naming the key for unknown keys (with the nearest known one) or bad values."""
        for key in m:
            if key not in KEYS:
                near = difflib.get_close_matches(str(key), sorted(KEYS), n=1, cutoff=0.5)
                hint = f"; did you mean {near[0]!r}?" if near else \
                    f"; known keys: {', '.join(sorted(KEYS))}"
                raise ValueError(f"retention: unknown key {key!r}{hint}")
        counts = {key: m.get(key, 0) for key in COUNT_KEYS}  # checked by __post_init__
        within = m.get("within")
        if isinstance(within, str):
            try:
                within = parse_duration(within)
            except ValueError as exc:
                raise ValueError(f"retention within: {exc}") from None
        elif within is not None and not isinstance(within, timedelta):
            raise ValueError(f"retention within: expected a duration such as \"7d\", "
                             f"got {within!r}")
        tags = m.get("tags", [])
        if not isinstance(tags, list | tuple | set | frozenset) or not all(
                isinstance(t, str) and t for t in tags):
            raise ValueError(f"retention tags: expected a list of tag names, got {tags!r}")
        return cls(**counts, within=within, tags=frozenset(tags))

    def describe(self) -> str:
        """A short human summary, e.g. ``keep last 3, daily 7, weekly 5, within 2d``."""
        parts = [f"{key} {'all' if n == -1 else n}" for key in COUNT_KEYS
                 if (n := getattr(self, key))]
        if self.within is not None:
            parts.append(f"within {format_duration(self.within)}")
        if self.tags:
            parts.append(f"tags {','.join(sorted(self.tags))}")
        return "keep " + ", ".join(parts) if parts else "keep nothing (no rule)"


@dataclass(frozen=True)
class Decision:
    """Whether ``snapshot`` is kept, and every rule that keeps it (empty if removed)."""

    snapshot: Snapshot
    keep: bool
    reasons: tuple[str, ...] = ()


def apply(snapshots: Sequence[Snapshot], policy: Policy, now: datetime,
          tz: tzinfo | None = None, allow_empty: bool = False) -> list[Decision]:
    """One decision per snapshot: VMs in name order, each VM's snapshots newest first by
    ``(time, id)``. ValueError if the policy is empty and not ``allow_empty``, or if ``now``
    has no time zone. Rules in the module docstring."""
    if policy.empty and not allow_empty:
        raise ValueError("no keep rule given")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    by_vm: dict[str, list[Snapshot]] = {}
    for snap in snapshots:
        by_vm.setdefault(snap.vm, []).append(snap)
    out: list[Decision] = []
    for vm in sorted(by_vm):
        newest = sorted(by_vm[vm], key=lambda s: (s.time, s.id), reverse=True)
        reasons = _reasons(newest, policy, now, tz)
        if not allow_empty and not any(reasons):
            reasons[0].append(SAFETY_REASON)
        out.extend(Decision(s, bool(r), tuple(r)) for s, r in zip(newest, reasons, strict=True))
    return out


def _reasons(newest: list[Snapshot], policy: Policy, now: datetime,
             tz: tzinfo | None) -> list[list[str]]:
    """For one VM's snapshots, newest first: the reasons each is kept."""
    reasons: list[list[str]] = [[] for _ in newest]
    for pos in range(len(newest) if policy.last == -1 else min(policy.last, len(newest))):
        reasons[pos].append(f"last {pos + 1}")
    local = [s.time.astimezone(tz) for s in newest]
    for name, period_of in CALENDAR:
        budget: int = getattr(policy, name)
        seen: set[str] = set()
        for pos, t in enumerate(local):
            if budget == 0:
                break
            period = period_of(t)
            if period in seen:
                continue
            seen.add(period)
            reasons[pos].append(f"{name} {period}")
            if budget > 0:
                budget -= 1
    if policy.within is not None:
        try:
            cutoff: datetime | None = now - policy.within
        except OverflowError:
            cutoff = None  # reaches back before year 1: everything is within
        label = f"within {format_duration(policy.within)}"
        for pos, s in enumerate(newest):
            if cutoff is None or s.time > cutoff:
                reasons[pos].append(label)
    if policy.tags:
        for pos, s in enumerate(newest):
            reasons[pos].extend(f"tag {t}" for t in sorted(policy.tags.intersection(s.tags)))
    return reasons
