"""vmrepo's NBD client against qemu-nbd, cross-checked with libnbd's nbdinfo."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmrepo.sources.nbd import protocol as p
from vmrepo.sources.nbd.client import (
    Extent,
    NbdAddress,
    NbdClient,
    NbdRequestError,
    merge_extents,
)
from vmrepo.sources.nbd.errors import NbdConnectError

from .nbdexport import QemuNbd

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A qcow2 with data, written zeros, holes and a disabled bitmap of the writes."""
    img = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "100M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "65536", str(img), "bm"], check=True)
    rnd = random.Random(5)
    src = tmp_path / "random.bin"
    src.write_bytes(rnd.randbytes(3 * MiB))
    cmds = ["write -P 1 1M 300k", "write -z 8M 1M", f"write -s {src} 20M 3M",
            "write -P 2 99M 4k", "write -P 3 50M 512"]
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(img)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--disable", str(img), "bm"], check=True)
    return img


def nbdinfo_map(url: str, context: str) -> list[Extent]:
    out = subprocess.run(["nbdinfo", f"--map={context}", url], capture_output=True, text=True,
                         check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return merge_extents(Extent(int(r[0]), int(r[1]), int(r[2])) for r in rows)


@pytest.mark.parametrize("context", ["base:allocation", "qemu:dirty-bitmap:bm"])
def test_extents_match_nbdinfo(image: Path, tmp_path: Path, context: str) -> None:
    with QemuNbd(image, tmp_path / "s.sock", bitmap="bm") as srv, \
            NbdClient(NbdAddress.parse(srv.url), [context]) as c:
        ours = merge_extents(c.block_status(context))
        assert ours == nbdinfo_map(srv.url, context)
        assert sum(e.length for e in ours) == c.size == 100 * MiB
        if context.startswith("qemu:dirty"):
            assert [e for e in ours if e.flags & 1][0] == Extent(1 * MiB, 5 * 65536, 1)


def test_block_status_of_a_subrange(image: Path, tmp_path: Path) -> None:
    with QemuNbd(image, tmp_path / "s.sock", bitmap="bm") as srv, \
            NbdClient(NbdAddress.parse(srv.url), ["qemu:dirty-bitmap:bm"]) as c:
        got = list(c.block_status("qemu:dirty-bitmap:bm", 20 * MiB + 100, 2 * MiB))
        assert got[0].offset == 20 * MiB + 100
        assert sum(e.length for e in got) == 2 * MiB and all(e.flags == 1 for e in got)


def test_reads_equal_the_image_with_requests_in_flight(image: Path, tmp_path: Path) -> None:
    raw = tmp_path / "img.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
                   check=True)
    want = raw.read_bytes()
    with QemuNbd(image, tmp_path / "s.sock") as srv, NbdClient(NbdAddress.parse(srv.url)) as c:
        assert c.structured and c.can_multi_conn
        got = bytearray()
        holes = 0
        for off, data, hs in c.read_ranges([(0, c.size)], depth=6):
            assert off == len(got)
            got += data
            holes += sum(n for _, n in hs)
        assert bytes(got) == want
        assert holes > 50 * MiB  # unallocated areas came as hole chunks, not data
        assert c.pread(50 * MiB, 512) == b"\x03" * 512
        # An error reply leaves the connection usable.
        with pytest.raises(NbdRequestError):
            list(c.read_ranges([(c.size - 10, 20)]))
        assert c.pread(0, 16) == want[:16]


def test_errors(image: Path, tmp_path: Path) -> None:
    with QemuNbd(image, tmp_path / "s.sock") as srv:
        with pytest.raises(NbdRequestError, match="unknown export"):
            NbdClient(NbdAddress.parse(srv.url.replace("/vda", "/nope")))
        with pytest.raises(NbdRequestError, match="does not offer"):
            NbdClient(NbdAddress.parse(srv.url), ["qemu:dirty-bitmap:none"])
        with NbdClient(NbdAddress.parse(srv.url)) as c, pytest.raises(NbdRequestError) as exc:
            list(c.block_status("base:allocation"))
        assert exc.value.errno == p.EINVAL
    with pytest.raises(NbdConnectError, match="cannot connect"):
        NbdClient(NbdAddress.parse(f"nbd+unix:///vda?socket={tmp_path}/gone.sock"))


def test_urls() -> None:
    a = NbdAddress.parse("nbd+unix:///vda?socket=/run/x.sock")
    assert (a.export, a.unix) == ("vda", "/run/x.sock")
    b = NbdAddress.parse("nbd://127.0.0.1:10810/disk%20a")
    assert (b.export, b.host, b.port) == ("disk a", "127.0.0.1", 10810)
    for bad in ("nbd+unix:///vda", "http://x/y", "nbd:///x"):
        with pytest.raises(ValueError):
            NbdAddress.parse(bad)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_export(image: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-x", "vda", "-b",
                             "127.0.0.1", "-p", str(port), str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 20
        while True:
            try:
                c = NbdClient(NbdAddress.parse(f"nbd://127.0.0.1:{port}/vda"), ["base:allocation"])
                break
            except NbdConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with c:
            assert c.size == 100 * MiB
            assert c.pread(50 * MiB, 512) == b"\x03" * 512
    finally:
        proc.terminate()
        proc.wait(10)


@st.composite
def status_and_ranges(draw: st.DrawFn) -> tuple[list[Extent], list[tuple[int, int]]]:
    """A disk described by base:allocation extents, and sorted disjoint ranges of it."""
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=30))
    flags = draw(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=len(sizes),
                          max_size=len(sizes)))
    extents, pos = [], 0
    for n, fl in zip(sizes, flags, strict=True):
        extents.append(Extent(pos, n, fl))
        pos += n
    cuts = sorted(set(draw(st.lists(st.integers(0, pos), max_size=20))) | {0, pos})
    ranges = [(a, b - a) for k, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))
              if k % 2 == draw(st.integers(0, 1)) and b > a]
    return extents, ranges


@settings(max_examples=300, deadline=None)
@given(status_and_ranges(), st.integers(0, 50))
def test_allocation_of_ranges_grouped_into_spans_is_that_of_each_range(
        case: tuple[list[Extent], list[tuple[int, int]]], gap: int) -> None:
    """Describing spans of nearby ranges and clipping the extents to each range gives what
    a query per range gave: the same pieces, merged the same way."""
    from vmrepo.sources.nbdread import STATE_ZERO, clipped, spans

    extents, ranges = case

    def described(start: int, end: int) -> list[Extent]:  # what QEMU answers for a range
        return merge_extents(Extent(max(e.offset, start), min(e.offset + e.length, end)
                                    - max(e.offset, start), e.flags)
                             for e in extents if e.offset < end and e.offset + e.length > start)

    want = [(e.offset, e.length, not e.flags & STATE_ZERO)
            for off, n in ranges for e in described(off, off + n)]
    groups = spans(ranges, gap)
    assert [r for _, _, members in groups for r in members] == ranges
    assert all(members[0][0] == start and sum(members[-1]) == end
               for start, end, members in groups)
    got = [piece for start, end, members in groups
           for piece in clipped(described(start, end), members)]
    assert got == want
