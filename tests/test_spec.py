"""Snapshot specs: parsing and resolution, in a fixed time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from vmrepo.errors import AmbiguousSnapshot, SnapshotNotFound, SpecError
from vmrepo.snapshots import Snapshot
from vmrepo.spec import parse_spec, resolve

TZ = timezone(timedelta(hours=2))


def snap(sid: str, vm: str, when: str) -> Snapshot:
    t = datetime.fromisoformat(when).replace(tzinfo=TZ).astimezone(UTC)
    return Snapshot(id=sid, vm=vm, time=t, host="h", source="file", disks=[])


SNAPS = [
    snap("aaaa1111" + "0" * 56, "vm1", "2024-05-01T08:00:00"),
    snap("aaaa2222" + "0" * 56, "vm1", "2024-05-01T23:30:10"),
    snap("bbbb3333" + "0" * 56, "vm1", "2024-05-02T00:10:00"),
    snap("bbbb4444" + "0" * 56, "vm1", "2024-05-02T00:10:30"),
    snap("cccc5555" + "0" * 56, "vm2", "2024-05-03T00:00:00"),
]


def pick(text: str) -> str:
    return resolve(parse_spec(text), SNAPS, TZ).id[:8]


def test_latest_is_per_vm() -> None:
    assert pick("vm1@latest") == "bbbb4444"
    assert pick("vm2@latest") == "cccc5555"


def test_day_is_latest_of_that_local_day() -> None:
    # 23:30 local on May 1st is May 1st even though it is 21:30 UTC.
    assert pick("vm1@2024-05-01") == "aaaa2222"
    assert pick("vm1@2024-05-02") == "bbbb4444"


def test_time_to_the_minute_or_second() -> None:
    assert pick("vm1@2024-05-01T08:00") == "aaaa1111"
    assert pick("vm1@2024-05-02T00:10:30") == "bbbb4444"
    with pytest.raises(AmbiguousSnapshot) as exc:
        pick("vm1@2024-05-02T00:10")
    assert len(exc.value.candidates) == 2


def test_id_prefix() -> None:
    assert pick("vm1@aaaa1") == "aaaa1111"
    assert pick("vm1@AAAA2") == "aaaa2222"
    with pytest.raises(AmbiguousSnapshot) as exc:
        pick("vm1@aaaa")
    assert [c.split()[0] for c in exc.value.candidates] == ["vm1@aaaa2222", "vm1@aaaa1111"]


def test_no_match_lists_candidates() -> None:
    with pytest.raises(SnapshotNotFound) as exc:
        pick("vm1@2023-01-01")
    assert len(exc.value.candidates) == 4
    assert "vm1@bbbb4444" in str(exc.value)
    with pytest.raises(SnapshotNotFound):
        pick("vm3@latest")
    with pytest.raises(SnapshotNotFound):
        pick("vm2@aaaa")  # another VM's id


@pytest.mark.parametrize("text", ["vm1", "vm1@", "@latest", "vm1@yesterday", "vm1@2024-13-01",
                                  "vm1@2024-05-01T25:00", "vm1@abc", "vm 1@latest"])
def test_malformed_specs(text: str) -> None:
    with pytest.raises(SpecError):
        parse_spec(text)


def test_tilde_counts_back_from_the_named_snapshot() -> None:
    assert pick("vm1@latest~1") == "bbbb3333"
    assert pick("vm1@latest~3") == "aaaa1111"
    assert pick("vm1@2024-05-02~2") == "aaaa2222"
    assert str(parse_spec("vm1@latest~2")) == "vm1@latest~2"
    with pytest.raises(SnapshotNotFound):
        pick("vm1@latest~4")
    with pytest.raises(SpecError):
        parse_spec("vm1@latest~x")
