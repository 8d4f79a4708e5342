"""Retention: tables of snapshot times to the reasons each is kept, and properties checked
against a brute-force re-computation of the rules."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmrepo.retention import (
    SAFETY_REASON,
    Decision,
    Policy,
    apply,
    format_duration,
    parse_duration,
)
from vmrepo.snapshots import Snapshot

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)


def snap(when: str, vm: str = "vm1", tz: tzinfo = UTC, tags: tuple[str, ...] = (),
         sid: str | None = None) -> Snapshot:
    """A snapshot at local time ``when`` in ``tz`` (or at the offset ``when`` names)."""
    t = datetime.fromisoformat(when)
    if t.tzinfo is None:
        t = t.replace(tzinfo=tz)
    return Snapshot(id=sid or f"{vm}:{when}", vm=vm, time=t.astimezone(UTC), host="h",
                    source="file", disks=[], tags=list(tags))


def kept(decisions: list[Decision]) -> dict[str, tuple[str, ...]]:
    return {d.snapshot.id: d.reasons for d in decisions if d.keep}


@dataclass
class Case:
    name: str
    times: list[str]
    policy: Policy
    #: Snapshot time -> reasons; every other snapshot is removed.
    expect: dict[str, tuple[str, ...]]
    tz: tzinfo = UTC
    tags: dict[str, tuple[str, ...]] = field(default_factory=dict)


CASES = [
    Case("periods without snapshots do not count",
         ["2024-05-01T08:00", "2024-05-01T20:00", "2024-05-03T10:00", "2024-05-07T09:00",
          "2024-05-07T09:30"],
         Policy(daily=3),
         {"2024-05-07T09:30": ("daily 2024-05-07",), "2024-05-03T10:00": ("daily 2024-05-03",),
          "2024-05-01T20:00": ("daily 2024-05-01",)}),
    Case("a snapshot kept by several rules lists them all",
         ["2024-04-30T10:00", "2024-05-01T08:00", "2024-05-01T09:00"],
         Policy(last=2, daily=2, weekly=1, monthly=2, yearly=1),
         {"2024-05-01T09:00": ("last 1", "daily 2024-05-01", "weekly 2024-W18",
                               "monthly 2024-05", "yearly 2024"),
          "2024-05-01T08:00": ("last 2",),
          "2024-04-30T10:00": ("daily 2024-04-30", "monthly 2024-04")}),
    Case("ISO week 1 of 2025 starts on 2024-12-30; yearly stays calendar",
         ["2024-12-29T12:00", "2024-12-30T12:00", "2025-01-02T12:00", "2025-01-06T12:00"],
         Policy(weekly=3, yearly=2),
         {"2025-01-06T12:00": ("weekly 2025-W02", "yearly 2025"),
          "2025-01-02T12:00": ("weekly 2025-W01",),
          "2024-12-30T12:00": ("yearly 2024",),
          "2024-12-29T12:00": ("weekly 2024-W52",)}),
    Case("2020 has 53 ISO weeks; 2021-01-03 is in 2020-W53",
         ["2020-12-27T12:00", "2020-12-28T12:00", "2021-01-03T12:00", "2021-01-04T12:00"],
         Policy(weekly=3, monthly=2),
         {"2021-01-04T12:00": ("weekly 2021-W01", "monthly 2021-01"),
          "2021-01-03T12:00": ("weekly 2020-W53",),
          "2020-12-28T12:00": ("monthly 2020-12",),
          "2020-12-27T12:00": ("weekly 2020-W52",)}),
    Case("2026 is a 53-week year too",
         ["2026-12-31T12:00", "2027-01-03T12:00", "2027-01-04T12:00"],
         Policy(weekly=-1),
         {"2027-01-04T12:00": ("weekly 2027-W01",),
          "2027-01-03T12:00": ("weekly 2026-W53",)}),
    Case("days and months are local: 00:30 in Berlin is the previous day in UTC",
         ["2024-06-30T12:00", "2024-07-01T00:30"],
         Policy(daily=2, monthly=2),
         {"2024-07-01T00:30": ("daily 2024-07-01", "monthly 2024-07"),
          "2024-06-30T12:00": ("daily 2024-06-30", "monthly 2024-06")},
         tz=BERLIN),
    Case("spring forward: 01:30 and 03:30 are one real hour apart but two local hours",
         ["2024-03-31T01:30", "2024-03-31T03:10", "2024-03-31T03:40"],
         Policy(hourly=5),
         {"2024-03-31T03:40": ("hourly 2024-03-31T03",),
          "2024-03-31T01:30": ("hourly 2024-03-31T01",)},
         tz=BERLIN),
    Case("fall back: the repeated hour 02 is one period",
         ["2024-10-27T02:15+02:00", "2024-10-27T02:45+02:00", "2024-10-27T02:10+01:00",
          "2024-10-27T02:50+01:00", "2024-10-27T03:10+01:00"],
         Policy(hourly=-1, daily=1),
         {"2024-10-27T03:10+01:00": ("hourly 2024-10-27T03", "daily 2024-10-27"),
          "2024-10-27T02:50+01:00": ("hourly 2024-10-27T02",)},
         tz=BERLIN),
    Case("within is strict, relative to now",
         ["2024-05-29T12:00", "2024-05-30T12:00", "2024-05-31T12:00", "2024-06-01T11:00"],
         Policy(within=timedelta(days=2)),
         {"2024-06-01T11:00": ("within 2d",), "2024-05-31T12:00": ("within 2d",)}),
    Case("tags keep whatever their age; one reason per policy tag carried",
         ["2020-01-01T00:00", "2021-01-01T00:00", "2024-05-01T00:00", "2024-05-02T00:00"],
         Policy(last=1, tags=frozenset({"keep", "gold"})),
         {"2024-05-02T00:00": ("last 1",), "2021-01-01T00:00": ("tag gold", "tag keep"),
          "2020-01-01T00:00": ("tag keep",)},
         tags={"2020-01-01T00:00": ("keep", "other"), "2021-01-01T00:00": ("keep", "gold"),
               "2024-05-01T00:00": ("other",)}),
    Case("unlimited daily keeps the newest of every day",
         ["2024-05-01T01:00", "2024-05-01T02:00", "2024-05-02T01:00", "2024-05-20T01:00"],
         Policy(daily=-1),
         {"2024-05-20T01:00": ("daily 2024-05-20",), "2024-05-02T01:00": ("daily 2024-05-02",),
          "2024-05-01T02:00": ("daily 2024-05-01",)}),
    Case("unlimited last keeps everything",
         ["2024-05-01T01:00", "2024-05-01T02:00"],
         Policy(last=-1),
         {"2024-05-01T02:00": ("last 1",), "2024-05-01T01:00": ("last 2",)}),
    Case("a policy that would remove everything keeps the newest",
         ["2024-01-01T00:00", "2024-01-02T00:00"],
         Policy(within=timedelta(days=1)),
         {"2024-01-02T00:00": (SAFETY_REASON,)}),
    Case("the module docstring's example",
         [f"{datetime(2024, 4, 1) + timedelta(days=d):%Y-%m-%d}T12:00" for d in range(40)],
         Policy(last=3, daily=7, weekly=4),
         {"2024-05-10T12:00": ("last 1", "daily 2024-05-10", "weekly 2024-W19"),
          "2024-05-09T12:00": ("last 2", "daily 2024-05-09"),
          "2024-05-08T12:00": ("last 3", "daily 2024-05-08"),
          "2024-05-07T12:00": ("daily 2024-05-07",),
          "2024-05-06T12:00": ("daily 2024-05-06",),
          "2024-05-05T12:00": ("daily 2024-05-05", "weekly 2024-W18"),
          "2024-05-04T12:00": ("daily 2024-05-04",),
          "2024-04-28T12:00": ("weekly 2024-W17",),
          "2024-04-21T12:00": ("weekly 2024-W16",)}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_examples(case: Case) -> None:
    snaps = [snap(t, tz=case.tz, tags=case.tags.get(t, ()), sid=t) for t in case.times]
    decisions = apply(snaps, case.policy, NOW, case.tz)
    assert kept(decisions) == case.expect
    assert all(d.reasons == () for d in decisions if not d.keep)


def test_vms_are_judged_separately_and_listed_in_name_order_newest_first() -> None:
    snaps = [snap("2024-05-01T10:00", "vm2"), snap("2024-05-01T10:00", "vm1"),
             snap("2024-05-03T10:00", "vm1"), snap("2024-04-01T10:00", "vm2")]
    decisions = apply(snaps, Policy(last=1, monthly=1), NOW)
    assert [(d.snapshot.id, d.reasons) for d in decisions] == [
        ("vm1:2024-05-03T10:00", ("last 1", "monthly 2024-05")),
        ("vm1:2024-05-01T10:00", ()),
        ("vm2:2024-05-01T10:00", ("last 1", "monthly 2024-05")),
        ("vm2:2024-04-01T10:00", ()),
    ]


def test_equal_times_are_ordered_by_id() -> None:
    snaps = [snap("2024-05-01T10:00", sid="b"), snap("2024-05-01T10:00", sid="c"),
             snap("2024-05-01T10:00", sid="a")]
    assert kept(apply(snaps, Policy(last=1, daily=1), NOW)) == {
        "c": ("last 1", "daily 2024-05-01")}
    assert [d.snapshot.id for d in apply(snaps, Policy(last=1), NOW)] == ["c", "b", "a"]


def test_empty_policy_is_refused_unless_allowed() -> None:
    snaps = [snap("2024-05-01T10:00")]
    with pytest.raises(ValueError, match="no keep rule given"):
        apply(snaps, Policy(), NOW)
    assert [d.keep for d in apply(snaps, Policy(), NOW, allow_empty=True)] == [False]
    assert [d.keep for d in apply(snaps, Policy(within=timedelta(hours=1)), NOW,
                                  allow_empty=True)] == [False]
    assert apply([], Policy(last=1), NOW) == []


def test_now_must_have_a_time_zone() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        apply([snap("2024-05-01T10:00")], Policy(last=1), datetime(2024, 6, 1))


def test_a_very_long_within_keeps_everything() -> None:
    decisions = apply([snap("0001-01-02T00:00")], Policy(within=parse_duration("9999y")), NOW)
    assert decisions[0].reasons == ("within 3649635d",)


# Policy parsing and description


def test_from_mapping_reads_a_config_table() -> None:
    p = Policy.from_mapping({"daily": 7, "weekly": 5, "monthly": 12, "last": 3,
                             "within": "2d", "tags": ["keep"]})
    assert p == Policy(last=3, daily=7, weekly=5, monthly=12, within=timedelta(days=2),
                       tags=frozenset({"keep"}))
    assert p.describe() == "keep last 3, daily 7, weekly 5, monthly 12, within 2d, tags keep"
    assert not p.empty
    assert Policy.from_mapping({}).empty and Policy().describe() == "keep nothing (no rule)"
    assert Policy(hourly=-1, yearly=2).describe() == "keep hourly all, yearly 2"


@pytest.mark.parametrize(("table", "message"), [
    ({"dayly": 7}, "unknown key 'dayly'; did you mean 'daily'?"),
    ({"keep_last": 3}, "unknown key 'keep_last'; did you mean 'last'?"),
    ({"zzz": 1}, "unknown key 'zzz'; known keys: daily, hourly"),
    ({"daily": "7"}, "retention daily: expected a count"),
    ({"weekly": -2}, "retention weekly: expected a count"),
    ({"last": True}, "retention last: expected a count"),
    ({"monthly": 1.5}, "retention monthly: expected a count"),
    ({"within": "7x"}, "retention within: invalid duration '7x'"),
    ({"within": 7}, "retention within: expected a duration"),
    ({"within": "0d"}, "retention within: duration '0d' must be longer than zero"),
    ({"tags": "keep"}, "retention tags: expected a list"),
    ({"tags": ["keep", 3]}, "retention tags: expected a list"),
    ({"tags": [""]}, "retention tags: expected a list"),
])
def test_from_mapping_names_the_bad_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        Policy.from_mapping(table)
    assert message in str(exc.value)


def test_policy_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="retention yearly"):
        Policy(yearly=-3)
    with pytest.raises(ValueError, match="retention within"):
        Policy(within=timedelta())
    with pytest.raises(ValueError, match="retention tags"):
        Policy(tags="keep")  # type: ignore[arg-type]


# Durations


@pytest.mark.parametrize(("text", "value"), [
    ("36h", timedelta(hours=36)), ("7d", timedelta(days=7)), ("2w", timedelta(days=14)),
    ("6m", timedelta(days=180)), ("1y", timedelta(days=365)),
    ("1y6m", timedelta(days=545)), ("1w2d12h", timedelta(days=9, hours=12)),
    ("0d1h", timedelta(hours=1)), ("007d", timedelta(days=7)),
])
def test_parse_duration(text: str, value: timedelta) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("text", ["", "7", "d", "7D", "-1d", "+1d", "1.5h", " 7d", "7 d",
                                  "1d2y", "1d1d", "0d", "0y0h", "90min", "7days", "٣d",
                                  "99999999999999999999y"])
def test_parse_duration_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_duration(text)
    assert "\n" not in str(exc.value) and repr(text) in str(exc.value)


def test_format_duration() -> None:
    assert [format_duration(parse_duration(t)) for t in ("36h", "7d", "2w", "5h")] == \
        ["1d12h", "7d", "14d", "5h"]
    assert format_duration(timedelta(minutes=90)) == "1:30:00"


UNITS = {"y": 365 * 24, "m": 30 * 24, "w": 7 * 24, "d": 24, "h": 1}


@given(st.dictionaries(st.sampled_from(list(UNITS)), st.integers(0, 10**5), min_size=1))
def test_parse_duration_round_trips_its_documented_forms(terms: dict[str, int]) -> None:
    text = "".join(f"{terms[u]}{u}" for u in UNITS if u in terms)
    hours = sum(n * UNITS[u] for u, n in terms.items())
    if hours == 0:
        with pytest.raises(ValueError):
            parse_duration(text)
        return
    value = parse_duration(text)
    assert value == timedelta(hours=hours)
    assert parse_duration(format_duration(value)) == value


@given(st.text(alphabet="0123456789ymwdhYs -.x", max_size=12) | st.text(max_size=6))
def test_parse_duration_accepts_exactly_the_grammar(text: str) -> None:
    import re
    valid = re.fullmatch(r"([0-9]+y)?([0-9]+m)?([0-9]+w)?([0-9]+d)?([0-9]+h)?", text)
    if valid and text and any(int(n) for n in re.findall("[0-9]+", text)):
        assert parse_duration(text) > timedelta()
    else:
        with pytest.raises(ValueError):
            parse_duration(text)


# Properties, against a brute-force reading of the rules

ZONES: list[tzinfo] = [UTC, BERLIN, ZoneInfo("America/Santiago"), ZoneInfo("Australia/Lord_Howe"),
                       ZoneInfo("America/St_Johns"), timezone(timedelta(hours=-5))]
BASE = datetime(2023, 12, 20, tzinfo=UTC)
#: Minutes after BASE near interesting instants: year and ISO-year ends, DST changes in Berlin.
SPECIAL = [int((datetime.fromisoformat(t) - BASE).total_seconds() // 60) for t in (
    "2023-12-31T22:59+00:00", "2023-12-31T23:00+00:00", "2024-01-01T00:00+00:00",
    "2024-03-31T00:59+00:00", "2024-03-31T01:00+00:00", "2024-10-27T00:30+00:00",
    "2024-10-27T01:30+00:00", "2024-12-29T23:30+00:00", "2024-12-30T00:30+00:00")]
FORMATS = {"hourly": "%Y-%m-%dT%H", "daily": "%Y-%m-%d", "weekly": "%G-W%V",
           "monthly": "%Y-%m", "yearly": "%Y"}


@st.composite
def snapshot_lists(draw: st.DrawFn) -> list[Snapshot]:
    minutes = draw(st.lists(st.integers(0, 2 * 366 * 24 * 60) | st.sampled_from(SPECIAL)
                            | st.integers(0, 3 * 24 * 60), max_size=25))
    return [Snapshot(id=f"{i:02d}" + draw(st.sampled_from("abc")), vm=draw(st.sampled_from("xyz")),
                     time=BASE + timedelta(minutes=m), host="h", source="file", disks=[],
                     tags=sorted(draw(st.sets(st.sampled_from(["t1", "t2", "t3"]), max_size=2))))
            for i, m in enumerate(minutes)]


counts = st.sampled_from([0, 0, 0, 1, 2, 3, 5, -1])
policies = st.builds(
    Policy, last=counts, hourly=counts, daily=counts, weekly=counts, monthly=counts,
    yearly=counts, within=st.none() | st.integers(1, 3000).map(lambda h: timedelta(hours=h)),
    tags=st.frozensets(st.sampled_from(["t1", "t2"]), max_size=2))
nows = st.integers(0, 3 * 366 * 24).map(lambda h: BASE + timedelta(hours=h))


def expected(snaps: list[Snapshot], p: Policy, now: datetime, tz: tzinfo,
             allow_empty: bool) -> dict[str, tuple[str, ...]]:
    """Every snapshot's reasons, computed rule by rule over whole periods."""
    reasons: dict[str, list[str]] = {}
    for vm in {s.vm for s in snaps}:
        mine = sorted((s for s in snaps if s.vm == vm), key=lambda s: (s.time, s.id),
                      reverse=True)
        got: dict[str, list[str]] = {s.id: [] for s in mine}
        for i, s in enumerate(mine):
            if p.last == -1 or i < p.last:
                got[s.id].append(f"last {i + 1}")
        for rule, fmt in FORMATS.items():
            n = getattr(p, rule)
            periods: dict[str, list[Snapshot]] = {}
            for s in mine:
                periods.setdefault(s.time.astimezone(tz).strftime(fmt), []).append(s)
            newest = sorted(((max(g, key=lambda s: (s.time, s.id)), label)
                             for label, g in periods.items()),
                            key=lambda e: (e[0].time, e[0].id), reverse=True)
            for s, label in newest if n == -1 else newest[:n]:
                got[s.id].append(f"{rule} {label}")
        for s in mine:
            if p.within is not None and s.time > now - p.within:
                got[s.id].append(f"within {format_duration(p.within)}")
            got[s.id] += [f"tag {t}" for t in sorted(p.tags) if t in s.tags]
        if not allow_empty and not any(got.values()):
            got[mine[0].id].append(SAFETY_REASON)
        reasons.update(got)
    return {sid: tuple(r) for sid, r in reasons.items()}


@settings(max_examples=200, deadline=None)
@given(snapshot_lists(), policies, nows, st.sampled_from(ZONES), st.booleans())
def test_reasons_are_exactly_the_rules_that_keep(snaps: list[Snapshot], p: Policy,
                                                  now: datetime, tz: tzinfo,
                                                  allow_empty: bool) -> None:
    if p.empty and not allow_empty:
        with pytest.raises(ValueError, match="no keep rule given"):
            apply(snaps, p, now, tz)
        return
    decisions = apply(snaps, p, now, tz, allow_empty)
    assert {d.snapshot.id: d.reasons for d in decisions} == expected(snaps, p, now, tz,
                                                                    allow_empty)
    assert all(d.keep == bool(d.reasons) for d in decisions)


@given(snapshot_lists(), policies, st.sampled_from(ZONES), st.booleans())
def test_decisions_cover_every_snapshot_once_in_order(snaps: list[Snapshot], p: Policy,
                                                       tz: tzinfo, allow_empty: bool) -> None:
    if p.empty and not allow_empty:
        return
    decisions = apply(snaps, p, NOW, tz, allow_empty)
    assert Counter(id(d.snapshot) for d in decisions) == Counter(id(s) for s in snaps)
    order = [s.id for vm in sorted({s.vm for s in snaps})
             for s in sorted((s for s in snaps if s.vm == vm), key=lambda s: (s.time, s.id),
                             reverse=True)]
    assert [d.snapshot.id for d in decisions] == order


@given(snapshot_lists(), st.integers(1, 6))
def test_keep_last_keeps_exactly_the_newest_of_each_vm(snaps: list[Snapshot], n: int) -> None:
    newest = {s.id for vm in {s.vm for s in snaps}
              for s in sorted((s for s in snaps if s.vm == vm),
                              key=lambda s: (s.time, s.id))[-n:]}
    assert set(kept(apply(snaps, Policy(last=n), NOW))) == newest


@given(snapshot_lists(), st.sampled_from(list(FORMATS)), st.sampled_from([1, 2, 4, -1]),
       st.sampled_from(ZONES))
def test_a_calendar_rule_keeps_one_per_period_up_to_n(snaps: list[Snapshot], rule: str, n: int,
                                                      tz: tzinfo) -> None:
    decisions = apply(snaps, Policy.from_mapping({rule: n}), NOW, tz)
    for vm in {s.vm for s in snaps}:
        mine = [d for d in decisions if d.snapshot.vm == vm]
        periods = {d.snapshot.time.astimezone(tz).strftime(FORMATS[rule]) for d in mine}
        by_rule = [d for d in mine if any(r.startswith(rule + " ") for r in d.reasons)]
        assert len(by_rule) == (len(periods) if n == -1 else min(n, len(periods)))


@given(snapshot_lists(), st.integers(1, 5), st.sampled_from(ZONES))
def test_a_daily_snapshot_is_the_newest_of_its_local_day(snaps: list[Snapshot], n: int,
                                                         tz: tzinfo) -> None:
    for d in apply(snaps, Policy(daily=n), NOW, tz):
        if d.keep:
            day = d.snapshot.time.astimezone(tz).date()
            assert d.reasons == (f"daily {day}",)
            assert not [s for s in snaps if s.vm == d.snapshot.vm
                        and s.time.astimezone(tz).date() == day
                        and (s.time, s.id) > (d.snapshot.time, d.snapshot.id)]


@given(snapshot_lists(), policies, nows, st.sampled_from(ZONES))
def test_a_vm_is_never_emptied_unless_allowed(snaps: list[Snapshot], p: Policy, now: datetime,
                                              tz: tzinfo) -> None:
    vms = {s.vm for s in snaps}
    if not p.empty:
        assert {d.snapshot.vm for d in apply(snaps, p, now, tz) if d.keep} == vms
    assert not any(d.keep for d in apply(snaps, Policy(), now, tz, allow_empty=True))


@given(snapshot_lists(), st.integers(0, 2 * 366 * 24 * 60), st.integers(1, 6))
def test_adding_a_snapshot_never_gives_another_a_last_reason(snaps: list[Snapshot], at: int,
                                                              n: int) -> None:
    def with_last(ss: list[Snapshot]) -> set[str]:
        return {d.snapshot.id for d in apply(ss, Policy(last=n), NOW)
                if any(r.startswith("last ") for r in d.reasons)}

    added = Snapshot(id="zz", vm="x", time=BASE + timedelta(minutes=at), host="h",
                     source="file", disks=[])
    assert with_last([*snaps, added]) - {"zz"} <= with_last(snaps)
