"""The NBD client against a server that breaks the protocol: clear errors, no hangs."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmrepo.sources.nbd import protocol as p
from vmrepo.sources.nbd.client import NbdAddress, NbdClient
from vmrepo.sources.nbd.errors import NbdProtocolError, NbdRequestError

Script = Callable[[socket.socket], None]


def _recv(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = s.recv(n - len(data))
        if not more:
            raise ConnectionError
        data += more
    return data


def handshake(s: socket.socket, size: int = 1 << 20, structured: bool = True) -> None:
    """A minimal well-behaved handshake; then the script misbehaves."""
    s.sendall(p.HANDSHAKE.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
    _recv(s, 4)
    while True:
        _, opt, length = p.OPTION.unpack(_recv(s, p.OPTION.size))
        _recv(s, length)
        if opt == p.OPT_STRUCTURED_REPLY:
            rtype = p.REP_ACK if structured else p.REP_ERR_UNSUP
            s.sendall(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, opt, rtype, 0))
        elif opt == p.OPT_GO:
            info = p.EXPORT_INFO.pack(p.INFO_EXPORT, size, p.TFLAG_HAS_FLAGS | p.TFLAG_READ_ONLY)
            s.sendall(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, opt, p.REP_INFO, len(info)) + info)
            s.sendall(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, opt, p.REP_ACK, 0))
            return
        else:
            s.sendall(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, opt, p.REP_ERR_UNSUP, 0))


def read_request(s: socket.socket) -> tuple[int, int, int]:
    _, _, cmd, cookie, offset, length = p.REQUEST.unpack(_recv(s, p.REQUEST.size))
    return cookie, offset, length


def chunk(cookie: int, rtype: int, payload: bytes, done: bool = True) -> bytes:
    return p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE if done else 0,
                                   rtype, cookie, len(payload)) + payload


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Script], NbdAddress]]:
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(script: Script) -> NbdAddress:
        path = str(tmp_path / f"s{len(listeners)}.sock")
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(path)
        lst.listen(1)
        listeners.append(lst)

        def run() -> None:
            conn, _ = lst.accept()
            with conn, contextlib.suppress(ConnectionError, OSError):
                script(conn)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return NbdAddress("x", unix=path)

    yield start
    for lst in listeners:
        lst.close()
    for t in threads:
        t.join(timeout=5)


def test_not_an_nbd_server(serve) -> None:  # type: ignore[no-untyped-def]
    addr = serve(lambda s: s.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    with pytest.raises(NbdProtocolError, match="not a newstyle NBD server"):
        NbdClient(addr, timeout=5)


def test_server_closes_during_handshake(serve) -> None:  # type: ignore[no-untyped-def]
    addr = serve(lambda s: s.sendall(p.HANDSHAKE.pack(p.NBDMAGIC, p.IHAVEOPT, 1)))
    with pytest.raises(NbdProtocolError, match="closed|broke"):
        NbdClient(addr, timeout=5)


def test_data_chunk_outside_the_request(serve) -> None:  # type: ignore[no-untyped-def]
    def script(s: socket.socket) -> None:
        handshake(s)
        cookie, offset, length = read_request(s)
        s.sendall(chunk(cookie, p.REPLY_TYPE_OFFSET_DATA,
                        struct.pack(">Q", offset + length) + b"x" * 10))

    with NbdClient(serve(script), timeout=5) as c, pytest.raises(NbdProtocolError,
                                                                   match="outside request"):
        c.pread(0, 4096)


def test_chunks_that_do_not_add_up(serve) -> None:  # type: ignore[no-untyped-def]
    def script(s: socket.socket) -> None:
        handshake(s)
        cookie, offset, _ = read_request(s)
        s.sendall(chunk(cookie, p.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + b"x" * 10))

    with NbdClient(serve(script), timeout=5) as c, pytest.raises(NbdProtocolError,
                                                                   match="covered 10 bytes"):
        c.pread(0, 4096)


def test_reply_for_an_unknown_request(serve) -> None:  # type: ignore[no-untyped-def]
    def script(s: socket.socket) -> None:
        handshake(s)
        cookie, _, _ = read_request(s)
        s.sendall(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie + 100))

    with NbdClient(serve(script), timeout=5) as c, pytest.raises(NbdProtocolError,
                                                                   match="unknown request"):
        c.pread(0, 512)


def test_error_chunk_carries_code_and_message(serve) -> None:  # type: ignore[no-untyped-def]
    def script(s: socket.socket) -> None:
        handshake(s)
        cookie, _, _ = read_request(s)
        msg = b"disk on fire"
        s.sendall(chunk(cookie, p.REPLY_TYPE_ERROR, struct.pack(">IH", p.EIO, len(msg)) + msg))

    with NbdClient(serve(script), timeout=5) as c, pytest.raises(NbdRequestError) as exc:
        c.pread(0, 512)
    assert exc.value.errno == p.EIO and "disk on fire" in str(exc.value)


def test_bad_reply_magic(serve) -> None:  # type: ignore[no-untyped-def]
    def script(s: socket.socket) -> None:
        handshake(s)
        read_request(s)
        s.sendall(b"\xde\xad\xbe\xef" + bytes(12))

    with NbdClient(serve(script), timeout=5) as c, pytest.raises(NbdProtocolError,
                                                                   match="bad reply magic"):
        c.pread(0, 512)


def test_simple_replies_only_server(serve) -> None:  # type: ignore[no-untyped-def]
    def script(s: socket.socket) -> None:
        handshake(s, structured=False)
        cookie, _, length = read_request(s)
        s.sendall(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie) + b"y" * length)

    with NbdClient(serve(script), timeout=5) as c:
        assert not c.structured
        assert c.pread(0, 100) == b"y" * 100
    with pytest.raises(NbdProtocolError, match="structured replies"):
        NbdClient(serve(lambda s: handshake(s, structured=False)), ["base:allocation"],
                  timeout=5)


def test_silent_server_times_out(serve) -> None:  # type: ignore[no-untyped-def]
    done = threading.Event()

    def script(s: socket.socket) -> None:
        handshake(s)
        read_request(s)
        done.wait(10)

    with NbdClient(serve(script), timeout=0.5) as c, pytest.raises(NbdProtocolError,
                                                                     match="broke"):
        c.pread(0, 512)
    done.set()
