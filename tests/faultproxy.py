"""A loopback HTTP/1.1 proxy that injects faults between an S3 client and its server.

``FaultProxy(port)`` listens on 127.0.0.1 (a free port, ``proxy.endpoint``)
and relays requests to the server on ``127.0.0.1:port``, deciding for every
request, in arrival order, what to do with it:

``pass``   relay it and its answer;
``drop``   read the request, then close the connection without relaying it;
``lost``   relay it (it takes effect), then close without passing the answer on;
``500``    answer HTTP 500 InternalError (S3-style XML body) without relaying;
``503``    answer HTTP 503 SlowDown without relaying;
``delay``  relay it, then hold the answer for ``delay`` seconds (past the
           client's read timeout) before sending it;
``short``  relay it, then send the answer's head and only half of its body
           (or half of its head if the body is empty) and close.

The schedule is a sequence of those names, one per request (requests after
its end pass), or a callable taking the :class:`Request` (its ``number``
counts from 0 since the schedule was set) and returning a name; set it when
creating the proxy or later with :meth:`FaultProxy.plan`, which also resets
``counts`` (a Counter of the actions taken). ``requests`` records every
request seen: method, target, headers, the MD5 of its body and its action.

Client connections stay alive across requests: the proxy reads each request
whole (head and ``Content-Length`` body; it answers ``Expect: 100-continue``
itself), relays it on a fresh server connection with ``Connection: close``,
reads the answer to its end and passes it on with its framing intact, so
the schedule applies per request, not per connection. Chunked request bodies
are not supported (boto3 does not send them). Stdlib only, one thread per
connection; :meth:`FaultProxy.stop` closes everything.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

ACTIONS = ("pass", "drop", "lost", "500", "503", "delay", "short")
Schedule = Sequence[str] | Callable[["Request"], str]

_ERRORS = {"500": ("500 Internal Server Error", "InternalError",
                   "We encountered an internal error. Please try again."),
           "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate.")}
_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"}


@dataclass
class Request:
    """One request as the proxy saw it."""

    number: int
    method: str
    target: str
    headers: dict[str, str]
    body_md5: str = ""
    body_crc32: str = ""
    action: str = "pass"


class _Closed(Exception):
    """The peer closed the connection."""


def _read_head(sock: socket.socket, buf: bytearray) -> bytes:
    """Bytes up to and including the blank line ending an HTTP head; rest stays in buf."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            return head
        if len(buf) > 1 << 16:
            raise _Closed("head too long")
        chunk = sock.recv(65536)
        if not chunk:
            raise _Closed("eof")
        buf += chunk


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = sock.recv(max(65536, n - len(buf)))
        if not chunk:
            raise _Closed("eof in body")
        buf += chunk
    data = bytes(buf[:n])
    del buf[:n]
    return data


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _build_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return (first + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
            + "\r\n").encode("latin-1")


class FaultProxy:
    """A fault-injecting proxy on 127.0.0.1 in front of the server at ``upstream_port``."""

    def __init__(self, upstream_port: int, schedule: Schedule = (), *,
                 delay: float = 10.0, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay
        self.requests: list[Request] = []
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.plan(schedule)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="faultproxy-accept")
        self._acceptor.start()

    def plan(self, schedule: Schedule) -> None:
        """Use ``schedule`` from the next request on; restart its numbering and ``counts``."""
        if not callable(schedule):
            bad = [a for a in schedule if a not in ACTIONS]
            if bad:
                raise ValueError(f"unknown fault {bad[0]!r} (known: {', '.join(ACTIONS)})")
        with self._lock:
            self._schedule = schedule
            self._number = 0
            self.counts = Counter()

    def _decide(self, method: str, target: str, headers: dict[str, str]) -> Request:
        with self._lock:
            req = Request(self._number, method, target, headers)
            self._number += 1
            if callable(self._schedule):
                req.action = self._schedule(req)
            elif req.number < len(self._schedule):
                req.action = self._schedule[req.number]
            if req.action not in ACTIONS:
                raise ValueError(f"unknown fault {req.action!r}")
            self.counts[req.action] += 1
            self.requests.append(req)
            return req

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for the threads."""
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                log.debug("shutdown of a proxied connection: %s", exc)
            conn.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(60)
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name="faultproxy-conn")
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        try:
            while not self._stopping.is_set():
                if not self._serve_one(conn, buf):
                    break
        except (_Closed, OSError) as exc:
            log.debug("proxied connection ends: %s", exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _serve_one(self, conn: socket.socket, buf: bytearray) -> bool:
        """Handle one request; return whether the connection stays open."""
        first, headers = _parse_head(_read_head(conn, buf))
        method, target = (first.split(" ") + ["", ""])[:2]
        lower = {n.lower(): v for n, v in headers}
        req = self._decide(method, target, lower)
        if "chunked" in lower.get("transfer-encoding", "").lower():
            return False
        expects = lower.get("expect", "").lower() == "100-continue"
        if req.action in ("drop", "500", "503") and expects:
            body = b""  # answer (or hang up) before the client sends its body
        else:
            if expects:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = _read_exact(conn, buf, int(lower.get("content-length", "0") or 0))
        req.body_md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        req.body_crc32 = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        if req.action == "drop":
            return False
        if req.action in _ERRORS:
            conn.sendall(self._error(req, method))
            return False
        fwd = [(n, v) for n, v in headers if n.lower() not in _HOP] + [("Connection", "close")]
        resp = self._relay(_build_head(first, fwd) + body)
        if req.action == "lost":
            return False
        if req.action == "delay" and self._stopping.wait(self.delay):
            return False
        rfirst, rheaders, rbody = self._reframe(resp, method)
        rhead = _build_head(rfirst, rheaders)
        if req.action == "short":
            conn.sendall(rhead + rbody[: len(rbody) // 2] if rbody else rhead[: len(rhead) // 2])
            return False
        keep = lower.get("connection", "").lower() != "close"
        if not keep:
            rhead = _build_head(rfirst, rheaders + [("Connection", "close")])
        conn.sendall(rhead + rbody)
        return keep

    def _relay(self, request: bytes) -> bytes:
        """Send one request to the server on a new connection; return its whole answer."""
        with socket.create_connection(self.upstream, timeout=30) as up:
            up.sendall(request)
            chunks = []
            while chunk := up.recv(1 << 20):
                chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _reframe(resp: bytes, method: str) -> tuple[str, list[tuple[str, str]], bytes]:
        """The answer's status line, hop-free headers and body, framed for a kept-alive link."""
        end = resp.find(b"\r\n\r\n")
        if end < 0:
            raise _Closed("server sent no complete answer")
        first, headers = _parse_head(resp[: end + 4])
        body = resp[end + 4 :]
        headers = [(n, v) for n, v in headers if n.lower() not in _HOP]
        status = int((first.split(" ") + ["0", "0"])[1])
        names = {n.lower() for n, _ in headers}
        bodiless = method == "HEAD" or status in (204, 304) or status < 200
        if not bodiless and "content-length" not in names and "transfer-encoding" not in names:
            headers.append(("Content-Length", str(len(body))))
        return first, headers, b"" if bodiless else body

    @staticmethod
    def _error(req: Request, method: str) -> bytes:
        status, code, message = _ERRORS[req.action]
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
               f"<Message>{message}</Message><RequestId>fault-{req.number}</RequestId>"
               "</Error>").encode()
        head = _build_head(f"HTTP/1.1 {status}", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(xml))),
                                                 ("Connection", "close")])
        return head if method == "HEAD" else head + xml
