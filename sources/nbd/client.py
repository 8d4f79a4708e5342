"""A small NBD client: fixed newstyle, structured replies, meta contexts, pipelined reads.

Used to pull disk data from QEMU's NBD server (image fleecing), from any NBD
export (libvirt pull backups, qemu-nbd, qemu-storage-daemon) and from
offline images exported privately.

* handshake: FIXED_NEWSTYLE + NO_ZEROES, then STRUCTURED_REPLY,
  SET_META_CONTEXT for the wanted contexts, and GO asking for BLOCK_SIZE
  (falls back to simple replies and EXPORT_NAME where refused);
* :meth:`NbdClient.block_status` loops until the whole range is described;
* :meth:`NbdClient.read_ranges` keeps several READs in flight, splits them at
  the server's maximum block size and receives data straight into the
  result buffers; hole chunks are zeros;
* :meth:`NbdClient.write` and :meth:`NbdClient.write_zeroes` keep several
  writes in flight; :meth:`NbdClient.flush` collects them and makes them
  durable.

Every protocol violation raises :class:`NbdProtocolError`; an error reply
raises :class:`NbdRequestError` carrying the NBD error code.
"""

from __future__ import annotations

import logging
import socket
import struct
import urllib.parse
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from . import protocol as p
from .errors import NbdConnectError, NbdError, NbdProtocolError, NbdRequestError

log = logging.getLogger(__name__)

#: Largest BLOCK_STATUS request (the protocol's u32 length, rounded down to 4 KiB).
MAX_STATUS = 0xFFFFF000
DEFAULT_MAX_BLOCK = 32 << 20
#: Size of one READ: 1 MiB with a few in flight reads fastest from QEMU's servers.
READ_SIZE = 1 << 20


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: a unix socket path or a TCP host and port, and its name."""

    export: str
    unix: str | None = None
    host: str | None = None
    port: int = 10809

    @classmethod
    def parse(cls, url: str) -> NbdAddress:
        """``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT`` (RFC style URIs)."""
        u = urllib.parse.urlsplit(url)
        export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
        if u.scheme == "nbd+unix":
            sock = urllib.parse.parse_qs(u.query).get("socket")
            if not sock:
                raise ValueError(f"{url}: nbd+unix URLs need ?socket=PATH")
            return cls(export, unix=sock[0])
        if u.scheme == "nbd":
            if not u.hostname:
                raise ValueError(f"{url}: no host")
            return cls(export, host=u.hostname, port=u.port or 10809)
        raise ValueError(f"{url}: only nbd:// and nbd+unix:// URLs are supported")

    def __str__(self) -> str:
        if self.unix:
            return f"nbd+unix:///{self.export}?socket={self.unix}"
        return f"nbd://{self.host}:{self.port}/{self.export}"


@dataclass(frozen=True)
class Extent:
    """A described range: ``flags`` as the meta context defines them."""

    offset: int
    length: int
    flags: int


class _Read:
    """A READ in flight."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.length = offset, length
        self.buf = bytearray(length)
        self.view = memoryview(self.buf)
        self.holes: list[tuple[int, int]] = []
        self.covered = 0
        self.error: NbdRequestError | None = None
        self.done = False


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        try:
            n = sock.recv_into(view, len(view), socket.MSG_WAITALL)
        except OSError as exc:
            raise NbdProtocolError(f"the NBD connection broke: {exc.strerror or exc}") from None
        if n == 0:
            raise NbdProtocolError("the NBD server closed the connection")
        view = view[n:]


def _send(sock: socket.socket, data: bytes | memoryview) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise NbdProtocolError(f"the NBD connection broke: {exc.strerror or exc}") from None


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


class NbdClient:
    """One connection to one export."""

    def __init__(self, address: NbdAddress, meta_contexts: Iterable[str] = (),
                 timeout: float | None = 60.0) -> None:
        self.address = address
        self.size = 0
        self.flags = 0
        self.min_block, self.pref_block, self.max_block = 1, 4096, DEFAULT_MAX_BLOCK
        self.structured = False
        self.contexts: dict[str, int] = {}
        self._cookie = 0
        #: Writes in flight (cookie -> what), the first write error, and how many may wait.
        self._writes: dict[int, str] = {}
        self._write_error: NbdRequestError | None = None
        self.write_depth = 8
        try:
            if address.unix:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(address.unix)
            else:
                self.sock = socket.create_connection((address.host, address.port), timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise NbdConnectError(f"cannot connect to {address}: "
                                    f"{exc.strerror or exc}") from None
        try:
            self._handshake(list(meta_contexts))
        except BaseException:
            self.sock.close()
            raise
        # Blocking mode with a kernel receive timeout: MSG_WAITALL then fills a whole
        # reply in one system call (Python's own timeouts poll and return short reads).
        self.sock.settimeout(None)
        if timeout:
            tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    # -- handshake ---------------------------------------------------------

    def _option(self, opt: int, data: bytes = b"") -> None:
        _send(self.sock, p.OPTION.pack(p.IHAVEOPT, opt, len(data)) + data)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = p.OPTION_REPLY.unpack(_recv(self.sock, p.OPTION_REPLY.size))
        if magic != p.OPT_REPLY_MAGIC or ropt != opt:
            raise NbdProtocolError(f"bad option reply (magic {magic:#x}, option {ropt})")
        if length > 16 << 20:
            raise NbdProtocolError("option reply too large")
        return rtype, _recv(self.sock, length) if length else b""

    def _handshake(self, contexts: list[str]) -> None:
        magic, opt_magic, hflags = p.HANDSHAKE.unpack(_recv(self.sock, p.HANDSHAKE.size))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise NbdProtocolError(f"{self.address} is not a newstyle NBD server")
        if not hflags & p.FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("the server does not speak fixed newstyle")
        cflags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if hflags & p.FLAG_NO_ZEROES else 0)
        _send(self.sock, p.CLIENT_FLAGS.pack(cflags))
        name = self.address.export.encode()
        self._option(p.OPT_STRUCTURED_REPLY)
        rtype, _ = self._option_reply(p.OPT_STRUCTURED_REPLY)
        self.structured = rtype == p.REP_ACK
        if contexts:
            if not self.structured:
                raise NbdProtocolError("the server refuses structured replies, so it cannot "
                                       "report " + ", ".join(contexts))
            self._set_meta_contexts(name, contexts)
        self._go(name, bool(hflags & p.FLAG_NO_ZEROES))

    def _set_meta_contexts(self, name: bytes, contexts: list[str]) -> None:
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
        for c in contexts:
            raw = c.encode()
            data += struct.pack(">I", len(raw)) + raw
        self._option(p.OPT_SET_META_CONTEXT, data)
        while True:
            rtype, payload = self._option_reply(p.OPT_SET_META_CONTEXT)
            if rtype == p.REP_ACK:
                break
            if rtype == p.REP_META_CONTEXT and len(payload) >= 4:
                self.contexts[payload[4:].decode()] = struct.unpack(">I", payload[:4])[0]
            elif rtype & p.REP_FLAG_ERROR:
                raise NbdProtocolError(f"the server refused meta contexts ({rtype:#x}): "
                                       f"{payload.decode(errors='replace')}")
        missing = [c for c in contexts if c not in self.contexts]
        if missing:
            raise NbdRequestError(f"{self.address} does not offer " + ", ".join(missing),
                                  p.EINVAL)

    def _go(self, name: bytes, no_zeroes: bool) -> None:
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, p.INFO_BLOCK_SIZE)
        self._option(p.OPT_GO, data)
        got_export = False
        while True:
            rtype, payload = self._option_reply(p.OPT_GO)
            if rtype == p.REP_ACK:
                break
            if rtype == p.REP_INFO and len(payload) >= 2:
                info = struct.unpack(">H", payload[:2])[0]
                if info == p.INFO_EXPORT and len(payload) == p.EXPORT_INFO.size:
                    _, self.size, self.flags = p.EXPORT_INFO.unpack(payload)
                    got_export = True
                elif info == p.INFO_BLOCK_SIZE and len(payload) == p.BLOCK_SIZE_INFO.size:
                    _, self.min_block, self.pref_block, self.max_block = \
                        p.BLOCK_SIZE_INFO.unpack(payload)
            elif rtype == p.REP_ERR_UNSUP:
                self._export_name(name, no_zeroes)
                return
            elif rtype & p.REP_FLAG_ERROR:
                what = "unknown export" if rtype == p.REP_ERR_UNKNOWN else f"error {rtype:#x}"
                raise NbdRequestError(f"{self.address}: {what} "
                                      f"{payload.decode(errors='replace')}".rstrip(), p.EINVAL)
        if not got_export:
            raise NbdProtocolError("the server did not describe the export")

    def _export_name(self, name: bytes, no_zeroes: bool) -> None:
        self._option(p.OPT_EXPORT_NAME, name)
        reply = _recv(self.sock, p.EXPORT_NAME_REPLY.size + (0 if no_zeroes else 124))
        self.size, self.flags = p.EXPORT_NAME_REPLY.unpack(reply[: p.EXPORT_NAME_REPLY.size])

    # -- transmission ------------------------------------------------------

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & p.TFLAG_CAN_MULTI_CONN)

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0) -> int:
        self._cookie += 1
        _send(self.sock, p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, self._cookie, offset,
                                        length))
        return self._cookie

    def _chunk_header(self) -> tuple[int, int, int, int, int]:
        """(magic, flags, type, cookie, length) of the next reply or chunk."""
        head = _recv(self.sock, 4)
        magic = struct.unpack(">I", head)[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", _recv(self.sock, 12))
            return magic, p.REPLY_FLAG_DONE, err, cookie, 0
        if magic == p.STRUCTURED_REPLY_MAGIC and self.structured:
            flags, rtype, cookie, length = struct.unpack(">HHQI", _recv(self.sock, 16))
            return magic, flags, rtype, cookie, length
        raise NbdProtocolError(f"bad reply magic {magic:#x}")

    def _error_chunk(self, rtype: int, payload: bytes, what: str) -> NbdRequestError:
        if len(payload) < 6:
            raise NbdProtocolError("short error chunk")
        err, mlen = struct.unpack(">IH", payload[:6])
        msg = payload[6 : 6 + mlen].decode(errors="replace")
        return NbdRequestError(f"{what} failed: {p.error_name(err)}{': ' + msg if msg else ''}",
                               err)

    def read_ranges(self, ranges: Iterable[tuple[int, int]], depth: int = 4
                    ) -> Iterator[tuple[int, bytearray, list[tuple[int, int]]]]:
        """Read ranges with up to ``depth`` requests in flight; yield them in order.

        Yields ``(offset, data, holes)``: ``holes`` lists ``(offset, length)``
        the server reported as holes (their bytes in ``data`` are zeros).
        Ranges longer than the server's maximum block size are split. The
        server may answer out of order and interleave chunks of different
        requests; each chunk is placed by its cookie.
        """
        states: dict[int, _Read] = {}
        order: deque[int] = deque()
        pieces = (piece for off, n in ranges for piece in self._split(off, n))
        exhausted = False
        while True:
            while not exhausted and len(order) < depth:
                piece = next(pieces, None)
                if piece is None:
                    exhausted = True
                    break
                cookie = self._request(p.CMD_READ, *piece)
                states[cookie] = _Read(*piece)
                order.append(cookie)
            if not order:
                return
            head = states[order[0]]
            while not head.done:
                self._receive_read_chunk(states)
            del states[order.popleft()]
            if head.error is not None:
                # Drain the other replies so the connection stays usable.
                for c in order:
                    while not states[c].done:
                        self._receive_read_chunk(states)
                raise head.error
            yield head.offset, head.buf, head.holes

    # -- writing -----------------------------------------------------------

    @property
    def writable(self) -> bool:
        return not self.flags & p.TFLAG_READ_ONLY

    def _send_write(self, cmd: int, offset: int, length: int, payload: bytes | memoryview,
                    flags: int = 0) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdRequestError(f"write {offset}+{length} outside export of {self.size} "
                                  "bytes", p.EINVAL)
        cookie = self._request(cmd, offset, length, flags)
        if payload:
            _send(self.sock, payload)
        self._writes[cookie] = f"{'write' if cmd == p.CMD_WRITE else 'zero'} {offset}+{length}"
        while len(self._writes) > self.write_depth:
            self._write_reply()

    def _write_reply(self) -> None:
        """Collect one reply to a write, zero or flush request."""
        magic, flags, rtype, cookie, clen = self._chunk_header()
        what = self._writes.pop(cookie, None)
        if what is None:
            raise NbdProtocolError(f"reply for unknown request {cookie}")
        error: NbdRequestError | None = None
        while True:
            if magic == p.SIMPLE_REPLY_MAGIC:
                if rtype:
                    error = NbdRequestError(f"{what} failed: {p.error_name(rtype)}", rtype)
                break
            payload = _recv(self.sock, clen) if clen else b""
            if rtype in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
                error = self._error_chunk(rtype, payload, what)
            elif rtype != p.REPLY_TYPE_NONE:
                raise NbdProtocolError(f"unexpected chunk type {rtype} in a {what} reply")
            if flags & p.REPLY_FLAG_DONE:
                break
            magic, flags, rtype, rcookie, clen = self._chunk_header()
            if rcookie != cookie:
                raise NbdProtocolError("interleaved reply to a write")
        if error is not None:
            self._write_error = self._write_error or error

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``; up to :attr:`write_depth` writes stay in flight, and
        a failure is raised by a later call (at the latest :meth:`flush`)."""
        self._raise_write_error()
        view = memoryview(data).cast("B")
        step = max(1, min(self.max_block, 32 << 20))
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            self._send_write(p.CMD_WRITE, offset + start, len(piece), piece)

    def write_zeroes(self, offset: int, length: int, *, trim: bool = True) -> None:
        """Make ``[offset, offset+length)`` read as zeros (as holes where ``trim``)."""
        self._raise_write_error()
        if not self.flags & p.TFLAG_SEND_WRITE_ZEROES:
            zeros = bytes(min(length, 1 << 20))
            for start in range(0, length, len(zeros)):
                n = min(len(zeros), length - start)
                self._send_write(p.CMD_WRITE, offset + start, n, zeros[:n])
            return
        flags = 0 if trim else p.CMD_FLAG_NO_HOLE
        step = 1 << 30
        for start in range(0, length, step):
            n = min(step, length - start)
            self._send_write(p.CMD_WRITE_ZEROES, offset + start, n, b"", flags)

    def flush(self) -> None:
        """Wait for every write, raise the first failure, then make them durable."""
        while self._writes:
            self._write_reply()
        self._raise_write_error()
        if self.flags & p.TFLAG_SEND_FLUSH:
            cookie = self._request(p.CMD_FLUSH, 0, 0)
            self._writes[cookie] = "flush"
            self._write_reply()
            self._raise_write_error()

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            raise self._write_error

    def pread(self, offset: int, length: int) -> bytes:
        return b"".join(bytes(d) for _, d, _ in self.read_ranges([(offset, length)]))

    def _split(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdRequestError(f"read {offset}+{length} outside export of {self.size} bytes",
                                  p.EINVAL)
        step = max(self.min_block, min(self.max_block, READ_SIZE))
        end = offset + length
        while offset < end:
            n = min(step, end - offset)
            yield offset, n
            offset += n

    def _receive_read_chunk(self, states: dict[int, _Read]) -> None:
        """Receive one reply or chunk and place it into the read it belongs to."""
        magic, flags, rtype, cookie, clen = self._chunk_header()
        st = states.get(cookie)
        if st is None or st.done:
            raise NbdProtocolError(f"reply for unknown request {cookie}")
        what = f"read {st.offset}+{st.length}"
        if magic == p.SIMPLE_REPLY_MAGIC:
            if rtype:
                st.error = NbdRequestError(f"{what} failed: {p.error_name(rtype)}", rtype)
            else:
                _recv_into(self.sock, st.view)
                st.covered = st.length
            st.done = True
            return
        if rtype == p.REPLY_TYPE_OFFSET_DATA:
            if clen < 8:
                raise NbdProtocolError("short data chunk")
            (coff,) = struct.unpack(">Q", _recv(self.sock, 8))
            n = clen - 8
            if coff < st.offset or coff + n > st.offset + st.length:
                raise NbdProtocolError(f"data chunk {coff}+{n} outside request {what}")
            _recv_into(self.sock, st.view[coff - st.offset : coff - st.offset + n])
            st.covered += n
        elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
            if clen != 12:
                raise NbdProtocolError("bad hole chunk")
            coff, n = struct.unpack(">QI", _recv(self.sock, 12))
            if coff < st.offset or coff + n > st.offset + st.length:
                raise NbdProtocolError(f"hole chunk {coff}+{n} outside request {what}")
            st.holes.append((coff, n))  # the buffer is zero-initialised there
            st.covered += n
        elif rtype in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
            st.error = self._error_chunk(rtype, _recv(self.sock, clen), what)
        elif not (rtype == p.REPLY_TYPE_NONE and clen == 0):
            raise NbdProtocolError(f"unexpected chunk type {rtype} in a read reply")
        if flags & p.REPLY_FLAG_DONE:
            st.done = True
            if st.error is None and st.covered != st.length:
                raise NbdProtocolError(f"{what}: chunks covered {st.covered} bytes")

    def block_status(self, context: str, offset: int = 0, length: int | None = None
                     ) -> Iterator[Extent]:
        """Describe ``[offset, offset+length)`` in ``context``, looping until covered."""
        ctx_id = self.contexts.get(context)
        if ctx_id is None:
            raise NbdRequestError(f"meta context {context} was not negotiated", p.EINVAL)
        end = self.size if length is None else offset + length
        if offset < 0 or end > self.size:
            raise NbdRequestError(f"block status {offset}..{end} outside the export", p.EINVAL)
        pos = offset
        while pos < end:
            cookie = self._request(p.CMD_BLOCK_STATUS, pos, min(end - pos, MAX_STATUS))
            got: list[Extent] = []
            error: NbdRequestError | None = None
            while True:
                magic, flags, rtype, rcookie, clen = self._chunk_header()
                if rcookie != cookie:
                    raise NbdProtocolError("block status reply for another request")
                if magic == p.SIMPLE_REPLY_MAGIC:
                    raise NbdRequestError(f"block status failed: {p.error_name(rtype)}", rtype)
                payload = _recv(self.sock, clen) if clen else b""
                if rtype == p.REPLY_TYPE_BLOCK_STATUS:
                    if len(payload) < 4 or (len(payload) - 4) % 8:
                        raise NbdProtocolError("malformed block status chunk")
                    if struct.unpack(">I", payload[:4])[0] == ctx_id:
                        at = pos
                        for i in range(4, len(payload), 8):
                            n, fl = struct.unpack(">II", payload[i : i + 8])
                            if n == 0:
                                raise NbdProtocolError("zero-length extent")
                            n = min(n, end - at)
                            if n <= 0:
                                break
                            got.append(Extent(at, n, fl))
                            at += n
                elif rtype in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
                    error = self._error_chunk(rtype, payload, "block status")
                elif rtype != p.REPLY_TYPE_NONE:
                    raise NbdProtocolError(f"unexpected chunk type {rtype} in block status")
                if flags & p.REPLY_FLAG_DONE:
                    break
            if error is not None:
                raise error
            if not got:
                raise NbdProtocolError(f"block status at {pos} described nothing")
            yield from got
            pos = got[-1].offset + got[-1].length

    def close(self) -> None:
        try:
            self._request(p.CMD_DISC, 0, 0)
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, NbdError) as exc:
            log.debug("closing the connection to %s: %s", self.address, exc)
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Join neighbouring extents with equal flags."""
    out: list[Extent] = []
    for e in extents:
        if out and out[-1].flags == e.flags and out[-1].offset + out[-1].length == e.offset:
            last = out.pop()
            e = Extent(last.offset, last.length + e.length, e.flags)
        out.append(e)
    return out
