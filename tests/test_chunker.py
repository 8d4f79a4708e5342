"""The chunk assembler: any order, any split, exactly one emit per chunk."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmrepo.chunker import ChunkAssembler, ChunkSet
from vmrepo.errors import ExtentError


def assemble(size: int, cs: int, pieces: list[tuple[int, int, bytes | None]],
             fill: bytes | None = None, runs: bool = False) -> dict[int, bytes | None]:
    """The chunks emitted; with ``runs``, whole zero chunks come in runs."""
    out: dict[int, bytes | None] = {}

    def emit(i: int, data: bytes | None) -> None:
        assert i not in out, f"chunk {i} emitted twice"
        out[i] = data if data is None else bytes(data)

    def emit_zeros(first: int, end: int) -> None:
        assert first < end
        for i in range(first, end):
            emit(i, None)

    asm = ChunkAssembler(size, cs, emit, emit_zeros if runs else None)
    for off, n, data in pieces:
        asm.add(off, n, data)
    asm.finish((lambda i: fill[i * cs : i * cs + cs]) if fill is not None else None)
    return out


@st.composite
def split_image(draw: st.DrawFn) -> tuple[int, int, bytes, list[tuple[int, int, bytes | None]]]:
    cs = draw(st.sampled_from([16, 64, 256]))
    size = draw(st.integers(1, cs * 12))
    seed = draw(st.integers(0, 2**32))
    rnd = random.Random(seed)
    image = bytearray(rnd.randbytes(size))
    cuts = sorted({0, size, *(rnd.randrange(size) for _ in range(draw(st.integers(0, 20))))})
    pieces: list[tuple[int, int, bytes | None]] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if rnd.random() < 0.3:
            image[a:b] = bytes(b - a)
            pieces.append((a, b - a, None))
        else:
            pieces.append((a, b - a, bytes(image[a:b])))
    rnd.shuffle(pieces)
    return cs, size, bytes(image), pieces


@settings(max_examples=300, deadline=None)
@given(split_image(), st.booleans())
def test_any_order_and_split_gives_the_image(case: tuple[int, int, bytes, list],
                                             runs: bool) -> None:
    cs, size, image, pieces = case
    out = assemble(size, cs, pieces, runs=runs)
    assert sorted(out) == list(range((size + cs - 1) // cs))
    for i, data in out.items():
        want = image[i * cs : min(size, (i + 1) * cs)]
        assert (data if data is not None else bytes(len(want))) == want


def test_zeros_come_in_runs_and_their_ends_as_pieces() -> None:
    runs: list[tuple[int, int]] = []
    got: dict[int, bytes | None] = {}
    asm = ChunkAssembler(10 * 64 + 10, 64, got.__setitem__,
                         lambda a, b: runs.append((a, b)))
    asm.add(0, 10, b"x" * 10)
    asm.add(10, 64 * 3 - 10 + 5, None)  # chunk 0's rest, 1 and 2 whole, 5 bytes of 3
    asm.add(64 * 3 + 5, 64 * 7 + 5, None)  # 3's rest, 4-9 whole, the short chunk 10 whole
    assert runs == [(1, 3), (4, 11)]
    assert got == {0: b"x" * 10 + bytes(54), 3: None}
    with pytest.raises(ExtentError, match="overlapping"):
        asm.add(64 * 5, 64, None)  # chunk 5 again: it was emitted in a run


def test_zeros_over_a_piece_in_hand_are_refused() -> None:
    asm = ChunkAssembler(10 * 64, 64, lambda i, d: None, lambda a, b: None)
    asm.add(64 * 6 + 1, 2, b"ab")
    with pytest.raises(ExtentError, match="overlapping"):
        asm.add(64 * 5, 64 * 3, None)


# Extents that overlap one before them, whole chunks emitted at once included: each is
# refused in either order, never leaving a chunk with the older bytes.
_OVERLAPS = [
    ((0, 64, b"a" * 64), (0, 64, None)),  # a data chunk, then zeros over it
    ((0, 64, b"a" * 64), (0, 64, b"b" * 64)),  # the same chunk twice
    ((0, 64 * 4, None), (64 * 2, 64 * 4, None)),  # two runs of zeros, partly overlapping
    ((0, 64 * 4, None), (64, 64 * 2, None)),  # a run inside a run
    ((64 * 3, 64, b"a" * 64), (0, 64 * 8, None)),  # a run over a data chunk
    ((10, 64 * 3, None), (64, 5, b"abcde")),  # a piece inside a run's whole chunks
    ((64 * 7, 64 * 2 + 10, None), (64 * 9, 2, b"ab")),  # the short last chunk
]


@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("first,second", _OVERLAPS + [(b, a) for a, b in _OVERLAPS])
def test_overlap_with_anything_received_is_refused(first: tuple, second: tuple,
                                                    runs: bool) -> None:
    asm = ChunkAssembler(64 * 9 + 10, 64, lambda i, d: None,
                         (lambda a, b: None) if runs else None)
    asm.add(*first)
    with pytest.raises(ExtentError, match="overlapping extent"):
        asm.add(*second)


@settings(max_examples=200, deadline=None)
@given(split_image(), st.booleans(), st.data())
def test_any_extent_sent_twice_is_refused(case: tuple[int, int, bytes, list], runs: bool,
                                          data: st.DataObject) -> None:
    cs, size, _image, pieces = case
    pieces = [p for p in pieces if p[1]]
    again = data.draw(st.sampled_from(pieces))
    at = data.draw(st.integers(pieces.index(again) + 1, len(pieces)))
    with pytest.raises(ExtentError, match="overlapping extent"):
        assemble(size, cs, pieces[:at] + [again] + pieces[at:], runs=runs)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 200), st.lists(st.tuples(st.integers(0, 199), st.integers(0, 40))))
def test_chunk_set_takes_each_chunk_once(chunks: int, ranges: list[tuple[int, int]]) -> None:
    taken = ChunkSet(chunks)
    model: set[int] = set()
    for first, n in ranges:
        first, stop = min(first, chunks), min(first + n, chunks)
        want = not model & set(range(first, stop))
        assert taken.take(first, stop) == want
        if want:
            model |= set(range(first, stop))
        one = first % chunks
        assert taken.take_one(one) == (one not in model)
        model.add(one)
    assert all(taken.bits[i >> 3] >> (i & 7) & 1 == (i in model) for i in range(chunks))


def test_whole_zero_chunk_is_emitted_as_none() -> None:
    out = assemble(128, 64, [(0, 64, None), (64, 64, b"x" * 64)])
    assert out == {0: None, 1: b"x" * 64}


def test_gaps_of_full_pass_are_zero() -> None:
    out = assemble(64, 64, [(10, 4, b"abcd")])
    assert out == {0: bytes(10) + b"abcd" + bytes(50)}


def test_gaps_of_changes_pass_come_from_base() -> None:
    base = bytes(range(64)) * 2
    out = assemble(128, 64, [(66, 2, b"zz")], fill=base)
    assert out == {1: base[64:66] + b"zz" + base[68:128]}


def test_partial_last_chunk() -> None:
    out = assemble(100, 64, [(64, 36, b"y" * 36), (0, 64, b"x" * 64)])
    assert out == {0: b"x" * 64, 1: b"y" * 36}


@pytest.mark.parametrize("piece", [(90, 20, None), (-1, 2, None), (0, 3, b"ab")])
def test_bad_extents_are_refused(piece: tuple[int, int, bytes | None]) -> None:
    asm = ChunkAssembler(100, 64, lambda i, d: None)
    with pytest.raises(ExtentError):
        asm.add(*piece)


def test_overlap_inside_a_chunk_is_refused() -> None:
    asm = ChunkAssembler(128, 64, lambda i, d: None)
    asm.add(0, 10, None)
    with pytest.raises(ExtentError):
        asm.add(5, 10, None)
