"""A small NBD server (fixed newstyle, simple replies) for exports vmrepo provides.

Used as the target of QEMU's backup job in push mode: QEMU connects as an NBD
client and sends the disk's data as WRITE and WRITE_ZEROES requests. Written
to serve other exports too (e.g. instant restore): an :class:`Export` says
what it can do and the server advertises exactly that.

Each connection is served by its own thread, requests in order; the reply to
a request is sent only after the export has accepted it, which gives the
export natural back-pressure over the client. Structured replies and meta
contexts are refused (ERR_UNSUP), which clients handle by falling back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

from . import protocol as p
from .errors import NbdConnectError

log = logging.getLogger(__name__)

MAX_OPTION_DATA = 64 << 10


class ExportError(Exception):
    """Raised by an export to answer a request with an NBD error code."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or p.error_name(errno))
        self.errno = errno


class Export(ABC):
    """Something an NBD client can read or write."""

    name: str
    size: int
    writable: bool = True
    multi_conn: bool = False

    def pread(self, offset: int, length: int) -> bytes:
        raise ExportError(p.EIO, "this export cannot be read")

    @abstractmethod
    def pwrite(self, offset: int, data: bytes) -> None:
        """Accept ``data`` at ``offset``."""

    @abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None:
        """Accept zeros over ``[offset, offset + length)``."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make accepted writes durable; the default has nothing to do."""


class _Disconnect(Exception):
    """The client went away or broke the protocol; end the connection quietly."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        if not parts[-1]:
            raise _Disconnect("connection closed")
        more = sock.recv(n - got, socket.MSG_WAITALL)
        if not more:
            raise _Disconnect("connection closed")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class NbdServer:
    """Serves ``exports`` (by name) on a unix socket at ``path``."""

    def __init__(self, path: str, exports: Mapping[str, Export]) -> None:
        self.path = path
        self.exports = dict(exports)
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self.connections = 0

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise NbdConnectError(f"cannot serve NBD on {self.path}: "
                                    f"{exc.strerror or exc}") from None
        self._listener = sock
        t = threading.Thread(target=self._accept_loop, name="vmrepo-nbd-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Close the listener and every connection; wait for the threads."""
        self._stopping = True
        if self._listener is not None:
            _quietly("shutting the listener down", self._listener.shutdown, socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _quietly("shutting a connection down", c.shutdown, socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(timeout=10)
        _quietly(f"removing {self.path}", os.unlink, self.path)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), name="vmrepo-nbd-conn",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            export = self._handshake(sock)
            if export is not None:
                self._transmission(sock, export)
        except (_Disconnect, ConnectionError, OSError) as exc:
            log.debug("nbd connection ended: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()

    # -- handshake ---------------------------------------------------------

    def _flags(self, export: Export) -> int:
        flags = p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH
        if export.writable:
            flags |= p.TFLAG_SEND_WRITE_ZEROES | p.TFLAG_SEND_FUA
        else:
            flags |= p.TFLAG_READ_ONLY
        if export.multi_conn:
            flags |= p.TFLAG_CAN_MULTI_CONN
        return flags

    def _reply(self, sock: socket.socket, opt: int, rtype: int, data: bytes = b"") -> None:
        sock.sendall(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _handshake(self, sock: socket.socket) -> Export | None:
        sock.sendall(p.HANDSHAKE.pack(p.NBDMAGIC, p.IHAVEOPT,
                                      p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (cflags,) = p.CLIENT_FLAGS.unpack(_recv_exact(sock, p.CLIENT_FLAGS.size))
        if not cflags & p.FLAG_C_FIXED_NEWSTYLE:
            raise _Disconnect("client does not speak fixed newstyle")
        no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = p.OPTION.unpack(_recv_exact(sock, p.OPTION.size))
            if magic != p.IHAVEOPT or length > MAX_OPTION_DATA:
                raise _Disconnect("bad option header")
            data = _recv_exact(sock, length) if length else b""
            if opt == p.OPT_EXPORT_NAME:
                export = self.exports.get(data.decode("utf-8", "replace"))
                if export is None:
                    raise _Disconnect("unknown export")
                sock.sendall(p.EXPORT_NAME_REPLY.pack(export.size, self._flags(export))
                             + (b"" if no_zeroes else bytes(124)))
                return export
            if opt == p.OPT_ABORT:
                self._reply(sock, opt, p.REP_ACK)
                return None
            if opt == p.OPT_LIST:
                for name in self.exports:
                    raw = name.encode()
                    self._reply(sock, opt, p.REP_SERVER, len(raw).to_bytes(4, "big") + raw)
                self._reply(sock, opt, p.REP_ACK)
            elif opt in (p.OPT_INFO, p.OPT_GO):
                export = self._info(sock, opt, data)
                if export is not None and opt == p.OPT_GO:
                    return export
            else:
                self._reply(sock, opt, p.REP_ERR_UNSUP)

    def _info(self, sock: socket.socket, opt: int, data: bytes) -> Export | None:
        if len(data) < 6:
            self._reply(sock, opt, p.REP_ERR_INVALID)
            return None
        nlen = int.from_bytes(data[:4], "big")
        if 4 + nlen + 2 > len(data):
            self._reply(sock, opt, p.REP_ERR_INVALID)
            return None
        name = data[4 : 4 + nlen].decode("utf-8", "replace")
        export = self.exports.get(name)
        if export is None:
            self._reply(sock, opt, p.REP_ERR_UNKNOWN)
            return None
        self._reply(sock, opt, p.REP_INFO, p.EXPORT_INFO.pack(p.INFO_EXPORT, export.size,
                                                              self._flags(export)))
        self._reply(sock, opt, p.REP_INFO,
                    p.BLOCK_SIZE_INFO.pack(p.INFO_BLOCK_SIZE, 1, 4096, p.MAX_PAYLOAD))
        self._reply(sock, opt, p.REP_ACK)
        return export

    # -- transmission ------------------------------------------------------

    def _transmission(self, sock: socket.socket, export: Export) -> None:
        while True:
            magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(
                _recv_exact(sock, p.REQUEST.size))
            if magic != p.REQUEST_MAGIC:
                raise _Disconnect("bad request magic")
            payload = b""
            if cmd == p.CMD_WRITE:
                if length > p.MAX_PAYLOAD:
                    raise _Disconnect("write payload too large")
                payload = _recv_exact(sock, length)
            elif cmd == p.CMD_DISC:
                try:
                    export.flush()
                except ExportError as exc:
                    log.debug("flush at disconnect failed: %s", exc)
                return
            error, data = self._dispatch(export, cmd, flags, offset, length, payload)
            sock.sendall(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie) + data)

    def _dispatch(self, export: Export, cmd: int, flags: int, offset: int, length: int,
                  payload: bytes) -> tuple[int, bytes]:
        try:
            if offset + length > export.size:
                raise ExportError(p.ENOSPC if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES)
                                  else p.EINVAL)
            if cmd == p.CMD_READ:
                if length > p.MAX_PAYLOAD:
                    raise ExportError(p.EINVAL)
                data = export.pread(offset, length)
                if len(data) != length:
                    raise ExportError(p.EIO, "short read")
                return 0, data
            if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES, p.CMD_TRIM) and not export.writable:
                raise ExportError(p.EPERM)
            if cmd == p.CMD_WRITE:
                export.pwrite(offset, payload)
            elif cmd == p.CMD_WRITE_ZEROES:
                export.write_zeroes(offset, length)
            elif cmd == p.CMD_FLUSH:
                export.flush()
            else:
                raise ExportError(p.EINVAL, f"unsupported command {cmd}")
            if flags & p.CMD_FLAG_FUA:
                export.flush()
            return 0, b""
        except ExportError as exc:
            log.debug("nbd request %d at %d+%d failed: %s", cmd, offset, length, exc)
            return exc.errno, b""


def _quietly(what: str, fn: Callable[..., object], *args: object) -> None:
    """Call ``fn``; an OSError is logged at debug level and otherwise ignored."""
    try:
        fn(*args)
    except OSError as exc:
        log.debug("%s: %s", what, exc)
