"""An async (trio) registry client: resolve images, read blob ranges, push.

Every request goes through `_call`: the endpoints of the registry host that have the needed capability
are tried in order (mirrors, then the origin); on each, a bounded retry loop with exponential backoff
and full jitter handles connection errors, 5xx and 429 (honouring Retry-After), and a 401 is answered
once with fresh credentials. A caller-supplied handler reads the response inside the loop, so a body
cut off mid-way is retried too. Each public operation runs under an overall deadline.

Whole blobs as files (for the converter): `download_blob` streams a blob to a file and verifies it;
`upload_blob_file` uploads a file in bounded PATCH chunks (or mounts it from another repository).

Blob reads: ranges are coalesced into one multi-range request where the host supports it (a host that
answers 200, 400, 416 or 501 to a multi-range request is remembered and asked single ranges from then on),
every Content-Range is checked against the request, and redirects to blob storage are cached per blob
and re-resolved through the registry when they stop working.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin

import httpx
import trio

from . import manifests
from .auth import Authorizer, scope_for
from .bodies import abandon, origin, read_capped, read_window, too_much
from .credentials import CredentialStore
from .errors import (
    ConfigError,
    DigestMismatch,
    ManifestError,
    NotFound,
    ProtocolViolation,
    RangeNotSatisfiable,
    RegistryError,
    Unauthorized,
    Unavailable,
)
from .hosts import Endpoint, HostsConfig
from .ranges import (
    Early,
    Span,
    Tap,
    boundary_of,
    multipart_cap,
    parse_content_range,
    parse_multipart,
    range_header,
    requested_bytes,
    slice_spans,
    uncovered,
)
from .reference import Reference

log = logging.getLogger("lazysnap.registry")
T = TypeVar("T")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_CONFIG_SIZE = 64 << 20
MAX_RETRY_AFTER = 60.0
FILE_BUFFER = 1 << 20  # blob downloads are written to their file in pieces of this size
FILE_UPLOAD_CHUNK = 16 << 20  # file uploads larger than this go up in PATCHes of this size
MIN_TRANSFER_RATE = 1 << 20  # bytes/s that long transfers are given time for, beyond the deadline


@dataclass(frozen=True)
class Options:
    request_timeout: float = 30.0  # connect / read / write, each
    deadline: float = 120.0  # one whole operation, retries included
    max_attempts: int = 5  # per endpoint
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    max_connections: int = 16  # per endpoint
    http2: bool = True
    upload_chunk: int = 0  # 0: monolithic blob uploads; else PATCH chunks of this size
    user_agent: str = "lazysnap/0.1"


@dataclass(frozen=True)
class Resolved:
    """An image resolved to one platform's manifest."""

    reference: Reference  # with the manifest digest
    manifest: dict
    media_type: str
    index_digest: str | None  # the index it was selected from, if any

    @property
    def digest(self) -> str:
        assert self.reference.digest
        return self.reference.digest

    @property
    def layers(self) -> list[dict]:
        return self.manifest["layers"]

    @property
    def config_descriptor(self) -> dict:
        return self.manifest["config"]


class _StaleRedirect(Exception):
    """The cached blob-storage URL stopped working; go through the registry again."""


class RegistryClient:
    def __init__(
        self,
        *,
        hosts: HostsConfig | None = None,
        credentials: CredentialStore | None = None,
        options: Options | None = None,
    ):
        self.hosts = hosts or HostsConfig()
        self.credentials = credentials or CredentialStore()
        self.options = options or Options()
        self.auth = Authorizer(self.credentials)
        self._clients: dict[tuple, httpx.AsyncClient] = {}
        self._single_range_only: set[str] = set()
        self._redirects: dict[tuple[str, str, str], str] = {}
        self.requests_sent = 0

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()

    # --- resolving -----------------------------------------------------------------------------

    async def resolve(self, ref: Reference | str, platform: manifests.Platform | None = None) -> Resolved:
        """The manifest of an image for one platform (the host's unless given), digests verified."""
        ref = Reference.parse(ref) if isinstance(ref, str) else ref
        want = platform or manifests.Platform.host()
        body, kind, digest = await self.get_manifest(ref)
        doc, kind = manifests.parse(body, kind, str(ref))
        index_digest = None
        if kind in manifests.INDEXES:
            index_digest = digest
            entry = manifests.select(doc, want, str(ref))
            body, kind, digest = await self.get_manifest(ref.with_digest(entry["digest"]))
            doc, kind = manifests.parse(body, kind, f"{ref}@{entry['digest']}")
            if kind in manifests.INDEXES:
                raise ManifestError(f"{ref}: nested index for platform {want} is not supported")
        return Resolved(ref.with_digest(digest), doc, kind, index_digest)

    async def get_manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index; the digest is verified."""

        async def handle(resp: httpx.Response) -> tuple[bytes, str, str]:
            self._expect(resp, (200,), f"manifest {ref}")
            body = await read_capped(resp, manifests.MAX_MANIFEST_SIZE, f"manifest {ref}")
            actual = _sha256(body)
            expected = ref.digest or resp.headers.get("docker-content-digest") or actual
            if actual != expected:
                raise DigestMismatch(f"manifest {ref}: content has digest {actual}, expected {expected}")
            return body, resp.headers.get("content-type", ""), actual

        capability = "pull" if ref.digest else "resolve"
        return await self._operation(
            self._call(
                ref, "GET", "manifests", ref.object, capability, handle, headers={"Accept": manifests.ACCEPT}
            )
        )

    async def manifest_exists(self, ref: Reference, *, attempts: int | None = None) -> bool:
        """Whether the registry has this tag or digest (one HEAD; NotFound is False). `attempts` caps
        the retries, for callers that answer within a budget."""

        async def handle(resp: httpx.Response) -> bool:
            if resp.status_code == 404:
                return False
            self._expect(resp, (200,), f"manifest {ref}")
            return True

        kw = {} if attempts is None else {"attempts": attempts}
        return await self._operation(
            self._call(
                ref,
                "HEAD",
                "manifests",
                ref.object,
                "resolve",
                handle,
                headers={"Accept": manifests.ACCEPT},
                **kw,
            )
        )

    async def get_blob(self, ref: Reference, digest: str, max_size: int = MAX_CONFIG_SIZE) -> bytes:
        """A whole (small) blob, such as an image config, verified against its digest."""

        async def handle(resp: httpx.Response) -> bytes:
            self._expect(resp, (200,), f"blob {digest} of {ref.name}")
            body = await read_capped(resp, max_size, f"blob {digest} of {ref.name}")
            if _sha256(body) != digest:
                raise DigestMismatch(f"blob {digest} of {ref.name}: content has digest {_sha256(body)}")
            return body

        return await self._operation(self._blob_request(ref, digest, {}, handle))

    async def blob_size(self, ref: Reference, digest: str) -> int:
        async def handle(resp: httpx.Response) -> int:
            self._expect(resp, (200,), f"blob {digest} of {ref.name}")
            try:
                return int(resp.headers["content-length"])
            except (KeyError, ValueError) as e:
                raise ProtocolViolation(f"HEAD of blob {digest} of {ref.name}: no Content-Length") from e

        return await self._operation(self._blob_request(ref, digest, {}, handle, method="HEAD"))

    # --- range reads -----------------------------------------------------------------------------

    async def read_range(
        self, ref: Reference, digest: str, offset: int, length: int, tap: Tap | None = None
    ) -> bytes:
        """The bytes of one span; `tap`: see `BlobSource.read`."""
        return (await self.read_ranges(ref, digest, [(offset, length)], tap=tap))[0]

    async def read_suffix(self, ref: Reference, digest: str, n: int) -> tuple[bytes, int]:
        """(the last n bytes of a blob, all of it when smaller; the blob's size), in one request that
        needs no size (`Range: bytes=-n`): a layer's footer before its manifest has said its size."""
        what = f"blob {digest} of {ref.name}"

        async def handle(resp: httpx.Response) -> tuple[bytes, int]:
            if resp.status_code == 200:  # the Range ignored: the whole blob, if no larger than asked
                body = await read_capped(resp, n, f"{what} (sent whole to a suffix range)")
                return body, len(body)
            self._expect(resp, (206,), what)
            value = resp.headers.get("content-range")
            first, last, total = parse_content_range(value)
            if total is None or last != total - 1 or last - first + 1 != min(n, total):
                await abandon(resp)
                raise ProtocolViolation(
                    f"{what}: {origin(resp)} answered Content-Range {value!r} to bytes=-{n}"
                )
            body = await read_capped(resp, last - first + 1, what)
            if len(body) != last - first + 1:
                raise ProtocolViolation(f"{what}: body of {len(body)} bytes for Content-Range {value!r}")
            return body, total

        return await self._operation(self._blob_request(ref, digest, {"Range": f"bytes=-{n}"}, handle))

    async def read_ranges(
        self,
        ref: Reference,
        digest: str,
        spans: list[Span],
        early: Early | None = None,
        tap: Tap | None = None,
    ) -> list[bytes]:
        """The bytes of each (offset, length) span of a blob, in one request where the host allows.
        `early`: see `BlobSource.read_many`; `tap`: see `BlobSource.read` (both are called only for a
        single span answered with one range)."""
        return await self._operation(self._read_ranges(ref, digest, spans, early, tap))

    async def _read_ranges(
        self, ref: Reference, digest: str, spans: list[Span], early: Early | None, tap: Tap | None = None
    ) -> list[bytes]:
        if not spans:
            return []
        if len(spans) > 1 and ref.host not in self._single_range_only:
            try:
                return await self._blob_request(
                    ref,
                    digest,
                    {"Range": range_header(spans)},
                    lambda r: self._take_ranges(r, spans, ref, digest),
                )
            except _MultiRangeRefused:
                log.info("registry %s does not serve multi-range requests; using single ranges", ref.host)
                self._single_range_only.add(ref.host)

        async def one(span: Span, early: Early | None = None, tap: Tap | None = None) -> bytes:
            headers = {"Range": range_header([span])}
            return (
                await self._blob_request(
                    ref, digest, headers, lambda r: self._take_ranges(r, [span], ref, digest, early, tap)
                )
            )[0]

        if len(spans) == 1:
            return [await one(spans[0], early, tap)]
        results: list[bytes] = [b""] * len(spans)

        async def store(i: int, span: Span) -> None:
            results[i] = await one(span)

        try:
            async with trio.open_nursery() as nursery:
                for i, span in enumerate(spans):
                    nursery.start_soon(store, i, span)
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from None
        return results

    async def _take_ranges(
        self,
        resp: httpx.Response,
        spans: list[Span],
        ref: Reference,
        digest: str,
        early: Early | None = None,
        tap: Tap | None = None,
    ) -> list[bytes]:
        """The requested spans out of a response, reading no more than they add up to (plus multipart
        framing): what the server claims in its headers bounds nothing."""
        what = f"blob {digest} of {ref.name}"
        if resp.status_code == 416:
            raise RangeNotSatisfiable(f"{what}: range {range_header(spans)} is outside the blob")
        if len(spans) > 1 and resp.status_code in (200, 400, 501):
            raise _MultiRangeRefused()
        if resp.status_code == 200:  # the server ignores Range (a multi-range request went single above)
            [(offset, length)] = spans
            return [await read_window(resp, offset, length, what)]
        self._expect(resp, (206,), what)
        asked = requested_bytes(spans)
        boundary = boundary_of(resp.headers.get("content-type", ""))
        if boundary is not None:
            return slice_spans(
                spans, parse_multipart(await read_capped(resp, multipart_cap(spans), what), boundary)
            )
        value = resp.headers.get("content-range")
        first, last, _total = parse_content_range(value)
        claimed = last - first + 1
        if claimed > asked:
            if len(spans) > 1:  # the ranges merged into one part larger than asked: ask them one by one
                await abandon(resp)
                raise _MultiRangeRefused()
            raise await too_much(
                resp,
                what,
                f"answered Content-Range {value!r} ({claimed} bytes) to {range_header(spans)}",
                asked,
            )
        if missing := uncovered(spans, first, last):
            await abandon(resp)
            raise ProtocolViolation(
                f"{what}: the response did not contain requested bytes {missing} "
                f"({origin(resp)} answered Content-Range {value!r})"
            )
        single = len(spans) == 1
        body = await read_capped(resp, claimed, what, early if single else None, tap if single else None)
        if len(body) != claimed:
            raise ProtocolViolation(f"{what}: body of {len(body)} bytes for Content-Range {first}-{last}")
        return slice_spans(spans, [(first, body)])

    async def _blob_request(
        self,
        ref: Reference,
        digest: str,
        headers: dict[str, str],
        handle: Callable[[httpx.Response], Awaitable[T]],
        method: str = "GET",
    ) -> T:
        """GET/HEAD a blob, following (and caching) a redirect to blob storage."""
        key = (ref.host, ref.repository, digest)
        if url := self._redirects.get(key):
            try:
                return await self._storage_request(method, url, headers, handle)
            except _StaleRedirect:
                self._redirects.pop(key, None)

        async def follow(resp: httpx.Response) -> T:
            if resp.status_code not in REDIRECTS:
                if resp.status_code == 404:
                    raise NotFound(f"blob {digest} not found in {ref.name}")
                return await handle(resp)
            location = resp.headers.get("location")
            if not location:
                raise ProtocolViolation(f"blob {digest} of {ref.name}: redirect without Location")
            url = urljoin(str(resp.url), location)
            self._redirects[key] = url
            try:
                return await self._storage_request(method, url, headers, handle)
            except _StaleRedirect as e:
                self._redirects.pop(key, None)
                raise Unavailable(
                    f"blob {digest} of {ref.name}: storage URL failed right after redirect"
                ) from e

        return await self._call(ref, method, "blobs", digest, "pull", follow, headers=headers)

    async def _storage_request(self, method: str, url: str, headers: dict[str, str], handle) -> T:
        """A request to a storage URL a registry redirected to: no registry credentials go there."""
        client = self._client(None)
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                async with client.stream(method, url, headers=headers) as resp:
                    self.requests_sent += 1
                    if resp.status_code in (401, 403, 404, 410) or resp.status_code in REDIRECTS:
                        raise _StaleRedirect()
                    if resp.status_code in RETRY_STATUSES and attempt < self.options.max_attempts:
                        await trio.sleep(self._delay(attempt, resp))
                        continue
                    return await handle(resp)
            except httpx.ConnectError as e:
                raise _StaleRedirect() from e
            except httpx.TransportError:
                if attempt == self.options.max_attempts:
                    raise _StaleRedirect() from None
                await trio.sleep(self._delay(attempt, None))
        raise _StaleRedirect()

    # --- push ------------------------------------------------------------------------------------

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        async def handle(resp: httpx.Response) -> bool:
            if resp.status_code == 404:
                return False
            self._expect(resp, (200, 307, 302), f"blob {digest} of {ref.name}")
            return True

        return await self._operation(
            self._call(ref, "HEAD", "blobs", digest, "push", handle, actions="pull,push")
        )

    async def push_blob(self, ref: Reference, data: bytes, *, mount_from: str | None = None) -> str:
        """Upload a blob unless the repository has it (or can mount it from `mount_from`, a repository
        of the same registry); returns its digest."""
        digest = _sha256(data)
        if await self.blob_exists(ref, digest):
            return digest
        scopes = ("pull,push",) if not mount_from else ("pull,push", f"repository:{mount_from}:pull")
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                await self._operation(self._upload(ref, data, digest, mount_from, scopes))
                return digest
            except Unavailable:
                if attempt == self.options.max_attempts:
                    raise
                await trio.sleep(self._delay(attempt, None))
        raise AssertionError("unreachable")

    async def _upload(self, ref: Reference, data: bytes, digest: str, mount_from: str | None, scopes) -> None:
        what = f"upload of {digest} to {ref.name}"
        location = await self._upload_start(ref, digest, mount_from, scopes, what)
        if location is None:  # mounted from the other repository
            return
        chunk = self.options.upload_chunk
        body = data
        if chunk:
            for off in range(0, len(data), chunk):
                location = await self._upload_patch(ref, location, off, data[off : off + chunk], what)
            body = b""
        await self._upload_finish(ref, location, digest, body, what)

    async def _upload_start(
        self, ref: Reference, digest: str, mount_from: str | None, scopes, what: str
    ) -> str | None:
        """POST an upload (or a cross-repository mount): its location, or None when mounted."""
        query = f"?mount={digest}&from={mount_from}" if mount_from else ""

        async def start(resp: httpx.Response) -> tuple[int, str]:
            self._expect(resp, (201, 202), what)
            return resp.status_code, urljoin(str(resp.url), resp.headers.get("location", ""))

        status, location = await self._call(
            ref,
            "POST",
            "blobs",
            "uploads/" + query,
            "push",
            start,
            actions=scopes[0],
            extra_scopes=scopes[1:],
            attempts=1,
        )
        return None if status == 201 else location

    async def _upload_patch(self, ref: Reference, location: str, offset: int, part: bytes, what: str) -> str:
        """PATCH one piece of an upload; the location of the next step."""
        end = offset + len(part) - 1

        async def patched(resp: httpx.Response) -> str:
            self._expect(resp, (202,), f"{what} (bytes {offset}-{end})")
            return urljoin(str(resp.url), resp.headers.get("location", ""))

        return await self._call(
            ref,
            "PATCH",
            "",
            "",
            "push",
            patched,
            url=location,
            content=part,
            actions="pull,push",
            headers={"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{end}"},
            attempts=1,
        )

    async def _upload_finish(
        self, ref: Reference, location: str, digest: str, body: bytes, what: str
    ) -> None:
        """The closing PUT with the digest (and the last bytes, if any)."""

        async def done(resp: httpx.Response) -> None:
            self._expect(resp, (201,), what)
            got = resp.headers.get("docker-content-digest")
            if got and got != digest:
                raise DigestMismatch(f"{what}: registry stored it as {got}")

        sep = "&" if "?" in location else "?"  # append: re-encoding the upload state would break it
        await self._call(
            ref,
            "PUT",
            "",
            "",
            "push",
            done,
            url=f"{location}{sep}digest={digest}",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
            actions="pull,push",
            attempts=1,
        )

    async def download_blob(self, ref: Reference, digest: str, dest: Path, *, size: int | None = None) -> int:
        """Stream a whole blob into the file `dest` (created or truncated), verified against its digest;
        returns its size. Memory stays at one buffer whatever the blob's size. A body cut off mid-way is
        fetched again from the start (the usual bounded retries); the deadline grows with `size`."""
        what = f"blob {digest} of {ref.name}"

        async def handle(resp: httpx.Response) -> int:
            self._expect(resp, (200,), what)
            hasher = hashlib.sha256()
            received = 0
            buf = bytearray()
            async with await trio.open_file(dest, "wb") as f:
                async for chunk in resp.aiter_raw():
                    hasher.update(chunk)
                    received += len(chunk)
                    if size is not None and received > size:
                        raise ProtocolViolation(f"{what}: larger than the {size} bytes its descriptor says")
                    buf += chunk
                    if len(buf) >= FILE_BUFFER:
                        await f.write(bytes(buf))
                        buf.clear()
                await f.write(bytes(buf))
            expected = resp.headers.get("content-length")
            if expected is not None and expected.isdigit() and int(expected) != received:
                raise ProtocolViolation(f"{what}: body of {received} bytes, Content-Length said {expected}")
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise DigestMismatch(f"{what}: content has digest {actual}")
            return received

        return await self._operation(
            self._blob_request(ref, digest, {}, handle), self._transfer_deadline(size)
        )

    async def upload_blob_file(
        self, ref: Reference, path: Path, *, digest: str | None = None, mount_from: str | None = None
    ) -> str:
        """Upload the blob in file `path` unless the repository has it or can mount it from `mount_from`
        (a repository of the same registry); returns its digest. A file larger than the upload chunk
        (`Options.upload_chunk`, else 16 MiB) goes up as PATCHes of that size read one at a time, so
        memory stays bounded; a failed upload starts over (bounded attempts)."""
        size = (await trio.Path(path).stat()).st_size
        if digest is None:
            digest = await trio.to_thread.run_sync(_file_sha256, path)
        if await self.blob_exists(ref, digest):
            return digest
        scopes = ("pull,push",) if not mount_from else ("pull,push", f"repository:{mount_from}:pull")
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                await self._upload_file(ref, path, size, digest, mount_from, scopes)
                return digest
            except Unavailable:
                if attempt == self.options.max_attempts:
                    raise
                await trio.sleep(self._delay(attempt, None))
        raise AssertionError("unreachable")

    async def _upload_file(
        self, ref: Reference, path: Path, size: int, digest: str, mount_from: str | None, scopes
    ) -> None:
        what = f"upload of {digest} to {ref.name}"
        location = await self._operation(self._upload_start(ref, digest, mount_from, scopes, what))
        if location is None:  # mounted from the other repository
            return
        chunk = self.options.upload_chunk or FILE_UPLOAD_CHUNK
        body = b""
        async with await trio.open_file(path, "rb") as f:
            if size <= chunk:
                body = await f.read()
            else:
                offset = 0
                while part := await f.read(chunk):
                    location = await self._operation(
                        self._upload_patch(ref, location, offset, part, what),
                        self._transfer_deadline(len(part)),
                    )
                    offset += len(part)
        await self._operation(
            self._upload_finish(ref, location, digest, body, what), self._transfer_deadline(len(body))
        )

    def _transfer_deadline(self, size: int | None) -> float:
        """The deadline of one operation moving `size` bytes: the usual one plus time at a slow rate."""
        return self.options.deadline + (size or 0) / MIN_TRANSFER_RATE

    async def push_manifest(self, ref: Reference, body: bytes, media_type: str) -> str:
        """PUT a manifest or index under ref's tag (or digest); returns its digest."""
        digest = _sha256(body)
        if ref.digest and ref.digest != digest:
            raise DigestMismatch(f"manifest for {ref}: content has digest {digest}")

        async def handle(resp: httpx.Response) -> str:
            self._expect(resp, (201, 200), f"manifest push to {ref}")
            got = resp.headers.get("docker-content-digest")
            if got and got != digest:
                raise DigestMismatch(f"manifest push to {ref}: registry stored it as {got}, sent {digest}")
            return digest

        return await self._operation(
            self._call(
                ref,
                "PUT",
                "manifests",
                ref.tag or digest,
                "push",
                handle,
                content=body,
                headers={"Content-Type": media_type},
                actions="pull,push",
            )
        )

    # --- the request core -----------------------------------------------------------------------

    async def _operation(self, coro: Awaitable[T], deadline: float | None = None) -> T:
        deadline = deadline or self.options.deadline
        try:
            with trio.fail_after(deadline):
                return await coro
        except trio.TooSlowError:
            raise Unavailable(f"registry operation did not finish within {deadline:.0f}s") from None

    async def _call(
        self,
        ref: Reference,
        method: str,
        kind: str,
        obj: str,
        capability: str,
        handle: Callable[[httpx.Response], Awaitable[T]],
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        url: str | None = None,
        actions: str = "pull",
        extra_scopes: tuple[str, ...] = (),
        attempts: int | None = None,
    ) -> T:
        endpoints = [e for e in self.hosts.endpoints(ref.host) if e.can(capability)]
        if url is not None:  # an upload URL: only the origin the upload started on
            endpoints = [e for e in self.hosts.endpoints(ref.host) if not e.mirror]
        if not endpoints:
            raise ConfigError(f"no endpoint for {ref.host} has the {capability!r} capability (hosts.toml)")
        scopes = (scope_for(ref.repository, actions), *extra_scopes)
        failures: list[str] = []
        for endpoint in endpoints:
            target = url or endpoint.url(ref.repository, kind, obj)
            if endpoint.mirror:
                target += ("&" if "?" in target else "?") + f"ns={ref.host}"
            try:
                return await self._attempts(
                    endpoint,
                    method,
                    target,
                    scopes,
                    handle,
                    headers or {},
                    content,
                    attempts or self.options.max_attempts,
                )
            except (Unavailable, NotFound, Unauthorized) as e:
                if not endpoint.mirror:
                    if failures and isinstance(e, Unavailable):
                        raise Unavailable(f"{e}; mirrors also failed: {'; '.join(failures)}") from e
                    raise
                failures.append(f"{endpoint.base_url}: {e}")
                log.info("mirror %s failed for %s, trying the next endpoint: %s", endpoint.base_url, ref, e)
        raise Unavailable(f"every endpoint failed for {ref}: {'; '.join(failures)}")

    async def _attempts(
        self,
        endpoint: Endpoint,
        method: str,
        url: str,
        scopes: tuple[str, ...],
        handle,
        headers: dict[str, str],
        content: bytes | None,
        attempts: int,
    ) -> T:
        client = self._client(endpoint)
        reauthenticated = False
        last = ""
        attempt = 0
        while attempt < attempts:
            attempt += 1
            request_headers = {
                **dict(endpoint.headers),
                **await self.auth.header(endpoint, scopes),
                **headers,
            }
            try:
                async with client.stream(method, url, headers=request_headers, content=content) as resp:
                    self.requests_sent += 1
                    if resp.status_code == 401 and not reauthenticated:
                        reauthenticated = True
                        attempt -= 1  # a challenge is not a failure
                        await self.auth.challenged(endpoint, resp, scopes, client)
                        continue
                    if resp.status_code in (401, 403):
                        self.auth.forget(endpoint, scopes)
                        raise Unauthorized(
                            f"{endpoint.registry} refused {method} {_path(url)} "
                            f"(HTTP {resp.status_code}): check the credentials and their access"
                        )
                    if resp.status_code in RETRY_STATUSES:
                        last = f"HTTP {resp.status_code}"
                        if attempt < attempts:
                            await trio.sleep(self._delay(attempt, resp))
                        continue
                    return await handle(resp)
            except httpx.TransportError as e:
                last = _describe(e)
                if _root(e, ssl.SSLCertVerificationError):  # retrying cannot help
                    raise Unavailable(
                        f"TLS certificate of {endpoint.host} not trusted ({last}): add its CA to "
                        f"hosts.toml `ca`, or fix the server's certificate"
                    ) from e
                if attempt < attempts:
                    await trio.sleep(self._delay(attempt, None))
        raise Unavailable(
            f"{method} {endpoint.scheme}://{endpoint.host}{_path(url)} failed {attempts} times; last: {last}"
        )

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        """Retry-After when the server gave one (capped), else exponential backoff with full jitter."""
        if resp is not None and (after := _retry_after(resp.headers.get("retry-after"))) is not None:
            return min(after, MAX_RETRY_AFTER)  # the operation's deadline bounds it further
        return random.uniform(
            0, min(self.options.backoff_max, self.options.backoff_base * 2 ** (attempt - 1))
        )

    def _expect(self, resp: httpx.Response, ok: tuple[int, ...], what: str) -> None:
        if resp.status_code in ok:
            return
        if resp.status_code == 404:
            raise NotFound(f"{what}: not found (HTTP 404)")
        if resp.status_code == 416:
            raise RangeNotSatisfiable(f"{what}: range not satisfiable (HTTP 416)")
        raise ProtocolViolation(f"{what}: unexpected HTTP {resp.status_code}")

    def _client(self, endpoint: Endpoint | None) -> httpx.AsyncClient:
        """One pooled client per TLS configuration (endpoint None: blob storage, system CAs)."""
        key = (endpoint.ca, endpoint.client, endpoint.skip_verify) if endpoint else ("storage",)
        if key not in self._clients:
            o = self.options
            self._clients[key] = httpx.AsyncClient(
                http2=o.http2,
                verify=_ssl_context(endpoint) if endpoint else True,
                timeout=httpx.Timeout(o.request_timeout),
                limits=httpx.Limits(
                    max_connections=o.max_connections, max_keepalive_connections=o.max_connections
                ),
                follow_redirects=False,
                # identity: Content-Length and digests then describe exactly the bytes we read
                headers={"User-Agent": o.user_agent, "Accept-Encoding": "identity"},
                trust_env=False,
            )
        return self._clients[key]


class _MultiRangeRefused(RegistryError):
    pass


def _describe(e: BaseException) -> str:
    """An error and its causes, for messages: transport errors often carry their text only in a cause."""
    parts = []
    while e is not None and len(parts) < 4:
        parts.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)


def _root(e: BaseException | None, kind: type[BaseException]) -> bool:
    while e is not None:
        if isinstance(e, kind):
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first real error of a nursery's exception group: callers expect one RegistryError."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


@functools.cache
def _no_tls() -> ssl.SSLContext:
    """For plain-HTTP endpoints, whose client never speaks TLS: trusts no CA, so any TLS it were ever
    asked for fails closed; and it costs nothing to make (loading the CA bundle that `verify=True`
    makes httpx load costs 20-100 ms, paid by the first pull)."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _ssl_context(endpoint: Endpoint) -> ssl.SSLContext | bool:
    if endpoint.scheme != "https":
        return _no_tls()
    ctx = ssl.create_default_context()
    try:
        for ca in endpoint.ca:
            ctx.load_verify_locations(cafile=str(ca))
        for cert, key in endpoint.client:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS files for {endpoint.base_url} cannot be loaded: {e}") from e
    if endpoint.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _path(url: str) -> str:
    """The path of a URL without its query (upload URLs carry state tokens)."""
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0] if "://" in url else url
