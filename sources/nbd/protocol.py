"""NBD protocol constants and wire structures (see the NBD protocol specification).

Shared by vmrepo's NBD server (push backups, instant restore) and its NBD
client (pull backups). Only the fixed newstyle handshake is supported. The
helpers at the end build the server's structured reply chunks and parse the
meta context options it receives.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# Info types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# Commands and their flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply chunk types and flags.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# The base:allocation meta context and its flags.
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# Error values.
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERROR_NAMES = {EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL",
               ENOSPC: "ENOSPC", EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP",
               ESHUTDOWN: "ESHUTDOWN"}

Buffer = bytes | bytearray | memoryview

#: Maximum payload the server accepts in one request (QEMU sends at most 32 MiB).
MAX_PAYLOAD = 32 << 20
_ZEROS = bytes(1 << 20)

# Wire structures (network byte order).
HANDSHAKE = struct.Struct(">QQH")           # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")              # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")       # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")          # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")        # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
EXPORT_INFO = struct.Struct(">HQH")         # INFO_EXPORT, size, transmission flags
BLOCK_SIZE_INFO = struct.Struct(">HIII")    # INFO_BLOCK_SIZE, minimum, preferred, maximum
EXPORT_NAME_REPLY = struct.Struct(">QH")    # size, transmission flags
OFFSET = struct.Struct(">Q")                # offset of an OFFSET_DATA chunk
HOLE = struct.Struct(">QI")                 # offset, length of an OFFSET_HOLE chunk
ERROR = struct.Struct(">IH")                # error, message length of an ERROR chunk
DESCRIPTOR = struct.Struct(">II")           # extent length, status flags


def error_name(code: int) -> str:
    return ERROR_NAMES.get(code, f"error {code}")


def chunk_header(flags: int, rtype: int, cookie: int, length: int) -> bytes:
    """The header of one structured reply chunk carrying ``length`` bytes of payload."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def hole_chunk(flags: int, cookie: int, offset: int, length: int) -> bytes:
    """An OFFSET_HOLE chunk: ``length`` bytes at ``offset`` read as zeros."""
    return chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, HOLE.size) + \
        HOLE.pack(offset, length)


def error_chunk(cookie: int, errno: int, message: str = "") -> bytes:
    """A final ERROR chunk (the message is cut to fit the protocol's 4 KiB string limit)."""
    raw = message.encode()[:4096]
    return chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, ERROR.size + len(raw)) + \
        ERROR.pack(errno, len(raw)) + raw


def block_status_chunk(flags: int, cookie: int, context_id: int,
                       extents: list[tuple[int, int]]) -> bytes:
    """A BLOCK_STATUS chunk describing consecutive ``(length, status flags)`` extents."""
    body = b"".join(DESCRIPTOR.pack(n, f) for n, f in extents)
    return chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(body)) + \
        struct.pack(">I", context_id) + body


def parse_meta_query(data: bytes) -> tuple[str, list[str]] | None:
    """Export name and queries of a LIST/SET_META_CONTEXT option; None if malformed."""
    try:
        (nlen,) = struct.unpack_from(">I", data, 0)
        name = data[4 : 4 + nlen].decode("utf-8", "replace")
        pos = 4 + nlen
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (qlen,) = struct.unpack_from(">I", data, pos)
            if pos + 4 + qlen > len(data):
                return None
            queries.append(data[pos + 4 : pos + 4 + qlen].decode("utf-8", "replace"))
            pos += 4 + qlen
    except struct.error:
        return None
    if len(name.encode()) != nlen or pos != len(data):
        return None
    return name, queries


def zeros(n: int) -> list[Buffer]:
    """``n`` zero bytes as buffers (for a simple reply to a read of holes)."""
    full, rest = divmod(n, len(_ZEROS))
    out: list[Buffer] = [_ZEROS] * full
    if rest:
        out.append(memoryview(_ZEROS)[:rest])
    return out


def read_reply_chunks(cookie: int, offset: int,
                      pieces: Sequence[tuple[int, Buffer | None]]) -> list[Buffer]:
    """The structured reply to a read of consecutive ``(length, data or None)`` pieces:
    neighbouring data pieces share one data chunk, zeros (None) become hole chunks, the
    last chunk carries DONE."""
    runs: list[tuple[int, int, list[Buffer] | None]] = []  # offset, length, data or hole
    pos = offset
    for n, data in pieces:
        if not n:
            continue
        last = runs[-1] if runs else None
        if last is not None and (last[2] is None) == (data is None):
            if data is not None:
                assert last[2] is not None
                last[2].append(data)
            runs[-1] = (last[0], last[1] + n, last[2])
        else:
            runs.append((pos, n, None if data is None else [data]))
        pos += n
    if not runs:
        return [chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)]
    out: list[Buffer] = []
    for i, (at, n, bufs) in enumerate(runs):
        done = REPLY_FLAG_DONE if i == len(runs) - 1 else 0
        if bufs is None:
            out.append(hole_chunk(done, cookie, at, n))
        else:
            out.append(chunk_header(done, REPLY_TYPE_OFFSET_DATA, cookie, 8 + n)
                       + OFFSET.pack(at))
            out += bufs
    return out
