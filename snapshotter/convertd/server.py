"""convertd's HTTP listener: hypercorn (HTTP/1.1, and HTTP/2 for clients that speak it) on trio, behind
a per-peer connection gate, handing whole, bounded requests to a handler. It knows nothing of convertd's
routes.

- The gate (`ConnectionGate`) admits at most `max_per_peer` connections per peer address and
  `max_connections` in all. A connection over either limit does not wait or get refused while any other
  can go: the open connection (of the same peer, or of any peer) that has gone longest without sending a
  request, and has none in progress, is closed to make room. A flood of idle or trickling sockets thus
  costs its sender its own oldest sockets, never a request in progress nor a client that sends its
  request when it connects (as a registry posting a notification does).
- Every connection must deliver a complete request head within `head_timeout` of connecting or of its
  previous response (hypercorn's keep-alive timer, which only a complete head stops), else it is closed:
  a slowloris trickling a header byte a second lasts that long and no longer.
- The head may be at most `max_header` bytes however it arrives (h11 checks only heads that arrive in
  pieces; the adapter checks complete ones): 431. The body at most `max_body` (413, unread when
  Content-Length says so), within `body_timeout` (408). Sending a response may take `send_timeout`.
- Handler errors are answered 500 and logged; the connection lives on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

log = logging.getLogger("lazysnap.convertd")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, value: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(value, indent=1, ensure_ascii=False).encode() + b"\n"
    return Response(status, body, "application/json", headers or [])


def error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


@dataclass(frozen=True)
class Limits:
    max_header: int = 16 << 10  # request line and header fields, in bytes
    max_body: int = 1 << 20
    head_timeout: float = 10.0  # connect (or the previous response) to a complete request head
    body_timeout: float = 30.0  # the end of the head to the end of the body
    send_timeout: float = 30.0  # one write of a response
    max_connections: int = 256  # open connections in all
    max_per_peer: int = 32  # open connections of one peer address


Handler = Callable[[Request], Awaitable[Response]]


# --- admission ---------------------------------------------------------------------------------------------


@dataclass
class _Conn:
    peer: str
    stream: trio.SocketStream
    quiet_since: float  # accepted, or its last request finished
    requests: int = 0  # in progress


class ConnectionGate:
    """Which connections may stay open (see the module's docstring); keyed by (peer address, port)."""

    def __init__(self, max_connections: int, max_per_peer: int):
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.conns: dict[tuple[str, int], _Conn] = {}
        self.evicted = 0

    def admit(self, key: tuple[str, int], stream: trio.SocketStream) -> bool:
        """Make room for a new connection (closing idle ones) and register it; False: no room."""
        peer = key[0]
        if sum(c.peer == peer for c in self.conns.values()) >= self.max_per_peer:
            if not self._evict(peer):
                return False
        if len(self.conns) >= self.max_connections and not self._evict(None):
            return False
        self.conns[key] = _Conn(peer, stream, trio.current_time())
        return True

    def _evict(self, peer: str | None) -> bool:
        idle = [c for c in self.conns.values() if c.requests == 0 and (peer is None or c.peer == peer)]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.quiet_since)
        victim.stream.socket.close()  # its tasks see ClosedResourceError; it leaves the gate as it ends
        self.conns = {k: c for k, c in self.conns.items() if c is not victim}
        self.evicted += 1
        log.debug("idle connection closed for a new one", extra={"fields": {"peer": victim.peer}})
        return True

    def leave(self, key: tuple[str, int], stream: trio.SocketStream) -> None:
        conn = self.conns.get(key)
        if conn is not None and conn.stream is stream:
            del self.conns[key]

    def started(self, key: tuple[str, int]) -> None:
        if conn := self.conns.get(key):
            conn.requests += 1

    def finished(self, key: tuple[str, int]) -> None:
        if conn := self.conns.get(key):
            conn.requests -= 1
            conn.quiet_since = trio.current_time()


class _TimedStream:
    """A socket stream whose writes give up after `timeout` (hypercorn's are shielded and unbounded): a
    peer that does not read its response loses its connection. Like a plain SocketStream it has no
    `do_handshake`, which is how hypercorn tells it is not TLS."""

    def __init__(self, stream: trio.SocketStream, timeout: float):
        self._stream, self._timeout = stream, timeout
        self.socket = stream.socket

    async def send_all(self, data: bytes) -> None:
        with trio.move_on_after(self._timeout):
            await self._stream.send_all(data)
            return
        self.socket.close()
        raise trio.BrokenResourceError(f"the peer did not read a response for {self._timeout:.0f}s")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


# --- the server --------------------------------------------------------------------------------------------


class HttpServer:
    """Serve `handler` on listeners; see the module's docstring for the limits."""

    def __init__(self, handler: Handler, limits: Limits | None = None):
        self.handler = handler
        self.limits = limits or Limits()
        self.gate = ConnectionGate(self.limits.max_connections, self.limits.max_per_peer)
        config = HypercornConfig()
        config.keep_alive_timeout = self.limits.head_timeout
        config.h11_max_incomplete_size = self.limits.max_header
        config.include_server_header = False
        config.accesslog = None
        config.errorlog = logging.getLogger("lazysnap.convertd.http")
        self._config = config
        self._app = wrap_app(self._asgi, config.wsgi_max_body_size, "asgi")
        self._context = WorkerContext(None)

    @staticmethod
    async def listen(host: str, port: int) -> list[trio.SocketListener]:
        """Bind (raises OSError); an empty host means every interface."""
        return await trio.open_tcp_listeners(port, host=host or None)

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self.handle_connection, listeners)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        key = (str(peer[0]), int(peer[1]))
        if not self.gate.admit(key, stream):  # every connection has a request in progress
            log.warning("connection refused: every slot is busy", extra={"fields": {"peer": key[0]}})
            await trio.aclose_forcefully(stream)
            return
        try:
            timed = _TimedStream(stream, self.limits.send_timeout)
            await TCPServer(self._app, self._config, self._context, ConnectionState({}), timed)  # type: ignore[arg-type]
        except Exception:  # never let one connection stop the server
            log.exception("unexpected error on an HTTP connection")
        finally:
            self.gate.leave(key, stream)
            await trio.aclose_forcefully(stream)

    # --- ASGI ------------------------------------------------------------------------------------------

    async def _asgi(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # lifespan is not run; websockets are refused
            return
        client = scope.get("client") or ("", 0)
        key = (str(client[0]), int(client[1]))
        self.gate.started(key)
        try:
            response, close = await self._answer(scope, receive)
            if response is not None:
                await self._send(scope, send, response, close)
        finally:
            self.gate.finished(key)

    async def _answer(self, scope: dict, receive: Callable) -> tuple[Response | None, bool]:
        """The response to one request (None: the peer went away) and whether to close afterwards."""
        method = scope["method"]
        raw_headers = scope["headers"]
        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        head_size = len(method) + target + sum(len(n) + len(v) + 4 for n, v in raw_headers)
        if head_size > self.limits.max_header:
            return error_response(431, f"the request head is over {self.limits.max_header} bytes"), True
        headers: dict[str, str] = {}
        for name, value in raw_headers:
            k = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[k] = f"{headers[k]}, {text}" if k in headers else text
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body:
            return error_response(413, f"the body is over {self.limits.max_body} bytes"), True
        body = bytearray()
        with trio.move_on_after(self.limits.body_timeout) as timer:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None, True
                body += message.get("body", b"")
                if len(body) > self.limits.max_body:
                    return error_response(413, f"the body is over {self.limits.max_body} bytes"), True
                if not message.get("more_body"):
                    break
        if timer.cancelled_caught:
            return error_response(408, "the request body did not arrive in time"), True
        path = scope["path"] or "/"
        query = parse_qs(scope["query_string"].decode("latin-1"))
        try:
            return await self.handler(Request(method, path, query, headers, bytes(body))), False
        except Exception:
            log.exception("error answering a request", extra={"fields": {"method": method, "path": path}})
            return error_response(500, "internal error (see convertd's log)"), False

    async def _send(self, scope: dict, send: Callable, resp: Response, close: bool) -> None:
        headers = [
            (b"content-type", resp.content_type.encode("latin-1")),
            (b"content-length", str(len(resp.body)).encode()),
            (b"server", b"lazysnap-convertd"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers),
        ]
        if close and scope.get("http_version") in ("1.0", "1.1"):  # HTTP/2 has no Connection header
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        # a response to HEAD has the headers of GET's, and no body
        body = b"" if scope["method"] == "HEAD" else resp.body
        await send({"type": "http.response.body", "body": body, "more_body": False})
