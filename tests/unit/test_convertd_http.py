"""convertd's HTTP listener (hypercorn behind a per-peer connection gate) on a loopback port:
keep-alive, HEAD, limits on the head and body whatever their segmentation, timeouts, malformed requests,
floods of idle and trickling connections; and the service's routes, secret check and the promise that
an event is answered 200 only once it is committed to the queue."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from snapshotter.convertd.config import Config, RepositoryRule
from snapshotter.convertd.jobs import JobStore
from snapshotter.convertd.server import HttpServer, Limits, Request, Response, json_response
from snapshotter.convertd.service import Convertd

DIGEST = "sha256:" + "e" * 64
FAST = Limits(head_timeout=1.0, body_timeout=1.0, send_timeout=1.0)  # real time: keep the tests short


async def echo(req: Request) -> Response:
    if req.path == "/boom":
        raise RuntimeError("handler bug")
    return json_response(
        200, {"method": req.method, "path": req.path, "query": req.query, "size": len(req.body)}
    )


@pytest.fixture
async def serve(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Awaitable[tuple[HttpServer, int]]]]:
    """Start an HttpServer on a free loopback port: (server, port)."""

    async def started(limits: Limits = FAST, handler=echo) -> tuple[HttpServer, int]:
        server = HttpServer(handler, limits)
        listeners = await server.listen("127.0.0.1", 0)
        nursery.start_soon(server.serve, listeners)
        return server, listeners[0].socket.getsockname()[1]

    yield started


async def exchange(
    port: int,
    data: bytes,
    *,
    responses: int = 1,
    close: bool = False,
    until: Callable[[bytes], bool] | None = None,
    timeout: float = 10,
) -> tuple[list[tuple[int, dict[str, str], bytes]], bool, bytes]:
    """Send raw bytes on a new connection (and EOF with `close`); read until `responses` whole responses
    arrived (or `until(received)`), or the server closed. Returns the responses, whether the server
    closed the connection, and the raw bytes."""
    done = until or (lambda received: _complete(received, responses))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received, closed = b"", False
    async with stream:
        await stream.send_all(data)
        if close:
            await stream.send_eof()
        with trio.move_on_after(timeout):
            while not done(received):
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                received += chunk
        if not closed:
            with trio.move_on_after(0.5):
                try:
                    closed = await stream.receive_some(1) == b""
                except trio.BrokenResourceError:
                    closed = True
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


async def test_keep_alive_answers_pipelined_requests_in_order(serve) -> None:
    server, port = await serve()
    post = b"POST /b?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    answers, closed, _ = await exchange(port, get("/a") + post + get("/c"), responses=3)
    assert [json.loads(body)["path"] for _, _, body in answers] == ["/a", "/b", "/c"]
    assert json.loads(answers[1][2]) == {"method": "POST", "path": "/b", "query": {"x": ["1"]}, "size": 5}
    assert answers[0][1]["server"] == "lazysnap-convertd"
    assert not closed


async def test_head_gets_headers_without_a_body(serve) -> None:
    _, port = await serve()
    _, closed, raw = await exchange(
        port, b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n", until=lambda r: r.endswith(b"\r\n\r\n")
    )
    head = raw.decode()
    assert head.startswith("HTTP/1.1 200 ") and "content-length: " in head.lower() and "{" not in head
    assert not closed


async def test_handler_errors_are_500_and_the_connection_lives_on(serve) -> None:
    _, port = await serve()
    answers, closed, _ = await exchange(port, get("/boom") + get("/ok"), responses=2)
    assert [a[0] for a in answers] == [500, 200] and not closed


async def test_a_body_over_the_limit_is_413_without_reading_it(serve) -> None:
    _, port = await serve(Limits(max_body=10, head_timeout=1, body_timeout=1))
    answers, closed, _ = await exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert answers[0][0] == 413 and answers[0][1]["connection"] == "close" and closed
    chunk = b"8\r\n12345678\r\n"
    chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n"
    answers, closed, _ = await exchange(port, chunked)
    assert answers[0][0] == 413 and closed


async def test_malformed_requests_are_400_or_431(serve) -> None:
    _, port = await serve()
    answers, closed, _ = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert answers[0][0] == 400 and closed
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 << 10)  # and more to come, it says
    answers, closed, _ = await exchange(port, huge)
    assert answers[0][0] == 431 and closed


async def test_the_header_limit_holds_for_a_head_in_one_segment(serve) -> None:
    """h11 checks its limit only on a head it is still waiting for: a whole 20 KiB head that arrives in
    one read must be refused all the same."""
    _, port = await serve()
    answers, closed, _ = await exchange(port, get("/", "X-Big: " + "a" * (20 << 10) + "\r\n"))
    assert answers[0][0] == 431 and closed
    answers, _, _ = await exchange(port, get("/", "X-Small: " + "a" * (15 << 10) + "\r\n"))
    assert answers[0][0] == 200


async def test_expect_100_continue(serve) -> None:
    _, port = await serve()
    data = b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"
    answers, _, _ = await exchange(port, data)
    assert answers[0][0] == 200 and json.loads(answers[0][2])["size"] == 2


async def test_a_slow_request_head_is_cut_off(serve) -> None:
    _, port = await serve()
    start = trio.current_time()
    answers, closed, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
    assert answers == [] and closed
    assert 1 <= trio.current_time() - start < 5


async def test_a_slow_body_is_408(serve) -> None:
    _, port = await serve()
    answers, closed, _ = await exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert answers[0][0] == 408 and closed


async def test_an_idle_connection_is_closed_silently(serve) -> None:
    _, port = await serve()
    start = trio.current_time()
    answers, closed, _ = await exchange(port, get("/a"), responses=2)  # one request, then silence
    assert [a[0] for a in answers] == [200] and closed
    assert 1 <= trio.current_time() - start < 5


async def test_a_peer_closing_early_is_harmless(serve) -> None:
    _, port = await serve()
    answers, closed, _ = await exchange(
        port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab", close=True
    )
    assert [a[0] for a in answers] == [400] and closed  # h11: no complete body before the EOF
    answers, _, _ = await exchange(port, get("/after"))
    assert answers[0][0] == 200


async def test_a_flood_of_idle_and_trickling_connections_does_not_lock_out_a_request(serve) -> None:
    """200 sockets that send nothing and one that trickles a header byte every 0.1 s, all from the
    request's own address (as on loopback): the request is answered at once."""
    server, port = await serve(Limits(head_timeout=30, max_per_peer=32, max_connections=64))
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(200)]
    trickler = await trio.open_tcp_stream("127.0.0.1", port)
    async with trio.open_nursery() as nursery:

        async def trickle() -> None:
            for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
                await trickler.send_all(bytes([byte]))
                await trio.sleep(0.1)

        nursery.start_soon(trickle)
        await trio.sleep(0.5)
        start = trio.current_time()
        answers, _, _ = await exchange(port, get("/through"), timeout=5)
        assert answers[0][0] == 200 and trio.current_time() - start < 2
        assert len(server.gate.conns) <= 32 and server.gate.evicted >= 200 - 32
        nursery.cancel_scope.cancel()
    for s in [*idle, trickler]:
        await s.aclose()


async def test_a_request_in_progress_is_never_evicted(serve) -> None:
    release = trio.Event()

    async def slow(req: Request) -> Response:
        if req.path == "/slow":
            await release.wait()
        return await echo(req)

    server, port = await serve(Limits(max_per_peer=2, max_connections=2), slow)
    async with trio.open_nursery() as nursery:
        results: list = []

        async def slow_request() -> None:
            results.append(await exchange(port, get("/slow")))

        nursery.start_soon(slow_request)
        await trio.sleep(0.3)
        others = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
        await trio.sleep(0.3)  # each evicted the one before it (idle), never the slow request's
        assert server.gate.evicted == 4
        release.set()
    assert results[0][0][0][0] == 200
    for s in others:
        await s.aclose()


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


async def test_json_nested_too_deeply_is_400(tmp_path: Path) -> None:
    app = service(tmp_path)
    deep = b'{"events": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = await app.handle(request("POST", "/events", deep))
    assert resp.status == 400 and b"nested too deeply" in resp.body


async def test_jobs_take_the_secret(tmp_path: Path) -> None:
    app = service(tmp_path, secret="s3cret")
    assert (await app.handle(request("GET", "/jobs"))).status == 401
    assert (await app.handle(request("GET", "/jobs", authorization="Bearer nope"))).status == 401
    resp = await app.handle(request("GET", "/jobs", authorization="Bearer s3cret"))
    assert resp.status == 200 and json.loads(resp.body)["jobs"] == []
    for path in ("/metrics", "/healthz"):  # counts and liveness only: open
        assert (await app.handle(request("GET", path))).status == 200
