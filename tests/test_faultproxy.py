"""The fault proxy on its own, in front of a small stdlib HTTP/1.1 server."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .faultproxy import FaultProxy, Request


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: list[tuple[str, str, bytes]] = []

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self.hits.append(("GET", self.path, b""))
        self._answer(f"hello {self.path} ".encode() * 100)

    do_HEAD = do_GET  # noqa: N815

    def do_PUT(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.hits.append(("PUT", self.path, body))
        self._answer(b"")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def upstream() -> Iterator[ThreadingHTTPServer]:
    _Upstream.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def proxy(upstream: ThreadingHTTPServer) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.server_address[1], delay=1.0) as p:
        yield p


def _client(proxy: FaultProxy, timeout: float = 5.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)


def _get(conn: http.client.HTTPConnection, path: str,
         method: str = "GET") -> tuple[int, bytes, http.client.HTTPResponse]:
    conn.request(method, path)
    resp = conn.getresponse()
    return resp.status, resp.read(), resp


def test_passes_requests_on_one_kept_alive_connection(proxy: FaultProxy) -> None:
    conn = _client(proxy)
    assert _get(conn, "/a")[:2] == (200, b"hello /a " * 100)
    sock = conn.sock
    assert _get(conn, "/b", "HEAD")[:2] == (200, b"")
    assert _get(conn, "/c")[1] == b"hello /c " * 100
    assert conn.sock is sock  # the same connection throughout
    assert [(r.number, r.method, r.target) for r in proxy.requests] == \
        [(0, "GET", "/a"), (1, "HEAD", "/b"), (2, "GET", "/c")]
    assert proxy.counts == {"pass": 3}
    conn.close()


def test_schedule_applies_per_request_not_per_connection(proxy: FaultProxy) -> None:
    proxy.plan(["pass", "503", "pass", "500", "pass"])
    conn = _client(proxy)
    assert _get(conn, "/1")[0] == 200
    status, body, resp = _get(conn, "/2")
    assert status == 503 and b"<Code>SlowDown</Code>" in body
    assert resp.getheader("Content-Type") == "application/xml"
    assert _get(conn, "/3")[0] == 200  # http.client reconnects after Connection: close
    status, body, _ = _get(conn, "/4")
    assert status == 500 and b"<Code>InternalError</Code>" in body
    assert _get(conn, "/5")[0] == 200 and _get(conn, "/6")[0] == 200  # past the plan: pass
    assert [h[1] for h in _Upstream.hits] == ["/1", "/3", "/5", "/6"]
    assert proxy.counts == {"pass": 4, "503": 1, "500": 1}
    conn.close()


def test_drop_and_lost(proxy: FaultProxy) -> None:
    proxy.plan(["drop", "lost"])
    conn = _client(proxy)
    with pytest.raises(http.client.RemoteDisconnected):
        _get(conn, "/dropped")
    conn.close()
    conn.request("PUT", "/lost", body=b"payload")
    with pytest.raises(http.client.RemoteDisconnected):
        conn.getresponse()
    # Dropped: never reached the server. Lost: reached it, the answer did not come back.
    assert _Upstream.hits == [("PUT", "/lost", b"payload")]
    conn.close()


def test_delay_outlasts_the_clients_timeout(proxy: FaultProxy) -> None:
    proxy.plan(["delay"])
    conn = _client(proxy, timeout=0.3)
    with pytest.raises(TimeoutError):
        _get(conn, "/slow")
    conn.close()
    assert [h[1] for h in _Upstream.hits] == ["/slow"]
    assert _get(_client(proxy), "/fast")[0] == 200


def test_short_answer_is_cut_in_its_body(proxy: FaultProxy) -> None:
    proxy.plan(["short"])
    conn = _client(proxy)
    conn.request("GET", "/x")
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length") or 0) == 900
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert len(info.value.partial) == 450
    conn.close()


def test_expect_100_continue_is_answered(proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"PUT /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"body")
        assert s.recv(1000).startswith(b"HTTP/1.1 200")
    assert _Upstream.hits == [("PUT", "/e", b"body")]
    assert proxy.requests[0].headers["expect"] == "100-continue"


def test_callable_schedule_sees_each_request(proxy: FaultProxy) -> None:
    seen: list[Request] = []

    def schedule(req: Request) -> str:
        seen.append(req)
        return "503" if req.method == "PUT" else "pass"

    proxy.plan(schedule)
    conn = _client(proxy)
    conn.request("PUT", "/p", body=b"abc")
    assert conn.getresponse().status == 503
    conn.close()
    assert _get(conn, "/g")[0] == 200
    assert [(r.number, r.method) for r in seen] == [(0, "PUT"), (1, "GET")]
    assert proxy.requests[0].body_md5 == "kAFQmDzST7DWlj99KOF/cg=="  # MD5 of b"abc"
    proxy.plan(())
    assert proxy.counts == {} and _get(conn, "/h")[0] == 200
    assert proxy.requests[-1].number == 0
    conn.close()


def test_unknown_fault_is_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        proxy.plan(["pass", "explode"])


def test_stop_closes_idle_connections_and_the_port(upstream: ThreadingHTTPServer) -> None:
    p = FaultProxy(upstream.server_address[1])
    conn = _client(p)
    assert _get(conn, "/a")[0] == 200
    p.stop()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        _get(conn, "/b")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p.port), timeout=1).close()
