"""The manifest builder: runs of zero chunks give the pages that setting each one gives."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st
from vmrepo.format import ID_SIZE, ZERO_ID
from vmrepo.manifest import Manifest, ManifestBuilder


def _build(size: int, cs: int, pe: int, ops: list[tuple[int, int, bytes | None]],
           runs: bool, base: Manifest | None = None,
           base_pages: dict[bytes, bytes] | None = None
           ) -> tuple[Manifest, dict[bytes, bytes], list[bytes]]:
    pages: dict[bytes, bytes] = {}
    order: list[bytes] = []

    def store(page: bytes) -> bytes:
        pid = hashlib.blake2b(page, digest_size=ID_SIZE).digest()
        pages[pid] = page
        order.append(pid)
        return pid

    def load(page_no: int) -> bytes:
        assert base is not None and base_pages is not None
        return base_pages[base.page_ids[page_no]]

    b = ManifestBuilder(size, cs, pe, store, load if base else None, base)
    for first, end, cid in ops:
        if cid is None and runs:
            b.set_zeros(first, end)
        else:
            for i in range(first, end):
                b.set(i, cid if cid is not None else ZERO_ID)
    return b.finish(), pages, order


@st.composite
def plans(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int, bytes | None]]]:
    pe = draw(st.sampled_from([1, 2, 3, 8]))
    chunks = draw(st.integers(1, 40))
    cs = 16
    size = (chunks - 1) * cs + draw(st.integers(1, cs))
    cuts = sorted(set(draw(st.lists(st.integers(0, chunks), max_size=12))) | {0, chunks})
    ops: list[tuple[int, int, bytes | None]] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        zero = draw(st.booleans())
        ops.append((a, b, None if zero else bytes([a + 1]) * ID_SIZE))
    return size, pe, draw(st.permutations(ops))


@settings(max_examples=300, deadline=None)
@given(plans(), st.booleans())
def test_zero_runs_give_the_same_manifest(plan: tuple[int, int, list], changes: bool) -> None:
    size, pe, ops = plan
    base = base_pages = None
    if changes:  # a changes-only pass over a base whose chunks all differ from these
        base_ops = [(0, (size + 15) // 16, b"\xee" * ID_SIZE)]
        base, base_pages, _ = _build(size, 16, pe, base_ops, runs=False)
    one, pages_one, _ = _build(size, 16, pe, ops, False, base, base_pages)
    run, pages_run, _ = _build(size, 16, pe, ops, True, base, base_pages)
    assert run == one
    assert {pid: pages_run[pid] for pid in run.page_ids} == \
        {pid: pages_one[pid] for pid in one.page_ids}


def test_a_zero_run_over_a_chunk_already_set_completes_its_page_once() -> None:
    stored: list[bytes] = []
    b = ManifestBuilder(8 * 16, 16, 4, lambda page: stored.append(page) or bytes(ID_SIZE))
    b.set(1, b"\x01" * ID_SIZE)
    b.set_zeros(0, 4)  # chunk 1 again, now zero: the page is complete
    assert stored == [ZERO_ID * 4] and b.pages_written == 1
    b.set_zeros(4, 6)
    assert b.pages_written == 1  # half a page: kept until the rest comes
