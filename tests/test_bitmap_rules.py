"""The bitmap rules as pure functions: which disks read changes, which fall back, why."""

from __future__ import annotations

import pytest
from vmrepo.sources.base import PriorSnapshot
from vmrepo.sources.qemu import bitmaps as bm

REPO = "ab" * 16
CS = 256 << 10
S1, S2, S3 = "11" * 32, "22" * 32, "33" * 32
HISTORY = [PriorSnapshot(S2, 1 << 30, False), PriorSnapshot(S1, 1 << 30, True)]


def info(name: str, **kw: object) -> bm.BitmapInfo:
    fields = {"granularity": CS, "count": 4 * CS, "recording": True, "busy": False,
              "persistent": True, "inconsistent": False, **kw}
    return bm.BitmapInfo(name=name, **fields)  # type: ignore[arg-type]


def plan(bitmaps: list[bm.BitmapInfo], wanted: str = "auto", size: int = 1 << 30,
         history: list[PriorSnapshot] = HISTORY) -> bm.Plan:
    return bm.plan_disk(size=size, bitmaps=bitmaps, repository_id=REPO, chunk_size=CS,
                        history=history, wanted=wanted)  # type: ignore[arg-type]


def test_names_round_trip() -> None:
    name = bm.bitmap_name(REPO, S1)
    assert bm.parse_name(name) == bm.ParsedName(REPO[:16], S1[:32], False)
    assert bm.parse_name(bm.temp_bitmap_name(REPO, S1)) == bm.ParsedName(REPO[:16], S1[:32],
                                                                          True)
    assert bm.parse_name("bitmap0") is None


def test_incremental_uses_the_latest_snapshots_bitmap() -> None:
    p = plan([info(bm.bitmap_name(REPO, S1)), info(bm.bitmap_name(REPO, S2))])
    assert (p.mode, p.source_bitmap, p.base_snapshot) == ("changes", bm.bitmap_name(REPO, S2), S2)


def test_differential_uses_the_last_fulls_bitmap() -> None:
    p = plan([info(bm.bitmap_name(REPO, S1)), info(bm.bitmap_name(REPO, S2))], "differential")
    assert (p.mode, p.source_bitmap, p.base_snapshot) == ("changes", bm.bitmap_name(REPO, S1), S1)


@pytest.mark.parametrize(("bitmaps", "kw", "why"), [
    ([], {}, "is missing"),
    ([info(bm.bitmap_name(REPO, S2), inconsistent=True)], {}, "inconsistent"),
    ([info(bm.bitmap_name(REPO, S2), busy=True)], {}, "busy"),
    ([info(bm.bitmap_name(REPO, S2), recording=False)], {}, "disabled"),
    ([info(bm.bitmap_name(REPO, S2), persistent=False)], {}, "not persistent"),
    ([info(bm.bitmap_name(REPO, S2), granularity=65536)], {}, "granularity 65536"),
    ([info(bm.bitmap_name(REPO, S2))], {"size": 2 << 30}, "resized"),
    ([info(bm.bitmap_name("cd" * 16, S2))], {}, "other repositories"),
    ([info(bm.bitmap_name(REPO, S3))], {}, "no longer in the repository"),
])
def test_fallbacks(bitmaps: list[bm.BitmapInfo], kw: dict[str, int], why: str) -> None:
    p = plan(bitmaps, **kw)  # type: ignore[arg-type]
    assert p.mode == "full" and p.fallback and why in p.reason


def test_no_fallback_for_first_or_requested_full() -> None:
    assert plan([], history=[]).fallback is False
    p = plan([info(bm.bitmap_name(REPO, S2))], "full")
    assert p.mode == "full" and not p.fallback
    p = plan([], "differential", history=[PriorSnapshot(S2, 1 << 30, False)])
    assert p.mode == "full" and "no full snapshot" in p.reason


def test_stale_and_superseded() -> None:
    bitmaps = [info(bm.bitmap_name(REPO, S1)), info(bm.bitmap_name(REPO, S2)),
               info(bm.bitmap_name(REPO, S3)), info(bm.temp_bitmap_name(REPO, S2)),
               info(bm.bitmap_name(REPO, S1).replace(REPO[:16], "cd" * 8)),
               info("user-bitmap")]
    stale = bm.stale_bitmaps(bitmaps, REPO, [S1, S2])
    assert sorted(stale) == sorted([bm.bitmap_name(REPO, S3), bm.temp_bitmap_name(REPO, S2)])
    gone = bm.superseded_bitmaps(bitmaps, REPO, {bm.bitmap_name(REPO, S2)})
    assert bm.bitmap_name(REPO, S2) not in gone and "user-bitmap" not in gone
    assert bm.bitmap_name(REPO, S1) in gone and len(gone) == 3
