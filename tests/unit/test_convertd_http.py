"""convertd's HTTP/1.1 server (trio + h11) over in-memory streams: keep-alive, HEAD, limits, timeouts
(on trio's autojump clock), malformed requests; and the service's routes, secret check and the promise
that an event is answered 200 only once it is committed to the queue."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from snapshotter.convertd import Convertd
from snapshotter.convertd_config import Config, RepositoryRule
from snapshotter.convertd_http import HttpServer, Limits, Request, Response, json_response
from snapshotter.jobs import JobStore

DIGEST = "sha256:" + "e" * 64


async def echo(req: Request) -> Response:
    if req.path == "/boom":
        raise RuntimeError("handler bug")
    return json_response(
        200, {"method": req.method, "path": req.path, "query": req.query, "size": len(req.body)}
    )


async def exchange(
    server: HttpServer,
    data: bytes,
    *,
    responses: int = 1,
    close: bool = False,
    until: Callable[[bytes], bool] | None = None,
) -> tuple[list[tuple[int, dict[str, str], bytes]], bool, bytes]:
    """Send raw bytes on one server connection (and EOF with `close`); read until `responses` whole
    responses arrived (or `until(received)`), or the server closed. Returns the responses, whether the
    server closed the connection, and the raw bytes."""
    done = until or (lambda received: _complete(received, responses))
    client, server_side = trio.testing.memory_stream_pair()
    received, closed = b"", False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_side)
        await client.send_all(data)
        if close:
            await client.send_eof()
        with trio.move_on_after(300):
            while not done(received):
                chunk = await client.receive_some(65536)
                if not chunk:
                    closed = True
                    break
                received += chunk
        if not closed:
            with trio.move_on_after(1):
                closed = await client.receive_some(1) == b""
        nursery.cancel_scope.cancel()
    return (_parse(received) if until is None else []), closed, received


def _complete(data: bytes, n: int) -> bool:
    try:
        return len(_parse(data)) >= n
    except ValueError:
        return False


def _parse(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("incomplete head")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status == 100:
            data = rest
            continue
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            raise ValueError("incomplete body")
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def test_keep_alive_answers_pipelined_requests_in_order(autojump_clock: trio.testing.MockClock) -> None:
    server = HttpServer(echo)
    post = b"POST /b?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    answers, closed, _ = await exchange(server, get("/a") + post + get("/c"), responses=3)
    assert [json.loads(body)["path"] for _, _, body in answers] == ["/a", "/b", "/c"]
    assert json.loads(answers[1][2]) == {"method": "POST", "path": "/b", "query": {"x": ["1"]}, "size": 5}
    assert not closed and server.active == 0


async def test_head_gets_headers_without_a_body(autojump_clock: trio.testing.MockClock) -> None:
    _, closed, raw = await exchange(
        HttpServer(echo), b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n", until=lambda r: r.endswith(b"\r\n\r\n")
    )
    head = raw.decode()
    assert head.startswith("HTTP/1.1 200 OK\r\n") and "content-length: " in head.lower() and "{" not in head
    assert not closed


async def test_handler_errors_are_500_and_the_connection_lives_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answers, closed, _ = await exchange(HttpServer(echo), get("/boom") + get("/ok"), responses=2)
    assert [a[0] for a in answers] == [500, 200] and not closed


async def test_a_body_over_the_limit_is_413_without_reading_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = HttpServer(echo, Limits(max_body=10))
    answers, closed, _ = await exchange(server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert answers[0][0] == 413 and answers[0][1]["connection"] == "close" and closed
    chunk = b"8\r\n12345678\r\n"
    chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n"
    answers, closed, _ = await exchange(server, chunked)
    assert answers[0][0] == 413 and closed


async def test_malformed_requests_are_400_or_431(autojump_clock: trio.testing.MockClock) -> None:
    answers, closed, _ = await exchange(HttpServer(echo), b"NOT HTTP AT ALL\r\n\r\n")
    assert answers[0][0] == 400 and closed
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 << 10)  # and more to come, it says
    answers, closed, _ = await exchange(HttpServer(echo), huge)
    assert answers[0][0] == 431 and closed


async def test_expect_100_continue(autojump_clock: trio.testing.MockClock) -> None:
    data = b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"
    answers, _, _ = await exchange(HttpServer(echo), data)
    assert answers[0][0] == 200 and json.loads(answers[0][2])["size"] == 2


async def test_a_slow_request_head_is_408(autojump_clock: trio.testing.MockClock) -> None:
    server = HttpServer(echo, Limits(header_timeout=10, idle_timeout=75))
    start = trio.current_time()
    answers, closed, _ = await exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
    assert answers[0][0] == 408 and closed
    assert 10 <= trio.current_time() - start < 75


async def test_a_slow_body_is_408(autojump_clock: trio.testing.MockClock) -> None:
    server = HttpServer(echo, Limits(body_timeout=30))
    answers, closed, _ = await exchange(
        server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
    )
    assert answers[0][0] == 408 and closed


async def test_an_idle_connection_is_closed_silently(autojump_clock: trio.testing.MockClock) -> None:
    server = HttpServer(echo, Limits(idle_timeout=75))
    start = trio.current_time()
    answers, closed, _ = await exchange(server, get("/a"), responses=2)  # one request, then silence
    assert [a[0] for a in answers] == [200] and closed
    assert trio.current_time() - start >= 75


async def test_a_peer_closing_early_is_harmless(autojump_clock: trio.testing.MockClock) -> None:
    answers, closed, _ = await exchange(
        HttpServer(echo), b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab", close=True
    )
    assert [a[0] for a in answers] == [400] and b"without sending complete message body" in answers[0][2]
    assert closed


async def test_too_many_connections_are_503(autojump_clock: trio.testing.MockClock) -> None:
    server = HttpServer(echo, Limits(max_connections=1))
    server.active = 1
    answers, closed, _ = await exchange(server, get("/"))
    assert answers[0][0] == 503 and closed


# --- the service's routes ---------------------------------------------------------------------------------


def service(tmp_path: Path, **config) -> Convertd:
    cfg = Config(state_dir=tmp_path, repositories=(RepositoryRule("team/*"),), **config)
    return Convertd(cfg, JobStore(tmp_path / "jobs.db"))


def request(method: str, path: str, body: bytes = b"", **headers: str) -> Request:
    return Request(method, path, {}, {k.replace("_", "-").lower(): v for k, v in headers.items()}, body)


def envelope(tag: str = "v1") -> bytes:
    event = {
        "action": "push",
        "timestamp": "2024-01-01T00:00:00Z",
        "target": {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": DIGEST,
            "repository": "team/app",
            "tag": tag,
            "url": f"http://127.0.0.1:5000/v2/team/app/manifests/{DIGEST}",
        },
    }
    return json.dumps({"events": [event]}).encode()


async def test_events_are_committed_before_the_answer(tmp_path: Path) -> None:
    app = service(tmp_path)
    resp = await app.handle(request("POST", "/events", envelope()))
    assert resp.status == 200 and json.loads(resp.body)["accepted"] == 1
    assert app.store.find("127.0.0.1:5000", "team/app", DIGEST) is not None
    resp = await app.handle(request("POST", "/events", envelope()))
    assert json.loads(resp.body) == {"accepted": 0, "duplicates": 1, "ignored": 0, "malformed": 0}
    app.store.close()  # the queue breaks: the registry is told to send again, not 200
    resp = await app.handle(request("POST", "/events", envelope("v2")))
    assert resp.status == 503


@pytest.mark.parametrize(
    ("header", "value", "status"),
    [
        ("Authorization", "Bearer s3cret", 200),
        ("Authorization", "bearer s3cret", 200),
        ("Authorization", "Bearer s3cre", 401),
        ("Authorization", "Basic s3cret", 401),
        ("Authorization", "s3cret", 401),
        ("X-Other", "s3cret", 401),
    ],
)
async def test_the_secret(tmp_path: Path, header: str, value: str, status: int) -> None:
    app = service(tmp_path, secret="s3cret")
    resp = await app.handle(Request("POST", "/events", {}, {header.lower(): value}, b'{"events": []}'))
    assert resp.status == status


async def test_a_non_ascii_secret(tmp_path: Path) -> None:
    app = service(tmp_path, secret="sécret✓")
    raw = "Bearer sécret✓".encode().decode("latin-1")  # as the server hands header bytes over
    ok = Request("POST", "/events", {}, {"authorization": raw}, b'{"events": []}')
    assert (await app.handle(ok)).status == 200


async def test_a_secret_in_another_header(tmp_path: Path) -> None:
    app = service(tmp_path, secret="s3cret", secret_header="X-Token")
    ok = Request("POST", "/events", {}, {"x-token": "s3cret"}, b'{"events": []}')
    assert (await app.handle(ok)).status == 200
    bearer = Request("POST", "/events", {}, {"x-token": "Bearer s3cret"}, b'{"events": []}')
    assert (await app.handle(bearer)).status == 401


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "status"),
    [
        ("POST", "/events", b"{", "", 400),
        ("POST", "/events", b"[]", "", 400),
        ("POST", "/events", b'{"events": {}}', "", 400),
        ("POST", "/events", b'{"events": []}', "", 200),
        ("POST", "/events", b'{"events": []}', "application/vnd.docker.distribution.events.v1+json", 200),
        ("POST", "/events", b'{"events": []}', "application/json; charset=utf-8", 200),
        ("POST", "/events", b'{"events": []}', "text/html", 415),
        ("PUT", "/events", b"", "", 405),
        ("GET", "/healthz", b"", "", 200),
        ("POST", "/healthz", b"", "", 405),
        ("GET", "/jobs", b"", "", 200),
        ("GET", "/metrics", b"", "", 200),
        ("GET", "/", b"", "", 404),
        ("GET", "/events/x", b"", "", 404),
    ],
)
async def test_routes(
    tmp_path: Path, method: str, path: str, body: bytes, content_type: str, status: int
) -> None:
    app = service(tmp_path)
    headers = {"content-type": content_type} if content_type else {}
    resp = await app.handle(Request(method, path, {}, headers, body))
    assert resp.status == status, resp.body
    if status == 405:
        assert dict(resp.headers)["Allow"]
