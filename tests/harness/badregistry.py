"""A misbehaving registry of our own, for what real registries and CDNs do wrong.

It serves one repository's blobs (`/v2/<repo>/blobs/<digest>`, GET and HEAD, Range and multi-range)
and manifests from memory, and a `Faults` object decides, per request, how to misbehave: ignore Range
(200 with the whole body), refuse multi-range (400/501), answer 503 or 429 (with Retry-After) a number
of times, reset the connection mid-body, stall the body, send a wrong Content-Range, redirect blob
GETs to a "storage" URL that expires after some uses, or lie about sizes and stream far more than was
asked (`claim_bytes`, `whole_bytes`, `token_bytes`). It runs in a thread of the
test process (`start()`/`stop()`), on a free loopback port, and counts what it was asked (`.log`) and
how many body bytes it managed to send (`.sent`: the kernel took them, the client may not have read
them).
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Faults:
    ignore_range: bool = False  # 200 + whole body to any Range request
    multi_range_status: int | None = None  # e.g. 400 or 501 to a multi-range request
    fail_first: int = 0  # answer this many blob requests with fail_status first
    fail_status: int = 503
    retry_after: str | None = None  # Retry-After header sent with fail_status
    reset_first: int = 0  # cut this many blob bodies off half way (connection reset)
    stall_first: int = 0  # stall this many blob bodies half way for stall_seconds
    stall_seconds: float = 30.0
    wrong_content_range: bool = False  # 206 with a Content-Range shifted by one byte
    redirect: bool = False  # blob GETs answer 307 to /storage/<token>/<digest>
    redirect_uses: int = 1_000_000  # a storage token expires (403) after this many uses
    # Size lies, each streaming filler until the client hangs up:
    claim_bytes: int = 0  # 206 to a single range with Content-Range/Content-Length of this many bytes
    whole_bytes: int = 0  # 200 (Range ignored) with a Content-Length of this many bytes: blob, filler
    token_bytes: int = 0  # blob GETs want a Bearer token; /token answers this many bytes (no length)
    counters: dict[str, int] = field(default_factory=dict)

    def take(self, name: str, budget: int) -> bool:
        """True the first `budget` times it is asked for `name`."""
        used = self.counters.get(name, 0)
        self.counters[name] = used + 1
        return used < budget


class BadRegistry:
    def __init__(self, repo: str = "bad/repo", faults: Faults | None = None):
        self.repo = repo
        self.faults = faults or Faults()
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}  # tag or digest -> (body, media type)
        self.log: list[tuple[str, str, str | None, int]] = []  # (method, path, Range, status)
        self.sent = 0  # body bytes of the size-lying answers that the client's socket accepted
        self._tokens: dict[str, int] = {}  # storage token -> uses left
        self._lock = threading.Lock()
        owner = self

        class Handler(_Handler):
            registry = owner

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # resets are what some tests want
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def add_manifest(self, ref: str, body: bytes, media_type: str) -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[ref] = self.manifests[digest] = (body, media_type)
        return digest

    def start(self) -> BadRegistry:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def requests(self, method: str | None = None, prefix: str = "") -> list[tuple[str, str, str | None, int]]:
        with self._lock:
            return [r for r in self.log if (method is None or r[0] == method) and r[1].startswith(prefix)]

    def new_storage_token(self) -> str:
        token = secrets.token_hex(8)
        self._tokens[token] = self.faults.redirect_uses
        return token

    def use_storage_token(self, token: str) -> bool:
        with self._lock:
            left = self._tokens.get(token, 0)
            if left <= 0:
                return False
            self._tokens[token] = left - 1
            return True


class _Handler(BaseHTTPRequestHandler):
    registry: BadRegistry
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _record(self, status: int) -> None:
        with self.registry._lock:
            self.registry.log.append((self.command, self.path, self.headers.get("Range"), status))

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self._record(status)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        reg, f = self.registry, self.registry.faults
        path = self.path.split("?")[0]
        if path == "/v2/":
            return self._reply(200, b"{}")
        if path == "/token":
            return self._flood(200, b'{"token": "', f.token_bytes, {"Content-Type": "application/json"})
        if path.startswith("/storage/"):
            _, _, token, digest = path.split("/", 3)
            if not reg.use_storage_token(token):
                return self._reply(403, b"expired")
            return self._serve_blob(digest)
        prefix = f"/v2/{reg.repo}/"
        if not path.startswith(prefix):
            return self._reply(404)
        kind, _, obj = path[len(prefix) :].partition("/")
        if kind == "manifests":
            if obj not in reg.manifests:
                return self._reply(404)
            body, media_type = reg.manifests[obj]
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            return self._reply(200, body, {"Content-Type": media_type, "Docker-Content-Digest": digest})
        if kind != "blobs" or obj not in reg.blobs:
            return self._reply(404)
        if f.fail_first and f.take("fail", f.fail_first):
            headers = {"Retry-After": f.retry_after} if f.retry_after else {}
            return self._reply(f.fail_status, b"try later", headers)
        if f.token_bytes and not self.headers.get("Authorization"):
            realm = f'Bearer realm="http://{reg.host}/token",service="bad"'
            return self._reply(401, b"{}", {"WWW-Authenticate": realm})
        if f.redirect and self.command == "GET":
            return self._reply(307, headers={"Location": f"/storage/{reg.new_storage_token()}/{obj}"})
        return self._serve_blob(obj)

    def _serve_blob(self, digest: str) -> None:
        f = self.registry.faults
        data = self.registry.blobs[digest]
        spans = _parse_range(self.headers.get("Range"), len(data))
        if f.whole_bytes and spans is not None and self.command == "GET":
            return self._flood(200, data, f.whole_bytes, {"Content-Length": str(f.whole_bytes)})
        if spans and len(spans) == 1 and self.command == "GET":
            a, b = spans[0]
            if f.claim_bytes:
                last = a + f.claim_bytes - 1
                claim = {
                    "Content-Range": f"bytes {a}-{last}/{last + 1}",
                    "Content-Length": str(f.claim_bytes),
                }
                return self._flood(206, data[a:], f.claim_bytes, claim)
        if spans is None or f.ignore_range:
            return self._send_body(200, data, {})
        if not spans:
            return self._reply(416, headers={"Content-Range": f"bytes */{len(data)}"})
        if len(spans) > 1:
            if f.multi_range_status:
                return self._reply(f.multi_range_status, b"multi-range not supported")
            boundary = "LZSBOUNDARY"
            body = b""
            for a, b in spans:
                body += (
                    (
                        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                        f"Content-Range: bytes {a}-{b}/{len(data)}\r\n\r\n"
                    ).encode()
                    + data[a : b + 1]
                    + b"\r\n"
                )
            body += f"--{boundary}--\r\n".encode()
            return self._send_body(206, body, {"Content-Type": f"multipart/byteranges; boundary={boundary}"})
        a, b = spans[0]
        shift = 1 if f.wrong_content_range else 0
        return self._send_body(
            206, data[a : b + 1], {"Content-Range": f"bytes {a + shift}-{b + shift}/{len(data)}"}
        )

    def _flood(self, status: int, start: bytes, total: int, headers: dict[str, str]) -> None:
        """Answer with `headers` as given (a body without Content-Length ends at the close) and stream
        `start` then filler, `total` bytes in all, until the client goes away; count what was sent."""
        self._record(status)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        left = total
        try:
            self.wfile.write(start[:left])
            self.registry.sent += min(len(start), left)
            left -= min(len(start), left)
            while left > 0:
                piece = _FILLER[: min(left, len(_FILLER))]
                self.wfile.write(piece)
                left -= len(piece)
                with self.registry._lock:
                    self.registry.sent += len(piece)
        except OSError:  # the client hung up: what a client should do
            pass

    def _send_body(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        f = self.registry.faults
        cut = self.command == "GET" and len(body) > 1 and f.reset_first and f.take("reset", f.reset_first)
        stall = self.command == "GET" and len(body) > 1 and f.stall_first and f.take("stall", f.stall_first)
        if not (cut or stall):
            return self._reply(status, body, headers)
        self._record(status)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if stall:
            time.sleep(f.stall_seconds)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close_connection = True
        self.connection.close()  # with SO_LINGER 0: a reset, not a clean close


_FILLER = bytes(range(256)) * 256  # 64 KiB


def _parse_range(header: str | None, size: int) -> list[tuple[int, int]] | None:
    """None: no Range header; []: unsatisfiable; else inclusive (first, last) pairs clamped to size."""
    if not header or not header.startswith("bytes="):
        return None
    out = []
    for spec in header[6:].split(","):
        first, _, last = spec.strip().partition("-")
        if first == "":
            a, b = max(0, size - int(last)), size - 1
        else:
            a, b = int(first), min(int(last), size - 1) if last else size - 1
        if a < size and a <= b:
            out.append((a, b))
    return out
