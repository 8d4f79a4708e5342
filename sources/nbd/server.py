"""A small NBD server (fixed newstyle) for exports vmrepo provides.

Used as the target of QEMU's backup job in push mode (QEMU connects as an
NBD client and sends the disk's data as WRITE and WRITE_ZEROES requests) and
for instant restore (snapshots read, and written through an overlay, by
QEMU, qemu-img, nbdcopy). An :class:`Export` says what it can do and the
server advertises exactly that.

Each connection is served by its own thread. By default its requests are
handled in order and the reply to a request is sent only after the export
has accepted it, which gives the export natural back-pressure over the
client. An export marked ``concurrent`` has each connection's requests
handled by a small pool of threads instead (at most ``in_flight`` at once),
answered as they complete, out of order.

A server made with ``structured_replies=True`` negotiates structured
replies: reads are answered with data and hole chunks, and the
``base:allocation`` meta context is offered for exports that can describe
their extents. Otherwise structured replies and meta contexts are refused
(ERR_UNSUP), which clients handle by falling back to simple replies.

It listens on a unix socket, which appears at its path only once the server
accepts connections (it is bound under a temporary name and linked into
place, never over an existing file), or on a TCP address.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import protocol as p
from .errors import NbdConnectError

log = logging.getLogger(__name__)

MAX_OPTION_DATA = 64 << 10
#: Context id of base:allocation on a connection that selected it.
_ALLOCATION_ID = 1
#: Most descriptors in one block status reply (the protocol's recommended limit).
MAX_DESCRIPTORS = 1 << 20
#: Most buffers given to one sendmsg (below the kernel's IOV_MAX of 1024).
_IOV_MAX = 512

Buffer = p.Buffer
#: A piece of a read: its length and its bytes, or None where it reads as zeros.
Piece = tuple[int, Buffer | None]


class ExportError(Exception):
    """Raised by an export to answer a request with an NBD error code."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or p.error_name(errno))
        self.errno = errno


class Export(ABC):
    """Something an NBD client can read or write.

    The class attributes are the capabilities the server advertises:
    ``writable`` (else READ_ONLY), ``multi_conn`` (writes of one connection
    are seen by the others and a flush on any covers them), ``concurrent``
    (the export's methods may run in several threads at once for one
    connection), ``can_trim`` (:meth:`trim`) and ``can_block_status``
    (:meth:`block_status`, offered as ``base:allocation``).
    """

    name: str
    size: int
    writable: bool = True
    multi_conn: bool = False
    concurrent: bool = False
    can_trim: bool = False
    can_block_status: bool = False

    def pread(self, offset: int, length: int) -> bytes:
        raise ExportError(p.EIO, "this export cannot be read")

    def read(self, offset: int, length: int) -> Sequence[Piece]:
        """``[offset, offset + length)`` as consecutive pieces; None marks zeros (sent as
        holes where structured replies were negotiated). The default reads :meth:`pread`."""
        return [(length, self.pread(offset, length))]

    @abstractmethod
    def pwrite(self, offset: int, data: bytes) -> None:
        """Accept ``data`` at ``offset``."""

    @abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None:
        """Accept zeros over ``[offset, offset + length)``."""

    def trim(self, offset: int, length: int) -> None:
        """Discard ``[offset, offset + length)`` (only asked of exports with ``can_trim``)."""
        raise ExportError(p.EINVAL, "this export cannot trim")

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make accepted writes durable; the default has nothing to do."""

    def block_status(self, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """``base:allocation`` of consecutive extents from ``offset``: ``(length, flags)``
        with flags STATE_HOLE and STATE_ZERO; they may cover less or more than asked."""
        raise ExportError(p.EINVAL, "this export cannot describe its extents")


class _Disconnect(Exception):
    """The client went away or broke the protocol; end the connection quietly."""


@dataclass
class _Conn:
    """One client connection and what it negotiated."""

    sock: socket.socket
    structured: bool = False
    #: Export name the meta contexts were selected for, and whether base:allocation was.
    meta_export: str | None = None
    allocation: bool = False
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, *buffers: Buffer) -> None:
        """Send a whole reply (header and payload buffers) without copying the payload."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        with self.send_lock:
            i = 0
            while i < len(views):
                sent = self.sock.sendmsg(views[i : i + _IOV_MAX])
                while sent and i < len(views):
                    if sent >= len(views[i]):
                        sent -= len(views[i])
                        i += 1
                    else:
                        views[i] = views[i][sent:]
                        sent = 0


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
    """Serves ``exports`` (by name) on a unix socket at ``path``, or on a TCP ``(host, port)``
    (port 0: any free port; :attr:`bound` tells which)."""

    def __init__(self, path: str | tuple[str, int], exports: Mapping[str, Export], *,
                 structured_replies: bool = False, in_flight: int = 32,
                 workers: int = 8) -> None:
        self.address = path
        #: The unix socket path ("" for TCP).
        self.path = path if isinstance(path, str) else ""
        self.exports = dict(exports)
        self.structured_replies = structured_replies
        self.in_flight = in_flight
        self.workers = workers
        #: The TCP address listened on, once started.
        self.bound: tuple[str, int] | None = None
        self._listener: socket.socket | None = None
        #: The temporary name a unix socket is bound under until it starts; whether the
        #: socket is at :attr:`path` (ours to remove).
        self._tmp = ""
        self._bound_path = False
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self.connections = 0

    def where(self) -> str:
        """The listening address, for messages."""
        if isinstance(self.address, str):
            return self.address
        host, port = self.bound or self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def listen(self) -> None:
        """Bind and listen, without accepting yet: address errors come out here, before
        the exports need to exist (a unix socket is bound under a temporary name)."""
        if self._listener is None:
            self._listener = self._listen_tcp() if isinstance(self.address, tuple) \
                else self._listen_unix()

    def start(self) -> None:
        """Listen (if :meth:`listen` was not called) and accept connections; a unix socket
        appears at its path now."""
        self.listen()
        assert self._listener is not None
        if self._tmp:
            try:
                os.link(self._tmp, self.path)  # appears ready; never replaces a file
            except OSError as exc:
                self._listener.close()
                self._listener = None
                why = "the path exists" if isinstance(exc, FileExistsError) else \
                    exc.strerror or str(exc)
                raise NbdConnectError(f"cannot serve NBD on {self.path}: {why}") from None
            finally:
                _quietly(f"removing {self._tmp}", os.unlink, self._tmp)
                self._tmp = ""
        self._bound_path = bool(self.path)
        t = threading.Thread(target=self._accept_loop, name="vmrepo-nbd-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def _listen_unix(self) -> socket.socket:
        head, tail = os.path.split(self.path)
        tmp = os.path.join(head, f".{tail}.{os.getpid()}-{os.urandom(3).hex()}")
        if len(os.fsencode(tmp)) > 107:  # sun_path: bind the final name directly
            tmp = ""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(tmp or self.path)
            self._tmp = tmp
            self._bound_path = not tmp
            os.chmod(tmp or self.path, 0o600)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            if self._tmp or self._bound_path:
                _quietly(f"removing {tmp or self.path}", os.unlink, tmp or self.path)
                self._tmp, self._bound_path = "", False
            raise NbdConnectError(f"cannot serve NBD on {self.path}: "
                                  f"{exc.strerror or exc}") from None
        return sock

    def _listen_tcp(self) -> socket.socket:
        assert isinstance(self.address, tuple)
        host, port = self.address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise NbdConnectError(f"cannot serve NBD on {self.where()}: {exc.strerror}"
                                  ) from None
        family, stype, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise NbdConnectError(f"cannot serve NBD on {self.where()}: "
                                  f"{exc.strerror or exc}") from None
        self.bound = sock.getsockname()[:2]
        return sock

    def url(self, export: str) -> str:
        """The NBD URL of ``export`` on this server."""
        if isinstance(self.address, str):
            return f"nbd+unix:///{export}?socket={self.address}"
        return f"nbd://{self.where()}/{export}"

    def stop(self) -> None:
        """Close the listener and every connection; wait for the threads; remove the
        socket."""
        self._stopping = True
        if self._tmp:
            _quietly(f"removing {self._tmp}", os.unlink, self._tmp)
            self._tmp = ""
        if self._listener is not None:
            _quietly("shutting the listener down", self._listener.shutdown, socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _quietly("shutting a connection down", c.shutdown, socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(timeout=10)
        if self._bound_path:
            self._bound_path = False
            _quietly(f"removing {self.path}", os.unlink, self.path)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), name="vmrepo-nbd-conn",
                                 daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(sock)
        try:
            export = self._handshake(conn)
            if export is not None:
                self._transmission(conn, export)
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
            if export.can_trim:
                flags |= p.TFLAG_SEND_TRIM
        else:
            flags |= p.TFLAG_READ_ONLY
        if export.multi_conn:
            flags |= p.TFLAG_CAN_MULTI_CONN
        return flags

    def _reply(self, sock: socket.socket, opt: int, rtype: int, data: bytes = b"") -> None:
        sock.sendall(p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _handshake(self, conn: _Conn) -> Export | None:
        sock = conn.sock
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
                name = data.decode("utf-8", "replace")
                export = self.exports.get(name)
                if export is None:
                    raise _Disconnect("unknown export")
                sock.sendall(p.EXPORT_NAME_REPLY.pack(export.size, self._flags(export))
                             + (b"" if no_zeroes else bytes(124)))
                self._enter(conn, name)
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
                found = self._info(sock, opt, data)
                if found is not None and opt == p.OPT_GO:
                    self._enter(conn, found[0])
                    return found[1]
            elif opt == p.OPT_STRUCTURED_REPLY and self.structured_replies:
                if data:
                    self._reply(sock, opt, p.REP_ERR_INVALID)
                else:
                    conn.structured = True
                    self._reply(sock, opt, p.REP_ACK)
            elif opt in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT) and \
                    self.structured_replies:
                self._meta_context(conn, opt, data)
            else:
                self._reply(sock, opt, p.REP_ERR_UNSUP)

    def _enter(self, conn: _Conn, name: str) -> None:
        """Transmission starts on export ``name``: contexts chosen for another one lapse."""
        if conn.meta_export != name:
            conn.allocation = False

    def _meta_context(self, conn: _Conn, opt: int, data: bytes) -> None:
        if opt == p.OPT_SET_META_CONTEXT:
            conn.allocation = False
            conn.meta_export = None
        query = p.parse_meta_query(data)
        if not conn.structured or query is None:
            self._reply(conn.sock, opt, p.REP_ERR_INVALID)
            return
        name, queries = query
        export = self.exports.get(name)
        if export is None:
            self._reply(conn.sock, opt, p.REP_ERR_UNKNOWN)
            return
        if opt == p.OPT_LIST_META_CONTEXT:
            wanted = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
            if wanted and export.can_block_status:
                self._reply(conn.sock, opt, p.REP_META_CONTEXT,
                            struct.pack(">I", 0) + p.BASE_ALLOCATION.encode())
        else:
            conn.meta_export = name
            if export.can_block_status and p.BASE_ALLOCATION in queries:
                conn.allocation = True
                self._reply(conn.sock, opt, p.REP_META_CONTEXT,
                            struct.pack(">I", _ALLOCATION_ID) + p.BASE_ALLOCATION.encode())
        self._reply(conn.sock, opt, p.REP_ACK)

    def _info(self, sock: socket.socket, opt: int, data: bytes) -> tuple[str, Export] | None:
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
        return name, export

    # -- transmission ------------------------------------------------------

    def _transmission(self, conn: _Conn, export: Export) -> None:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vmrepo-nbd-req") \
            if export.concurrent else None
        slots = threading.BoundedSemaphore(self.in_flight)
        try:
            while True:
                magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(
                    _recv_exact(conn.sock, p.REQUEST.size))
                if magic != p.REQUEST_MAGIC:
                    raise _Disconnect("bad request magic")
                payload = b""
                if cmd == p.CMD_WRITE:
                    if length > p.MAX_PAYLOAD:
                        raise _Disconnect("write payload too large")
                    payload = _recv_exact(conn.sock, length)
                elif cmd == p.CMD_DISC:
                    break
                if pool is None:
                    self._handle(conn, export, cmd, flags, cookie, offset, length, payload)
                    continue
                slots.acquire()
                try:
                    fut = pool.submit(self._handle, conn, export, cmd, flags, cookie, offset,
                                      length, payload)
                except RuntimeError:
                    slots.release()
                    raise
                fut.add_done_callback(lambda _f: slots.release())
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        try:
            export.flush()
        except ExportError as exc:
            log.debug("flush at disconnect failed: %s", exc)

    def _handle(self, conn: _Conn, export: Export, cmd: int, flags: int, cookie: int,
                offset: int, length: int, payload: bytes) -> None:
        """Serve one request and send its reply; a broken connection is closed."""
        try:
            if cmd == p.CMD_READ:
                self._read(conn, export, cookie, offset, length)
            elif cmd == p.CMD_BLOCK_STATUS:
                self._block_status(conn, export, flags, cookie, offset, length)
            else:
                self._send_status(conn, cookie,
                                  self._dispatch(export, cmd, flags, offset, length, payload))
        except OSError as exc:
            log.debug("nbd reply failed: %s", exc)
            _quietly("shutting a connection down", conn.sock.shutdown, socket.SHUT_RDWR)
        except Exception:  # noqa: BLE001 - a bug in the export: answer rather than hang
            log.exception("nbd request %d at %d+%d failed", cmd, offset, length)
            try:
                self._send_status(conn, cookie, p.EIO, "internal error")
            except OSError:
                _quietly("shutting a connection down", conn.sock.shutdown, socket.SHUT_RDWR)

    def _send_status(self, conn: _Conn, cookie: int, error: int, message: str = "") -> None:
        if error and conn.structured:
            conn.send(p.error_chunk(cookie, error, message))
        else:
            conn.send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie))

    def _read(self, conn: _Conn, export: Export, cookie: int, offset: int,
              length: int) -> None:
        try:
            if offset + length > export.size or length > p.MAX_PAYLOAD:
                raise ExportError(p.EINVAL)
            pieces = export.read(offset, length) if length else []
            if sum(n for n, _ in pieces) != length or \
                    any(d is not None and len(d) != n for n, d in pieces):
                raise ExportError(p.EIO, "short read")
        except ExportError as exc:
            log.debug("nbd read at %d+%d failed: %s", offset, length, exc)
            self._send_status(conn, cookie, exc.errno, str(exc))
            return
        if not conn.structured:
            out: list[Buffer] = [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie)]
            for n, data in pieces:
                out += [data] if data is not None else p.zeros(n)
            conn.send(*out)
            return
        conn.send(*p.read_reply_chunks(cookie, offset, pieces))

    def _block_status(self, conn: _Conn, export: Export, flags: int, cookie: int,
                      offset: int, length: int) -> None:
        try:
            if not conn.allocation or not length or offset + length > export.size:
                raise ExportError(p.EINVAL)
            extents = list(export.block_status(offset, length))[:MAX_DESCRIPTORS]
            if not extents or any(n <= 0 or n >= 1 << 32 for n, _ in extents):
                raise ExportError(p.EIO, "no extents")
            if flags & p.CMD_FLAG_REQ_ONE:
                extents = [(min(extents[0][0], length), extents[0][1])]
        except ExportError as exc:
            log.debug("nbd block status at %d+%d failed: %s", offset, length, exc)
            self._send_status(conn, cookie, exc.errno, str(exc))
            return
        conn.send(p.block_status_chunk(p.REPLY_FLAG_DONE, cookie, _ALLOCATION_ID, extents))

    def _dispatch(self, export: Export, cmd: int, flags: int, offset: int, length: int,
                  payload: bytes) -> int:
        """Run a request that carries no data back; its NBD error code (0: success)."""
        try:
            if offset + length > export.size:
                raise ExportError(p.ENOSPC if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES)
                                  else p.EINVAL)
            if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES, p.CMD_TRIM) and not export.writable:
                raise ExportError(p.EPERM)
            if cmd == p.CMD_WRITE:
                export.pwrite(offset, payload)
            elif cmd == p.CMD_WRITE_ZEROES:
                export.write_zeroes(offset, length)
            elif cmd == p.CMD_TRIM and export.can_trim:
                export.trim(offset, length)
            elif cmd == p.CMD_FLUSH:
                export.flush()
            else:
                raise ExportError(p.EINVAL, f"unsupported command {cmd}")
            if flags & p.CMD_FLAG_FUA:
                export.flush()
            return 0
        except ExportError as exc:
            log.debug("nbd request %d at %d+%d failed: %s", cmd, offset, length, exc)
            return exc.errno


def _quietly(what: str, fn: Callable[..., object], *args: object) -> None:
    """Call ``fn``; an OSError is logged at debug level and otherwise ignored."""
    try:
        fn(*args)
    except OSError as exc:
        log.debug("%s: %s", what, exc)
