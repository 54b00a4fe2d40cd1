"""A transparent HTTP/1.1 relay that records each request's method, path and Range header.

The registry's own access log says what it answered (status, bytes) but not which byte ranges were
asked for; tests of the lazy data path need exactly that. The relay forwards bytes unchanged in both
directions and parses only request heads (and request bodies by Content-Length or chunked framing, to
find the next head). Plain HTTP only: put it in front of a registry without TLS. `delay` slows every
request down and `refuse` makes the registry unreachable, both settable while it runs.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    range: str | None  # the Range header as sent, e.g. "bytes=0-99,200-299"

    def byte_ranges(self) -> list[tuple[int, int | None]]:
        """The requested ranges as (first, last) with last inclusive; (first, None) for "N-";
        a suffix range "-N" is returned as (-N, None)."""
        if not self.range or not self.range.startswith("bytes="):
            return []
        out: list[tuple[int, int | None]] = []
        for spec in self.range[len("bytes=") :].split(","):
            first, _, last = spec.strip().partition("-")
            if first == "":
                out.append((-int(last), None))
            else:
                out.append((int(first), int(last) if last else None))
        return out


class HttpRecorder:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self.delay = 0.0  # seconds each request waits before it is relayed: a slow registry
        self.refuse = False  # answer nothing: new connections are closed at once (a registry down)

    def start(self) -> HttpRecorder:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._closing = True
        _close(self._listener)  # shutdown() wakes the thread blocked in accept()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _close(c)
        for t in self._threads:
            t.join(5)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            self._spawn(self._relay_requests, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._forget(src, dst)

    def _relay_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        reader = _Reader(client)
        try:
            while head := reader.read_head():
                request_line, headers = _parse_head(head)
                method, path = request_line.split(" ")[:2]
                with self._lock:
                    self.requests.append(RecordedRequest(method, path, headers.get("range")))
                if self.delay:
                    time.sleep(self.delay)
                if self.refuse:
                    return
                upstream.sendall(head)
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    reader.relay_chunked(upstream)
                else:
                    reader.relay_exact(int(headers.get("content-length", "0")), upstream)
        except (OSError, ValueError):
            pass
        finally:
            self._forget(client, upstream)

    def _forget(self, *socks: socket.socket) -> None:
        for s in socks:
            _close(s)
        with self._lock:
            self._conns.difference_update(socks)


class _Reader:
    """Buffered reads from a socket, for parsing the request side."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return b""
            if not self.buf[:1].isalpha():  # a TLS ClientHello (skopeo tries HTTPS first): close at once
                raise ValueError("not an HTTP request")
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        return head

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ValueError("connection closed inside a chunked body")
        end = self.buf.index(b"\r\n") + 2
        line, self.buf = self.buf[:end], self.buf[end:]
        return line

    def relay_exact(self, n: int, dst: socket.socket) -> None:
        while n > 0:
            if not self.buf and not self._fill():
                raise ValueError("connection closed inside a request body")
            part, self.buf = self.buf[:n], self.buf[n:]
            dst.sendall(part)
            n -= len(part)

    def relay_chunked(self, dst: socket.socket) -> None:
        while True:
            size_line = self.read_line()
            dst.sendall(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (trailer := self.read_line()) != b"\r\n":
                    dst.sendall(trailer)
                dst.sendall(b"\r\n")
                return
            self.relay_exact(size + 2, dst)  # data and its CRLF


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
