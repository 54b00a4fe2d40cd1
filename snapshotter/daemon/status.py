"""`lazysnap status`: what the running daemon serves, read from its live objects over a unix socket.

The daemon serves one JSON document, `GET /status`, on `<root>/status.sock` (mode 0600; the root is
0700 as well): `status_document` builds it on each request from the same objects the Prometheus
collector reads (remote layers, fetcher counters, chunk cache, fallbacks, the snapshot store), so there
is no second source of truth. `serve_status` runs it with hypercorn on the daemon's trio loop until
cancelled. The command connects over the socket (httpx) and prints a table (rich on a terminal, aligned
plain text otherwise) or, with `--json`, the document itself. No daemon: one line on stderr, status 1.

Document (version 1): `daemon` (root, pid, data path "serving" or why it stopped), `snapshots` (total,
on lazy layers), `layers` (one per mounted lazy layer: name, image, refs, fetched = fraction of its
chunks in the cache, and when known bytes / bytes_local = its file content and how much of it is local),
`cache` (bytes used, limit, limit in force, entries, evictions, errors), `fetch` (bytes by kind,
requests, hits, misses, errors) and `fallbacks` (layers pulled in full, by reason).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ..progress import human_size
from .config import DEFAULT_ROOT

log = logging.getLogger("lazysnap.status")
SOCKET_NAME = "status.sock"  # in the daemon's state root
SOCKET_MODE = 0o600
VERSION = 1  # of the document
CLIENT_TIMEOUT = 5.0  # seconds the command waits for the daemon's answer

BuildDoc = Callable[[], dict]


def socket_path(root: str | Path) -> Path:
    return Path(root) / SOCKET_NAME


# --- the document (daemon side) --------------------------------------------------------------------------


def status_document(lazy: Any, snapshotter: Any) -> dict:
    """The status of the daemon, from its live objects: `lazy` is the LazyRuntime (layers, fetcher,
    cache, failure, root), `snapshotter` the Snapshotter. Runs on the trio loop (the objects live there)."""
    layers = [dict(row) for row in lazy.layers.stats()]  # name, image, refs, fetched, bytes, bytes_local
    cache = lazy.cache.stats()
    c = lazy.fetcher.counters
    remote = snapshotter.remote_layers()
    return {
        "version": VERSION,
        "daemon": {
            "root": str(lazy.root),
            "pid": os.getpid(),
            "data_path": "serving" if lazy.failure is None else f"stopped: {lazy.failure}",
            # the FUSE mount across restarts (README, "Restart"): taken over from the previous
            # daemon, kept by a descriptor holder for the next one, or why the previous one was lost
            "fuse": {"adopted": lazy.adopted, "kept": lazy.kept, "lost": lazy.lost, "resend": lazy.resend},
        },
        "snapshots": {"total": snapshotter.store.count(), "on_lazy_layers": sum(remote.values())},
        "layers": sorted(layers, key=lambda x: (x["image"] or "", x["name"])),
        "cache": {
            "bytes_used": cache.bytes_used,
            "limit": cache.limit,
            "limit_in_force": cache.effective_limit,
            "entries": cache.entries,
            "evictions": cache.evictions,
            "write_errors": cache.write_errors,
            "read_errors": cache.read_errors,
        },
        "fetch": {
            "bytes_on_demand": c.bytes_on_demand,
            "bytes_prefetch": c.bytes_prefetch,
            "bytes_background": c.bytes_background,
            "requests": c.requests,
            "cache_hits": c.cache_hits,
            "cache_misses": c.cache_misses,
            "read_timeouts": c.timeouts,
            "errors": c.errors,
            "bad_chunks": c.bad_chunks,
        },
        "fallbacks": dict(sorted(lazy.layers.fallbacks.items())),
    }


# --- the server (daemon side) ------------------------------------------------------------------------------


def status_app(build_doc: BuildDoc):
    """The ASGI app: `GET /status` (or `/`) answers `build_doc()` as JSON; nothing else is served."""

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] not in ("/", "/status"):
            status, doc = 404, {"error": f"no {scope['path']} here: GET /status"}
        elif scope["method"] not in ("GET", "HEAD"):
            status, doc = 405, {"error": "only GET /status"}
        else:
            try:
                status, doc = 200, build_doc()
            except Exception:
                log.exception("cannot build the status document")
                status, doc = 500, {"error": "the daemon could not build its status (see its log)"}
        body = json.dumps(doc, indent=1, ensure_ascii=False).encode() + b"\n"
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    return app


async def serve_status(
    path: str | Path, build_doc: BuildDoc, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the status on the unix socket `path` (mode 0600; a stale socket there is replaced) until
    cancelled; the socket file is removed then. Started once the socket listens."""
    path = Path(path)
    sock = _bind(path)
    identity = os.stat(path).st_ino
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]  # bound here: hypercorn's unix binds change the process umask
    config.accesslog = None
    config.errorlog = log
    config.include_server_header = False
    config.graceful_timeout = 1.0
    try:
        await hypercorn_serve(status_app(build_doc), config, task_status=task_status, mode="asgi")
    finally:
        try:
            if os.stat(path).st_ino == identity:
                path.unlink()
        except OSError:
            pass


def _bind(path: Path) -> socket.socket:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()  # left by a daemon that died; this root has one daemon at a time
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))  # created 0755 at most: nobody but its owner can connect yet (needs write)
        os.chmod(path, SOCKET_MODE)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot serve the status socket {path}: {e.strerror}") from None
    return sock


# --- the command -------------------------------------------------------------------------------------------


class StatusError(Exception):
    """Why `lazysnap status` has nothing to show: one line on stderr, status 1."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--root", metavar="DIR", default=DEFAULT_ROOT, help=f"daemon's state root ({DEFAULT_ROOT})"
    )
    where.add_argument(
        "--socket", type=Path, metavar="PATH", help=f"status socket (default ROOT/{SOCKET_NAME})"
    )
    p.add_argument("--json", action="store_true", help="print the status document as JSON")


def run(args: argparse.Namespace) -> int:
    """The command: 0 with the status on stdout, 1 with one line on stderr when there is none."""
    path = args.socket or socket_path(args.root)
    try:
        doc = fetch_status(path)
    except StatusError as e:
        print(f"lazysnap status: {e}", file=sys.stderr, flush=True)
        return 1
    if args.json:
        print(json.dumps(doc, indent=1, ensure_ascii=False))
    elif sys.stdout.isatty():
        _print_rich(doc)
    else:
        print(render_text(doc), end="")
    return 0


def fetch_status(path: Path) -> dict:
    """The running daemon's status document, from its socket. Raises StatusError."""
    transport = httpx.HTTPTransport(uds=str(path))
    try:
        with httpx.Client(transport=transport, timeout=CLIENT_TIMEOUT) as client:
            resp = client.get("http://lazysnap/status")
    except httpx.TimeoutException:
        raise StatusError(f"the daemon did not answer on {path} within {CLIENT_TIMEOUT:g}s") from None
    except httpx.TransportError as e:
        code = _errno(e)
        if code == errno.EACCES:
            raise StatusError(f"cannot connect to {path}: permission denied (run as root)") from None
        if code in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
            raise StatusError(
                f"no lazysnap daemon is running ({path} "
                f"{'does not exist' if code != errno.ECONNREFUSED else 'refuses connections'}): "
                "start it with `lazysnap serve`, or give its --root or --socket"
            ) from None
        raise StatusError(f"cannot reach the daemon on {path}: {e}") from None
    if resp.status_code != 200:
        raise StatusError(f"the daemon on {path} answered HTTP {resp.status_code}: {resp.text[:200].strip()}")
    try:
        doc = resp.json()
    except ValueError:
        raise StatusError(f"the daemon on {path} answered something that is not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise StatusError(f"the daemon on {path} speaks another status version: use the same lazysnap")
    return doc


def _errno(e: BaseException) -> int | None:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


# --- rendering ---------------------------------------------------------------------------------------------

LAYER_COLUMNS = ("LAYER", "IMAGE", "REFS", "FETCHED", "LOCAL")


def summary_lines(doc: dict) -> list[str]:
    d, s, cache, f = doc["daemon"], doc["snapshots"], doc["cache"], doc["fetch"]
    limit = human_size(cache["limit"])
    if cache["limit_in_force"] != cache["limit"]:
        limit += f" (lowered to {human_size(cache['limit_in_force'])}: its filesystem was full)"
    lookups = f["cache_hits"] + f["cache_misses"]
    hits = f", {100 * f['cache_hits'] / lookups:.1f}% of reads served locally" if lookups else ""
    fallbacks = ", ".join(f"{reason} {n}" for reason, n in doc["fallbacks"].items()) or "none"
    errors = [
        f"{f[k]} {what}"
        for k, what in (
            ("read_timeouts", "read timeouts"),
            ("errors", "fetch errors"),
            ("bad_chunks", "bad chunks"),
        )
        if f[k]
    ]
    errors += [f"{cache[k]} cache {k.replace('_', ' ')}" for k in ("write_errors", "read_errors") if cache[k]]
    lines = [
        f"daemon: pid {d['pid']}, root {d['root']}, data path {d['data_path']}",
        f"snapshots: {s['total']} ({s['on_lazy_layers']} on lazy layers)",
        f"chunk cache: {human_size(cache['bytes_used'])} of {limit}, {cache['entries']} chunks, "
        f"{cache['evictions']} evicted",
        f"fetched: {human_size(f['bytes_on_demand'])} on demand, "
        f"{human_size(f['bytes_prefetch'])} prefetched, "
        f"{human_size(f['bytes_background'])} in the background, {f['requests']} requests{hits}",
        f"full-pull fallbacks: {fallbacks}",
    ]
    fuse = d.get("fuse")
    if fuse:
        kept = "kept for the next daemon" if fuse["kept"] else "ends with this daemon (no descriptor holder)"
        taken = "taken over from the previous daemon, " if fuse["adopted"] else ""
        lines.append(f"FUSE mount: {taken}{kept}")
        if fuse["lost"]:
            lines.append(f"previous FUSE mount lost: {fuse['lost']}")
        if not fuse.get("resend", True):
            lines.append("kernel lacks FUSE_NOTIFY_RESEND (Linux 6.9+): a crash can leave a read blocked")
    if errors:
        lines.append("errors: " + ", ".join(errors))
    return lines


def layer_rows(doc: dict) -> list[tuple[str, ...]]:
    rows = []
    for layer in doc["layers"]:
        local = "?"
        if "bytes" in layer and "bytes_local" in layer:
            local = f"{human_size(layer['bytes_local'])} of {human_size(layer['bytes'])}"
        rows.append(
            (
                layer["name"],
                layer["image"] or "?",
                str(layer["refs"]),
                f"{100 * layer['fetched']:.1f}%",
                local,
            )
        )
    return rows


def render_text(doc: dict) -> str:
    """The human status as plain aligned text (for pipes and logs)."""
    lines = summary_lines(doc)
    rows = layer_rows(doc)
    lines.append("")
    if not rows:
        lines.append("no lazy layers mounted")
    else:
        table = [LAYER_COLUMNS, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(LAYER_COLUMNS))]
        right = {2, 3}  # numbers
        for r in table:
            cells = [
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _print_rich(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for line in summary_lines(doc):
        console.print(line, markup=False, highlight=False)
    rows = layer_rows(doc)
    if not rows:
        console.print("no lazy layers mounted")
        return
    table = Table(title="lazy layers", title_justify="left")
    for i, name in enumerate(LAYER_COLUMNS):
        table.add_column(name, justify="right" if i in (2, 3) else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
