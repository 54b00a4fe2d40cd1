"""A small, generic HTTP/1.1 server on trio and h11, as convertd uses it: keep-alive, requests read whole
before the handler runs, bounded header and body sizes, timeouts for the head, the body, idle connections
and sending, a connection limit, and JSON responses and errors. It knows nothing of convertd's routes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

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
    max_header: int = 16 << 10
    max_body: int = 1 << 20
    header_timeout: float = 10.0  # from the first byte of a request to the end of its head
    body_timeout: float = 30.0  # from the end of the head to the end of the body
    idle_timeout: float = 75.0  # a kept-alive connection without a new request is closed
    send_timeout: float = 30.0
    max_connections: int = 64


class _Timeout(Exception):
    def __init__(self, started: bool):
        self.started = started


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """HTTP/1.1 with keep-alive. Each request is read whole (within the limits) before `handler` runs;
    handler errors are answered 500 and logged, never closing the server."""

    def __init__(self, handler: Handler, limits: Limits | None = None):
        self.handler = handler
        self.limits = limits or Limits()
        self.active = 0

    @staticmethod
    async def listen(host: str, port: int) -> list[trio.SocketListener]:
        """Bind (raises OSError); an empty host means every interface."""
        return await trio.open_tcp_listeners(port, host=host or None)

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self.handle_connection, listeners)

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        if self.active >= self.limits.max_connections:
            with trio.move_on_after(1):
                await _send_raw_close(stream, 503, "too many connections")
            await trio.aclose_forcefully(stream)
            return
        self.active += 1
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header)
            while await self._exchange(conn, stream):
                conn.start_next_cycle()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            h11.ProtocolError,
            OSError,
        ) as e:
            log.debug("connection closed", extra={"fields": {"error": str(e) or type(e).__name__}})
        except Exception:  # never let one connection stop the server
            log.exception("unexpected error on an HTTP connection")
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _next_event(self, conn: h11.Connection, stream: trio.abc.Stream, deadline: float | None) -> Any:
        """The next h11 event by `deadline`; None (waiting for a request head): the idle timeout until
        its first byte, then the header timeout from that byte on (a slow sender cannot extend it)."""
        if deadline is None and conn.trailing_data[0]:
            deadline = trio.current_time() + self.limits.header_timeout
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            limit = trio.current_time() + self.limits.idle_timeout if deadline is None else deadline
            with trio.move_on_at(limit):
                data = await stream.receive_some(65536)
                if data and deadline is None:
                    deadline = trio.current_time() + self.limits.header_timeout
                conn.receive_data(data)
                continue
            raise _Timeout(started=deadline is not None)

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, *events: Any) -> None:
        data = b"".join(conn.send(e) or b"" for e in events)
        with trio.fail_after(self.limits.send_timeout):
            await stream.send_all(data)

    async def _respond(
        self, conn: h11.Connection, stream: trio.abc.Stream, resp: Response, close: bool, head: bool = False
    ) -> None:
        headers = [
            ("Content-Type", resp.content_type),
            ("Content-Length", str(len(resp.body))),
            ("Server", "lazysnap-convertd"),
            *resp.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        events: list[Any] = [
            h11.Response(status_code=resp.status, headers=headers, reason=_reason(resp.status))
        ]
        if resp.body and not head:  # a response to HEAD has the headers of GET's, and no body
            events.append(h11.Data(data=resp.body))
        events.append(h11.EndOfMessage())
        await self._send(conn, stream, *events)

    async def _exchange(self, conn: h11.Connection, stream: trio.abc.Stream) -> bool:
        """Read one request, answer it; whether the connection can carry another."""
        try:
            event = await self._next_event(conn, stream, None)
        except _Timeout as t:
            if t.started:
                await self._error(conn, stream, 408, "the request head did not arrive in time")
            return False
        except h11.RemoteProtocolError as e:
            await self._error(conn, stream, e.error_status_hint, f"bad request: {e}")
            return False
        if isinstance(event, h11.ConnectionClosed):
            return False
        if not isinstance(event, h11.Request):
            return False
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii", "replace").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body:
            await self._error(conn, stream, 413, f"the body is over {self.limits.max_body} bytes")
            return False
        if conn.they_are_waiting_for_100_continue:
            await self._send(conn, stream, h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        deadline = trio.current_time() + self.limits.body_timeout
        try:
            while True:
                event = await self._next_event(conn, stream, deadline)
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.limits.max_body:
                        await self._error(conn, stream, 413, f"the body is over {self.limits.max_body} bytes")
                        return False
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # the peer closed mid-body
                    return False
        except _Timeout:
            await self._error(conn, stream, 408, "the request body did not arrive in time")
            return False
        except h11.RemoteProtocolError as e:
            await self._error(conn, stream, e.error_status_hint, f"bad request: {e}")
            return False
        split = urlsplit(target)
        request = Request(method, split.path or "/", parse_qs(split.query), headers, bytes(body))
        try:
            response = await self.handler(request)
        except Exception:
            log.exception(
                "error answering a request", extra={"fields": {"method": method, "path": split.path}}
            )
            response = error_response(500, "internal error (see convertd's log)")
        await self._respond(conn, stream, response, close=False, head=method == "HEAD")
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _error(self, conn: h11.Connection, stream: trio.abc.Stream, status: int, message: str) -> None:
        """Answer an error and close, when a response can still be sent on this connection."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            if conn.our_state is h11.IDLE:  # no complete request head: h11 cannot frame a response
                await _send_raw_close(stream, status, message)
            else:
                await self._respond(conn, stream, error_response(status, message), close=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, h11.ProtocolError):
            pass


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _send_raw_close(stream: trio.abc.Stream, status: int, message: str) -> None:
    """A whole response written by hand, for errors before h11 has a request to answer."""
    body = json.dumps({"error": message}).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {_reason(status).decode()}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with trio.move_on_after(5):
        await stream.send_all(head.encode() + body)
