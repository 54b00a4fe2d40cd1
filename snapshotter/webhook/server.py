"""`lazysnap webhook`: the mutating admission webhook's HTTPS service - TLS with certificate reloading,
the registry lookups (TTL cache, one budget per review), the routes and the command line.

Routes (HTTPS only; hypercorn on trio behind convertd's bounded HTTP listener, `convertd.server`):

    POST /mutate    an admission.k8s.io/v1 AdmissionReview -> the review with its response (see
                    `webhook.review`); 400 for a body that is not one, 413 over `max_body`
    GET  /healthz   200 "ok"
    GET  /metrics   Prometheus text format: reviews, images swapped, left alone by reason, registry
                    lookups by outcome and their latency

A lookup is a HEAD of the accelerated manifest through lazysnap's registry client (credentials from
`docker_config`, endpoints from `hosts_dir`). Answers are cached (`cache_ttl` for "exists",
`negative_ttl` for "does not exist"); a registry that does not answer within the review's `budget`
leaves the images alone, with a warning, and is not cached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import ssl
import sys
import time
from pathlib import Path

import httpx
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fuse.registry import CredentialStore, HostsConfig, Options, Reference, RegistryClient, RegistryError
from fuse.registry.errors import NotFound
from snapshotter import logs
from snapshotter.convertd.config import parse_listen
from snapshotter.convertd.server import HttpServer, Limits, Request, Response, error_response
from snapshotter.errors import ConfigError
from snapshotter.webhook import review
from snapshotter.webhook.config import Config, load_config

log = logging.getLogger("lazysnap.webhook")
MAX_CACHE_ENTRIES = 10_000  # distinct images remembered; the oldest answers go first


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reviews = Counter(
            "lazysnap_webhook_reviews", "Admission reviews answered", ["result"], registry=r
        )
        self.swapped = Counter(
            "lazysnap_webhook_images_swapped", "Images replaced by accelerated ones", registry=r
        )
        self.left = Counter(
            "lazysnap_webhook_images_left", "Images left alone, by reason", ["reason"], registry=r
        )
        self.lookups = Counter(
            "lazysnap_webhook_registry_lookups", "Registry lookups, by outcome", ["outcome"], registry=r
        )
        self.latency = Histogram(
            "lazysnap_webhook_registry_lookup_seconds", "Latency of registry lookups", registry=r
        )


class Lookups:
    """Whether accelerated manifests exist, asked of the registry with HEAD and cached."""

    def __init__(self, config: Config, metrics: Metrics):
        self.config, self.metrics = config, metrics
        credentials = CredentialStore(config.docker_config) if config.docker_config else CredentialStore()
        options = Options(request_timeout=config.budget, deadline=config.budget, max_attempts=1)
        self.client = RegistryClient(
            hosts=HostsConfig(config.hosts_dir), credentials=credentials, options=options
        )
        self._cache: dict[str, tuple[bool, float]] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    async def all(self, images: list[str]) -> dict[str, bool | None]:
        """image -> True / False, or None for those the registry did not answer within the budget."""
        found: dict[str, bool | None] = dict.fromkeys(images)

        async def one(image: str) -> None:
            found[image] = await self.exists(image)

        with trio.move_on_after(self.config.budget) as scope:
            async with trio.open_nursery() as nursery:
                for image in images:
                    nursery.start_soon(one, image)
        if scope.cancelled_caught:
            late = [i for i, v in found.items() if v is None]
            self.metrics.lookups.labels("timeout").inc(len(late))
            log.warning(
                "registry lookups over the budget",
                extra={"fields": {"budget": self.config.budget, "images": late}},
            )
        return found

    async def exists(self, image: str) -> bool | None:
        now = time.monotonic()
        cached = self._cache.get(image)
        if cached and cached[1] > now:
            self.metrics.lookups.labels("cached").inc()
            return cached[0]
        ref = Reference.parse(image)
        started = time.monotonic()
        try:
            result = await self._head(ref)
        except NotFound:
            result = False
        except (RegistryError, httpx.HTTPError, OSError) as e:
            self.metrics.lookups.labels("error").inc()
            log.warning("registry lookup failed", extra={"fields": {"image": image, "error": str(e)}})
            return None
        self.metrics.latency.observe(time.monotonic() - started)
        self.metrics.lookups.labels("found" if result else "missing").inc()
        ttl = self.config.cache_ttl if result else self.config.negative_ttl
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        self._cache.pop(image, None)
        self._cache[image] = (result, time.monotonic() + ttl)
        return result

    async def _head(self, ref: Reference) -> bool:
        return await self.client.manifest_exists(ref, attempts=1)


class Webhook:
    """The routes."""

    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.lookups = Lookups(config, self.metrics)

    async def handle(self, request: Request) -> Response:
        if request.path == "/healthz" and request.method in ("GET", "HEAD"):
            return Response(200, b"ok\n", "text/plain")
        if request.path == "/metrics" and request.method in ("GET", "HEAD"):
            return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        if request.path == "/mutate":
            if request.method != "POST":
                return error_response(405, "POST an AdmissionReview to /mutate", [("Allow", "POST")])
            return await self.mutate(request.body)
        return error_response(404, f"no route {request.path!r} (POST /mutate, GET /healthz, GET /metrics)")

    async def mutate(self, body: bytes) -> Response:
        try:
            doc = review.parse(body)
        except review.BadReview as e:
            self.metrics.reviews.labels("bad-request").inc()
            return error_response(400, f"not an admission review: {e}")
        settings = self.config.settings
        found = await self.lookups.all(review.wanted(doc, settings))
        outcome = review.respond(doc, found, settings)
        self.metrics.reviews.labels("mutated" if outcome.swapped else "unchanged").inc()
        self.metrics.swapped.inc(outcome.swapped)
        for reason, count in outcome.left.items():
            self.metrics.left.labels(reason).inc(count)
        request = doc["request"]
        log.info(
            "review",
            extra={
                "fields": {
                    "uid": request["uid"],
                    "namespace": request.get("namespace"),
                    "swapped": outcome.swapped,
                    "left": sum(outcome.left.values()),
                }
            },
        )
        return Response(200, json.dumps(outcome.review).encode(), "application/json")


# --- TLS -------------------------------------------------------------------------------------------


class CertificateFiles:
    """The server's TLS context, made again from `cert_file` and `key_file` whenever they change; a pair
    that does not load keeps the previous context (and is logged) until it does."""

    def __init__(self, cert: Path, key: Path):
        self.cert, self.key = cert, key
        try:
            self._stamp = self._stat()
        except OSError as e:
            raise ConfigError(f"cannot read the TLS certificate or key: {e}") from None
        self.context = self._load()

    def _stat(self) -> tuple:
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, (self.cert, self.key)))

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"cannot load the TLS certificate {self.cert} with key {self.key}: {e}: check that the "
                "files are PEM and that the key belongs to the certificate"
            ) from None
        return context

    def reload_if_changed(self) -> bool:
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            context = self._load()
        except (OSError, ConfigError) as e:
            log.warning(
                "TLS certificate not reloaded, the previous one is kept", extra={"fields": {"error": str(e)}}
            )
            return False
        self._stamp, self.context = stamp, context
        log.info("TLS certificate reloaded", extra={"fields": {"cert": str(self.cert)}})
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            self.reload_if_changed()


class _TlsStream:
    """A handshaken TLS stream in the shape HttpServer hands to hypercorn: `socket` for the peer address,
    no `do_handshake` (the handshake is done), and send_eof that leaves closing to aclose."""

    def __init__(self, stream: trio.SSLStream, socket: trio.socket.SocketType):
        self._stream, self.socket = stream, socket

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._stream.aclose()


class TlsHttpServer(HttpServer):
    """HttpServer over TLS: each connection's handshake (within `head_timeout`) uses the current context."""

    def __init__(self, handler, limits: Limits, certificates: CertificateFiles):
        super().__init__(handler, limits)
        self.certificates = certificates

    async def handle_connection(self, stream: trio.SocketStream) -> None:  # type: ignore[override]
        tls = trio.SSLStream(stream, self.certificates.context, server_side=True, https_compatible=True)
        with trio.move_on_after(self.limits.head_timeout):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as e:
                log.debug("TLS handshake failed", extra={"fields": {"error": str(e.__cause__ or e)}})
            else:
                await super().handle_connection(_TlsStream(tls, stream.socket))  # type: ignore[arg-type]
                return
        await trio.aclose_forcefully(stream)


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> int:
    """Serve until SIGTERM or SIGINT (or cancellation); task_status gets the bound (host, port)s."""
    import signal

    if config.cert_file is None or config.key_file is None:
        raise ConfigError("cert_file and key_file are required: the webhook serves HTTPS only")
    certificates = CertificateFiles(config.cert_file, config.key_file)
    app = Webhook(config)
    server = TlsHttpServer(app.handle, Limits(max_body=config.max_body), certificates)
    host, port = parse_listen(config.listen)
    try:
        listeners = await server.listen(host, port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {config.listen}: {e.strerror or e}") from None
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve, listeners)
                nursery.start_soon(certificates.watch, config.reload_interval)
                log.info(
                    "webhook listening",
                    extra={
                        "fields": {
                            "addresses": [f"{a[0]}:{a[1]}" for a in bound],
                            "node_selector": f"{config.node_key}={config.node_value}",
                            "pod_label": f"{config.mode_key}={config.mode_value}",
                            "budget": config.budget,
                        }
                    },
                )
                task_status.started(bound)
                async for signum in signals:
                    log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
                    nursery.cancel_scope.cancel()
                    break
    finally:
        await app.lookups.aclose()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `lazysnap webhook`."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration (see the docs)")
    parser.add_argument("--cert-file", type=Path, metavar="FILE", help="override cert_file (PEM)")
    parser.add_argument("--key-file", type=Path, metavar="FILE", help="override key_file (PEM)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="override listen")
    parser.add_argument("--log-level", choices=list(logs.LEVELS), help="override log_level (default info)")


def run(args: argparse.Namespace) -> int:
    """`lazysnap webhook`: 0 after SIGTERM/SIGINT, 2 for a bad configuration or certificate."""
    try:
        config = load_config(args.config) if args.config else Config()
        if args.cert_file or args.key_file:
            config = dataclasses.replace(
                config,
                cert_file=args.cert_file or config.cert_file,
                key_file=args.key_file or config.key_file,
            )
        if config.cert_file is None or config.key_file is None:
            raise ConfigError(
                "cert_file and key_file are required (in --config, or --cert-file and --key-file)"
            )
        if args.listen:
            parse_listen(args.listen)
            config = dataclasses.replace(config, listen=args.listen)
        if args.log_level:
            config = dataclasses.replace(config, log_level=args.log_level)
    except (ConfigError, ValueError) as e:
        print(f"lazysnap webhook: {e}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return trio.run(serve, config)
    except ConfigError as e:
        print(f"lazysnap webhook: {e}", file=sys.stderr)
        return 2
