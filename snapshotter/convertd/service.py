"""`lazysnap convertd`: convert every image pushed to enabled repositories, driven by the registry's
notifications.

A registry (CNCF distribution and compatible ones) POSTs notification envelopes
(``application/vnd.docker.distribution.events.v1+json``, ``{"events": [...]}``) to ``/events``. For each
``push`` of a *tagged* image manifest or index in a repository that a ``[[repositories]]`` rule enables,
convertd commits a job to its persistent queue (``convertd.jobs``, SQLite WAL in the state dir) and
only then answers 200; workers convert in the background with ``convert.converter.convert_image`` and
push ``<tag><suffix>`` (``_accelerated``) to the same repository, and the same image under
``sha256-<H><suffix>``, H the source manifest's digest (what `lazysnap webhook` maps ``repo@sha256:H``
to). The original is never touched.

No loops: tags ending in the suffix are never converted, nor manifests whose layers all carry TOC
annotations already; manifests pushed by digest (the converter's per-platform manifests) have no tag.
Repeated events for the same digest convert once; the same digest pushed under another tag is only
re-tagged. Failed attempts are retried with exponential backoff, then stay visible as failed, with the
reason, in ``/jobs``. Anything that cannot be converted (artifacts, blobs, deleted manifests, other
actions) is answered 200 so the registry does not re-send it forever.

HTTP (hypercorn on trio behind a per-peer connection gate; bounded head and body sizes, timeouts: see
``convertd.server``). It listens on loopback unless ``listen`` says otherwise:

    POST /events    the registry's notifications; 401 without the shared secret (when configured)
    GET  /jobs      JSON: recent jobs with state, reason, attempts (?state=failed&limit=N); it names
                    images and repositories, so it takes the same secret as /events (when configured)
    GET  /healthz   200 "ok" when the queue database answers (no secret)
    GET  /metrics   Prometheus text format: counts only, no image names (no secret)

Configuration (TOML, ``--config FILE``); every key is optional::

    listen = "127.0.0.1:8089"
    state_dir = "/var/lib/lazysnap/convertd"   # jobs.db, tmp/ (layers while converting); 0700
    registry = "registry.example.com:5000"    # where to convert (default: the host in each event's URL)
    suffix = "_accelerated"
    concurrency = 1                            # conversions at once (each uses every core)
    hosts_dir = "/etc/containerd/certs.d"      # containerd hosts.toml layout
    docker_config = "/root/.docker/config.json"
    secret_file = "/etc/lazysnap/convertd.secret"   # or secret = "..."; the registry sends it
    secret_header = "Authorization"            # "Authorization: Bearer <secret>", else the raw value
    log_level = "info"
    max_body = "1MiB"
    job_timeout = "1h"
    [retry]
    attempts = 5                               # in all, the first included
    backoff = "10s"                            # before the 2nd attempt; doubles each time
    max_backoff = "10m"
    [[repositories]]
    name = "team/*"                            # * within one path component, ** across, ? one char
    format = "estargz"                         # estargz | estargz-zstd | zstd-chunked
    chunk_size = "1MiB"
    level = 6
    all_platforms = false                      # else the host's platform (or `platform`) of an index
    platform = "linux/amd64"
    workload = "nginx -t"                      # optimize: prioritize what `/bin/sh -c` of it opens
    mode = "convert"                           # convert | index (a SOCI index beside the image, no
                                               # copy: `lazysnap index`) | both

Relative paths are relative to the config file. An invalid file stops the start with the line and reason.

Test hooks (``LAZYSNAP_FAILPOINTS``, see ``snapshotter.failpoints``): ``convertd.job-start`` before a job
touches the registry (run in a thread: ``sleep`` does not block the server), ``convertd.layer-done``
after each layer the converter finishes (``kill`` or ``error`` only).

This module is the service (routes, workers, start and stop) and the command line; the rest of the
package: ``config`` (the configuration file; sizes and durations as ``snapshotter.settings`` reads them),
``events`` (classifying notification events), ``server`` (the HTTP server), ``jobs`` (the queue) and
``metrics`` (the Prometheus metrics). Whether an image is accelerated already is
``snapshotter.convert.image``'s one rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import hmac
import json
import logging
import os
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from fuse.formats.spec import ESTARGZ
from fuse.registry import (
    CredentialStore,
    HostsConfig,
    ManifestError,
    NotFound,
    Reference,
    RegistryClient,
    RegistryError,
)
from fuse.registry import manifests as mf
from snapshotter import failpoints, logs
from snapshotter.convert.converter import ConvertError, convert_image
from snapshotter.convert.image import (
    ATTESTATION,
    FOREIGN,
    IMAGE_CONFIGS,
    MAX_TAG,
    all_accelerated,
    digest_tag,
)
from snapshotter.convert.index import index_image
from snapshotter.convert.optimize import optimize_image
from snapshotter.convert.tar import TarFormatError
from snapshotter.convert.writer import DEFAULT_CHUNK_SIZE, WriterError
from snapshotter.convertd.config import (
    DEFAULT_LISTEN,
    DEFAULT_STATE_DIR,
    Config,
    ConfigError,
    load_config,
    parse_listen,
)
from snapshotter.convertd.events import EVENTS_MEDIA_TYPE, Ignored, classify, event_fields
from snapshotter.convertd.jobs import STATES, Job, JobStore, Push, QueueError, Tag
from snapshotter.convertd.metrics import Metrics
from snapshotter.convertd.server import HttpServer, Limits, Request, Response, error_response, json_response
from snapshotter.errors import StartupError

log = logging.getLogger("lazysnap.convertd")
T = TypeVar("T")


# --- the service ------------------------------------------------------------------------------------------


class Skip(Exception):
    """Nothing to convert; the message says why (the job ends as skipped)."""


_PERMANENT = (ManifestError, TarFormatError, WriterError)
_ROUTES = {
    "/events": ("POST",),
    "/healthz": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
    "/jobs": ("GET", "HEAD"),
}


class Convertd:
    """The HTTP handler and the conversion workers around one JobStore."""

    def __init__(self, config: Config, store: JobStore, metrics: Metrics | None = None):
        self.config = config
        self.store = store
        self.metrics = metrics or Metrics()
        self.busy: set[tuple[str, str, str]] = set()
        self._db_limiter = trio.CapacityLimiter(1)
        self._wake = trio.Event()
        self._tmp = config.state_dir / "tmp"

    async def db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a JobStore method in a worker thread (one at a time: the connection is shared)."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw), limiter=self._db_limiter)

    def notify(self) -> None:
        self._wake.set()

    # --- HTTP ---------------------------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        methods = _ROUTES.get(req.path)
        if methods is None:
            resp = error_response(
                404, f"no such path {req.path[:100]!r} (try /events, /jobs, /metrics, /healthz)"
            )
        elif req.method not in methods:
            resp = error_response(
                405,
                f"{req.path} takes {' or '.join(methods)}, not {req.method[:20]}",
                [("Allow", ", ".join(methods))],
            )
        elif req.path == "/events":
            resp = await self.events(req)
        elif req.path == "/jobs":
            resp = await self.jobs(req)
        elif req.path == "/metrics":
            counts = await self.db(self.store.counts)
            resp = Response(200, self.metrics.render(counts), CONTENT_TYPE_LATEST)
        else:
            try:
                await self.db(self.store.ping)
                resp = Response(200, b"ok\n", "text/plain; charset=utf-8")
            except sqlite3.Error as e:
                resp = Response(
                    503, f"the job database does not answer: {e}\n".encode(), "text/plain; charset=utf-8"
                )
        self.metrics.requests.labels(req.path if methods else "other", str(resp.status)).inc()
        return resp

    def authorized(self, req: Request) -> bool:
        secret = self.config.secret
        if secret is None:
            return True
        value = req.headers.get(self.config.secret_header.lower(), "")
        if self.config.secret_header.lower() == "authorization":
            scheme, _, token = value.partition(" ")
            value = token.strip() if scheme.lower() == "bearer" else ""
        # constant-time; the header's raw bytes (decoded as latin-1 on the way in) against UTF-8
        return hmac.compare_digest(value.encode("latin-1", "replace"), secret.encode())

    def refused(self, req: Request) -> Response:
        """401 for a request without the shared secret."""
        log.warning(
            "request refused: wrong or missing secret",
            extra={"fields": {"path": req.path, "header": self.config.secret_header}},
        )
        challenge = [("WWW-Authenticate", 'Bearer realm="lazysnap-convertd"')]
        return error_response(401, "wrong or missing secret", challenge)

    async def events(self, req: Request) -> Response:
        if not self.authorized(req):
            return self.refused(req)
        content_type = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and "json" not in content_type and content_type != "text/plain":
            return error_response(
                415, f"expected {EVENTS_MEDIA_TYPE} (or application/json), not {content_type[:80]}"
            )
        try:
            envelope = json.loads(req.body)
        except RecursionError:
            log.warning("malformed envelope: nested too deeply")
            return error_response(400, "the body is not a notification envelope: JSON nested too deeply")
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("malformed envelope", extra={"fields": {"error": str(e)[:200]}})
            return error_response(400, f"the body is not JSON: {e}")
        if not isinstance(envelope, dict) or not isinstance(envelope.get("events"), list):
            log.warning("malformed envelope: no events list")
            return error_response(400, 'expected a notification envelope: {"events": [...]}')
        pushes: list[Push] = []
        ignored = malformed = 0
        for event in envelope["events"]:
            verdict = classify(event, self.config, time.time_ns())
            if isinstance(verdict, Ignored):
                fields = event_fields(event) | {"reason": verdict.reason}
                log.log(verdict.level, "event ignored", extra={"fields": fields})
                malformed += verdict.malformed
                ignored += not verdict.malformed
            else:
                pushes.append(verdict)
        outcomes: list[str] = []
        if pushes:
            try:
                outcomes = await self.db(self.store.enqueue, pushes, time.time())
            except (sqlite3.Error, OSError) as e:
                log.error("cannot commit events to the queue", extra={"fields": {"error": str(e)}})
                return error_response(503, "the job queue is unavailable; send the events again")
            self.notify()
        for push, outcome in zip(pushes, outcomes, strict=True):
            fields = {
                "ref": f"{push.registry}/{push.repository}:{push.tag}",
                "digest": push.digest,
                "event": push.event_id,
            }
            log.info(
                "push queued" if outcome == "accepted" else "push already known", extra={"fields": fields}
            )
        accepted = outcomes.count("accepted")
        duplicates = len(outcomes) - accepted
        for result, n in (
            ("accepted", accepted),
            ("duplicate", duplicates),
            ("ignored", ignored),
            ("malformed", malformed),
        ):
            if n:
                self.metrics.events.labels(result).inc(n)
        return json_response(
            200, {"accepted": accepted, "duplicates": duplicates, "ignored": ignored, "malformed": malformed}
        )

    async def jobs(self, req: Request) -> Response:
        if not self.authorized(req):
            return self.refused(req)
        state = (req.query.get("state") or [None])[0]
        if state is not None and state not in STATES:
            return error_response(400, f"state must be one of {', '.join(STATES)}")
        try:
            limit = int((req.query.get("limit") or ["100"])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            return error_response(400, "limit must be an integer between 1 and 1000")
        jobs = await self.db(self.store.list, state=state, limit=limit)
        counts = await self.db(self.store.counts)
        return json_response(200, {"counts": counts, "jobs": [j.as_json() for j in jobs]})

    # --- workers ------------------------------------------------------------------------------------

    async def run_workers(self) -> None:
        """Claim due jobs and run up to `concurrency` at once, forever."""
        slots = trio.Semaphore(self.config.concurrency)
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()
                job = await self._next_job()
                keys = {(job.registry, job.repository, t.tag) for t in job.pending_tags}
                self.busy |= keys
                nursery.start_soon(self._run, job, keys, slots)

    async def _next_job(self) -> Job:
        while True:
            self._wake = trio.Event()  # before claiming: a notify() from now on wakes the wait below
            try:
                job = await self.db(self.store.claim, time.time(), frozenset(self.busy))
                due = None if job else await self.db(self.store.next_due)
            except sqlite3.Error as e:
                log.error("cannot read the job queue", extra={"fields": {"error": str(e)}})
                job, due = None, time.time() + 5
            if job is not None:
                return job
            now = time.time()
            wait = due - now if due is not None and due > now else 60.0
            with trio.move_on_after(min(wait, 60.0)):
                await self._wake.wait()

    async def _run(self, job: Job, keys: set[tuple[str, str, str]], slots: trio.Semaphore) -> None:
        try:
            await self.attempt(job)
        except sqlite3.Error as e:  # the job stays running in the database; recovered at the next start
            log.error("cannot record a job's outcome", extra={"fields": {"job": job.id, "error": str(e)}})
        finally:
            self.busy -= keys
            slots.release()
            self.notify()

    async def attempt(self, job: Job) -> None:
        """One attempt at a claimed job; records the outcome in the queue."""
        fields = {
            "job": job.id,
            "image": f"{job.registry}/{job.repository}@{job.digest}",
            "attempt": job.attempts,
        }
        log.info("job started", extra={"fields": fields | {"tags": [t.tag for t in job.pending_tags]}})
        try:
            with trio.fail_after(self.config.job_timeout):
                outcome = await self._work(job)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self.db(self.store.release, job.id, time.time())
            raise
        except Skip as e:
            await self.db(self.store.skip, job.id, str(e), time.time())
            self.metrics.conversions.labels("skipped").inc()
            log.info("job skipped", extra={"fields": fields | {"reason": str(e)}})
            return
        except trio.TooSlowError:
            await self._failed(job, f"timed out after {self.config.job_timeout:.0f}s", False, fields)
            return
        except Exception as e:
            await self._failed(job, _describe(e), _permanent(e), fields)
            return
        state = await self.db(self.store.finish, job.id, time.time())
        self.metrics.conversions.labels(outcome).inc()
        log.info("job done", extra={"fields": fields | {"outcome": outcome, "state": state}})

    async def _failed(self, job: Job, reason: str, permanent: bool, fields: dict) -> None:
        state = await self.db(
            self.store.fail, job.id, reason, time.time(), self.config.retry, permanent=permanent
        )
        self.metrics.attempt_errors.inc()
        if state == "failed":
            self.metrics.conversions.labels("failed").inc()
            log.error("job failed", extra={"fields": fields | {"reason": reason, "permanent": permanent}})
        else:
            log.warning("attempt failed, will retry", extra={"fields": fields | {"reason": reason}})

    def _client(self) -> RegistryClient:
        """A fresh client per job: credentials and hosts.toml changes apply without a restart."""
        credentials = (
            CredentialStore(self.config.docker_config) if self.config.docker_config else CredentialStore()
        )
        return RegistryClient(hosts=HostsConfig(self.config.hosts_dir), credentials=credentials)

    async def _work(self, job: Job) -> str:
        """Convert (or only re-tag) one job; returns the outcome for the metrics."""
        await trio.to_thread.run_sync(failpoints.hit, "convertd.job-start", abandon_on_cancel=True)
        suffix = self.config.suffix
        pending = job.pending_tags
        mode = job.options.get("mode", "convert")
        async with self._client() as client:
            if mode in ("index", "both"):
                await self._index(client, job)
            if mode == "index":
                for tag in pending:
                    await self.db(self.store.tag_done, job.id, tag)
                return "indexed"
            result: tuple[bytes, str] | None = None
            if job.result_digest:
                try:
                    body, _, _ = await client.get_manifest(
                        Reference(job.registry, job.repository, digest=job.result_digest)
                    )
                    result = (body, job.result_media_type or mf.OCI_MANIFEST)
                except NotFound:
                    log.warning(
                        "the accelerated image was deleted: converting again",
                        extra={"fields": {"job": job.id}},
                    )
                    await self.db(self.store.clear_result, job.id)
            outcome = "retagged"
            if result is None:
                first = pending[-1]  # the newest push
                digest, media_type = await self._convert(client, job, first)
                await self.db(self.store.tag_done, job.id, first)
                pending = pending[:-1]
                outcome = "converted"
                ref = Reference(job.registry, job.repository, digest=digest)
                result = ((await client.get_manifest(ref))[0], media_type)
            # the source digest's tag, so that pods pinned by digest find it too (the webhook)
            by_digest = Reference(job.registry, job.repository, tag=digest_tag(job.digest, suffix))
            if len(by_digest.tag or "") <= MAX_TAG:
                await client.push_manifest(by_digest, result[0], result[1])
            else:
                log.warning(
                    "no digest tag: the suffix makes it longer than a tag may be",
                    extra={"fields": {"job": job.id, "tag": by_digest.tag, "max": MAX_TAG}},
                )
            for tag in pending:
                assert result is not None
                dst = Reference(job.registry, job.repository, tag=tag.tag + suffix)
                await client.push_manifest(dst, result[0], result[1])
                await self.db(self.store.tag_done, job.id, tag)
                log.info("re-tagged", extra={"fields": {"job": job.id, "ref": str(dst)}})
        return outcome

    async def _index(self, client: RegistryClient, job: Job) -> None:
        """Publish the SOCI index of the pushed image beside it (`lazysnap index`): its plain gzip
        layers then load lazily as they are, with no converted copy."""
        src = Reference(job.registry, job.repository, digest=job.digest)
        started = time.monotonic()

        def progress(line: str) -> None:
            log.info("index", extra={"fields": {"job": job.id, "detail": line}})

        results = await index_image(client, str(src), log=progress)
        indexed = sum(1 for m in results for layer in m.layers if layer.action == "indexed")
        seconds = time.monotonic() - started
        fields = {"job": job.id, "ref": str(src), "layers": indexed, "seconds": seconds}
        log.info("indexed", extra={"fields": fields})

    async def _convert(self, client: RegistryClient, job: Job, tag: Tag) -> tuple[str, str]:
        """Convert the job's image, pushed as `tag`+suffix; returns (digest, media type) of the result."""
        src = Reference(job.registry, job.repository, tag=tag.tag, digest=job.digest)
        await inspect(client, src)
        dst = Reference(job.registry, job.repository, tag=tag.tag + self.config.suffix)
        opts = job.options

        def progress(message: str) -> None:
            log.info("convert", extra={"fields": {"job": job.id, "detail": message}})
            if " MB tar -> " in message:  # a layer converted and uploaded
                failpoints.hit("convertd.layer-done")

        self._tmp.mkdir(mode=0o700, exist_ok=True)
        started = time.monotonic()
        convert: Callable[..., Awaitable[Any]] = convert_image
        if opts.get("workload"):  # the files the workload opens go first
            convert = functools.partial(optimize_image, command=opts["workload"])
        result = await convert(
            client,
            src,
            dst,
            format=opts.get("format", ESTARGZ),
            chunk_size=opts.get("chunk_size", DEFAULT_CHUNK_SIZE),
            level=opts.get("level"),
            platform=opts.get("platform"),
            all_platforms=bool(opts.get("all_platforms")),
            tmpdir=self._tmp,
            log=progress,
        )
        seconds = time.monotonic() - started
        converted = [layer for layer in result.layers if layer.action == "converted"]
        bytes_in = sum(layer.source_size for layer in converted)
        bytes_out = sum(layer.size for layer in converted)
        self.metrics.duration.observe(seconds)
        self.metrics.bytes_in.inc(bytes_in)
        self.metrics.bytes_out.inc(bytes_out)
        await self.db(
            self.store.set_result,
            job.id,
            result.digest,
            result.media_type,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            seconds=seconds,
        )
        log.info(
            "converted",
            extra={
                "fields": {
                    "job": job.id,
                    "ref": str(dst),
                    "digest": result.digest,
                    "layers": len(converted),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "seconds": seconds,
                }
            },
        )
        return result.digest, result.media_type


async def inspect(client: RegistryClient, ref: Reference) -> None:
    """Raise Skip when the image needs no conversion: deleted, not a container image, or every layer
    already carries a TOC annotation (our own output, or an image accelerated elsewhere)."""
    try:
        body, media_type, _ = await client.get_manifest(ref)
    except NotFound:
        raise Skip(f"{ref.digest} is no longer in {ref.name} (deleted before it was converted)") from None
    doc, kind = mf.parse(body, media_type, str(ref))
    if kind not in mf.INDEXES:
        _inspect_manifest(doc, str(ref))
        return
    entries = [e for e in doc["manifests"] if not ATTESTATION.matches(e.get("platform") or {})]
    if not entries:
        raise Skip("the index lists no image manifests")
    skips = []
    for entry in entries:
        child = ref.with_digest(entry["digest"])
        body, media_type, _ = await client.get_manifest(child)
        child_doc, child_kind = mf.parse(body, media_type, str(child))
        if child_kind in mf.INDEXES:
            raise ManifestError(f"{child}: nested indexes are not supported")
        try:
            _inspect_manifest(child_doc, str(child))
        except Skip as e:
            skips.append(str(e))
            continue
        return  # at least one manifest to convert
    raise Skip(
        "every manifest of the index: " + "; ".join(dict.fromkeys(s.split(": ", 1)[-1] for s in skips))
    )


def _inspect_manifest(doc: dict, what: str) -> None:
    config_type = doc["config"].get("mediaType")
    if config_type not in IMAGE_CONFIGS or doc.get("artifactType"):
        kind = doc.get("artifactType") or config_type
        raise Skip(f"{what}: not a container image (an artifact of type {str(kind)[:100]!r})")
    layers = [layer for layer in doc["layers"] if layer.get("mediaType") not in FOREIGN]
    if not layers:
        raise Skip(f"{what}: no layers to convert")
    if all_accelerated(layers):
        raise Skip(f"{what}: already accelerated (every layer has a TOC annotation)")


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and current not in out and len(out) < 20:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _permanent(e: BaseException) -> bool:
    """Errors that another attempt cannot fix: a malformed or unsupported manifest, a damaged layer."""
    return any(isinstance(x, _PERMANENT) for x in _chain(e))


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if not isinstance(e, ConvertError | RegistryError):
        text = f"{type(e).__name__}: {text}"
    return text[:2000]


# --- process ----------------------------------------------------------------------------------------------


def _prepare_state(config: Config) -> tuple[Any, JobStore]:
    """Create the state dir (0700), take its lock, empty tmp/ (layers of interrupted conversions), open
    the queue."""
    state = config.state_dir
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        lock = open(state / "convertd.lock", "w")  # held (flock) for the life of the process
    except OSError as e:
        raise StartupError(f"cannot use the state dir {state}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StartupError(f"another convertd is using the state dir {state}") from None
    tmp = state / "tmp"
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700, exist_ok=True)
    try:
        store = JobStore(state / "jobs.db")
    except QueueError as e:
        lock.close()
        raise StartupError(str(e)) from None
    return lock, store


async def serve(config: Config) -> int:
    """Run convertd until SIGTERM or SIGINT; running conversions are given back to the queue."""
    lock, store = _prepare_state(config)
    try:
        recovered = store.recover(time.time(), config.retry)
        if recovered:
            log.warning(
                "jobs interrupted by the last stop are queued again", extra={"fields": {"jobs": recovered}}
            )
        app = Convertd(config, store)
        server = HttpServer(app.handle, Limits(max_body=config.max_body))
        host, port = config.address
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                listeners = await server.listen(host, port)
            except OSError as e:
                raise StartupError(f"cannot listen on {config.listen}: {e.strerror or e}") from None
            bound = [listener.socket.getsockname() for listener in listeners]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve, listeners)
                nursery.start_soon(app.run_workers)
                log.info(
                    "convertd listening",
                    extra={
                        "fields": {
                            "addresses": [f"{a[0]}:{a[1]}" for a in bound],
                            "state_dir": str(config.state_dir),
                            "registry": config.registry or "(from events)",
                            "repositories": [r.name for r in config.repositories],
                            "secret": "required" if config.secret else "none",
                        }
                    },
                )
                if not config.secret:
                    log.warning(
                        "no secret configured: anyone who can reach the listen address can queue jobs "
                        "and read /jobs"
                    )
                if not config.repositories:
                    log.warning("no [[repositories]] configured: every event will be ignored")
                async for signum in signals:
                    log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
                    nursery.cancel_scope.cancel()
                    break
    finally:
        store.close()
        lock.close()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `lazysnap convertd`."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration (see the docs)")
    parser.add_argument("--listen", metavar="HOST:PORT", help=f"override listen (default {DEFAULT_LISTEN})")
    parser.add_argument(
        "--state-dir", type=Path, metavar="DIR", help=f"override state_dir ({DEFAULT_STATE_DIR})"
    )
    parser.add_argument("--log-level", choices=list(logs.LEVELS), help="override log_level (default info)")


def run(args: argparse.Namespace) -> int:
    """`lazysnap convertd`: 0 after SIGTERM/SIGINT, 2 for a bad configuration, 1 when it cannot start."""
    try:
        config = load_config(args.config) if args.config else Config()
        overrides: dict[str, Any] = {}
        if args.listen:
            parse_listen(args.listen)
            overrides["listen"] = args.listen
        if args.state_dir:
            overrides["state_dir"] = args.state_dir.absolute()
        if args.log_level:
            overrides["log_level"] = args.log_level
        if overrides:
            config = dataclasses.replace(config, **overrides)
    except (ConfigError, ValueError) as e:
        print(f"lazysnap convertd: {e}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        failpoints.load_from_environment()
        return trio.run(serve, config)
    except (StartupError, ValueError) as e:
        print(f"lazysnap convertd: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lazysnap convertd",
        description="Convert images pushed to enabled repositories into accelerated ones, driven by the "
        "registry's notifications.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
