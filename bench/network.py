"""A shaped network for benchmarks: the registry in its own network namespace behind a veth pair.

    host  10.213.X.1/30  <-- veth -->  10.213.X.2/30  namespace lzsb-<pid>-<id>: docker-registry :5000
                                       tc qdisc: tbf rate R burst 64kb latency 50ms on the namespace's end

Everything the registry sends (blobs, manifests) leaves the namespace through the `tbf` qdisc, so pulls
see a link of rate R (default 100 Mbit/s; "unlimited" means no qdisc); pushes and conversions flowing
into the namespace are not shaped. The commands are those of reference/harness.md. X is the first /24 of
10.213.0.0/16 that no interface of the host uses (chosen under a lock, so concurrent runs get different
ones); traffic goes only between the host and this namespace.

Round-trip latency (no netem in this kernel) comes from an optional user-space TCP proxy on the host's
loopback (`--delay-ms`): every chunk is held for half the delay in each direction, with a bounded
buffer; it runs as its own process, stopped by PID, and exits by itself when its parent is gone or
its time limit is over.

`ShapedRegistry` is a context manager that always removes what it made (processes by PID, then the
namespace, the veth pair and its qdisc), on errors and on KeyboardInterrupt too; namespaces left by a
run that was killed (its PID is in the name) are removed by the next one. The registry's storage is a
directory that outlives the context (images are pushed once, then found by later sessions). Bytes sent
are counted two ways between `mark()` and `traffic(since)`: the registry's access log (response bytes,
as tests/harness/registry.py parses it) and the host veth's receive counter (bytes on the wire).

    python -m bench.network delay-proxy --listen 127.0.0.1:P --target 10.213.X.2:5000 --delay-ms N
    python -m bench.network cleanup        remove namespaces and veths left by killed runs
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.harness.procs import Service, free_port, port_open

SUBNET = "10.213"
REGISTRY_PORT = 5000
DEFAULT_RATE = "100mbit"
NETNS_PREFIX = "lzsb-"
VETH_HOST_PREFIX = "lzsh"
VETH_NS_PREFIX = "lzsn"
LOCK_PATH = Path("/run/lock/lazysnap-bench-net.lock")
PROXY_CHUNK = 64 << 10
PROXY_BUFFER_CHUNKS = 256  # per direction: at most 16 MiB held
PROXY_MAX_SECONDS = 6 * 3600.0

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps|tbps)$")
_RATE_FACTOR = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "bps": 8,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
    "tbps": 8e12,
}
_ACCESS = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" '
    r"(?P<status>\d{3}) (?P<bytes>\d+|-)"
)
_BLOB = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")


class NetworkError(RuntimeError):
    """Setting up the shaped network failed; the message names the command and its output."""


# --- rates ----------------------------------------------------------------------------------------


def parse_rate(text: str) -> str | None:
    """A tc rate ("100mbit", "1gbit", "500kbit", "12.5mbps"), lower-cased; None for "unlimited"."""
    rate = text.strip().lower()
    if rate in ("unlimited", "none", "0"):
        return None
    if not _RATE.match(rate):
        raise ValueError(
            f"rate {text!r}: give a tc rate such as 100mbit, 1gbit, 500kbit or 12mbps, or 'unlimited'"
        )
    return rate


def rate_bits_per_second(rate: str | None) -> float | None:
    if rate is None:
        return None
    m = _RATE.match(rate)
    if not m:
        raise ValueError(f"not a tc rate: {rate!r}")
    return float(m[1]) * _RATE_FACTOR[m[2]]


# --- traffic accounting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessLine:
    method: str
    path: str
    status: int
    bytes: int

    @property
    def is_blob(self) -> bool:
        return _BLOB.match(self.path.split("?")[0]) is not None


def parse_access_log(text: str) -> list[AccessLine]:
    """The access-log lines of docker-registry's output (combined log format); other lines ignored."""
    out = []
    for line in text.splitlines():
        if m := _ACCESS.match(line):
            out.append(
                AccessLine(
                    m["method"], m["path"], int(m["status"]), 0 if m["bytes"] == "-" else int(m["bytes"])
                )
            )
    return out


@dataclass(frozen=True)
class Mark:
    log_offset: int
    wire_bytes: int
    at: float


@dataclass(frozen=True)
class Traffic:
    """What the registry sent between a mark and now."""

    registry_bytes: int  # response bodies, from the access log
    blob_bytes: int  # of which blob GETs (whole or ranged)
    requests: int
    blob_requests: int
    range_requests: int  # 206 answers
    wire_bytes: int  # received by the host end of the veth (headers and all)

    @classmethod
    def from_lines(cls, lines: Sequence[AccessLine], wire_bytes: int) -> Traffic:
        blobs = [x for x in lines if x.method == "GET" and x.is_blob]
        return cls(
            registry_bytes=sum(x.bytes for x in lines),
            blob_bytes=sum(x.bytes for x in blobs),
            requests=len(lines),
            blob_requests=len(blobs),
            range_requests=sum(1 for x in blobs if x.status == 206),
            wire_bytes=wire_bytes,
        )


# --- commands -------------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _cmd(["ip", *args], check=check)


def _cmd(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise NetworkError(f"`{' '.join(argv)}` exited {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_GONE = ("Cannot find device", "No such file or directory", "does not exist")


def _delete(args: Sequence[str], exists) -> str | None:
    """`ip ARGS` deleting a namespace or link; what is already gone (or goes meanwhile) is not an
    error. Returns the error text, or None."""
    p = _ip(*args, check=False)
    if p.returncode == 0 or any(text in p.stderr for text in _GONE) or not exists():
        return None
    return f"ip {' '.join(args)}: {p.stderr.strip()}"


def namespaces() -> list[str]:
    """Network namespaces this module names (ours and other runs')."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NETNS_PREFIX)]


def host_veths() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(VETH_HOST_PREFIX)]


def cleanup_stale(log=print) -> list[str]:
    """Remove namespaces (and their veths and processes) left by runs whose process is gone."""
    removed = []
    for ns in namespaces():
        parts = ns.split("-")
        if len(parts) != 3 or not parts[1].isdigit() or _pid_alive(int(parts[1])):
            continue
        # processes still in it were started by that run (a registry, by its own PID)
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        _ip("netns", "del", ns, check=False)
        _ip("link", "del", VETH_HOST_PREFIX + parts[2], check=False)
        removed.append(ns)
        log(f"removed namespace {ns} left by a run that was killed (pid {parts[1]})")
    return removed


def _used_subnets() -> set[int]:
    used = set()
    for line in _ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        if m := re.search(rf"inet {re.escape(SUBNET)}\.(\d+)\.", line):
            used.add(int(m[1]))
    return used


@contextlib.contextmanager
def _net_lock() -> Iterator[None]:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- the shaped registry --------------------------------------------------------------------------


class ShapedRegistry:
    """docker-registry in a fresh network namespace behind a (shaped) veth; see the module docstring.

    `storage` is the registry's root directory (kept); `workdir` holds its config and log (the caller
    removes it). `host` is what clients pull from (the delay proxy when `delay_ms`), `push_host` the
    registry itself.
    """

    def __init__(
        self,
        workdir: Path,
        storage: Path,
        *,
        rate: str | None = DEFAULT_RATE,
        delay_ms: float = 0.0,
        log=print,
    ):
        self.workdir = workdir
        self.storage = storage
        self.rate = parse_rate(rate) if rate is not None else None
        self.delay_ms = float(delay_ms)
        self.log = log
        token = secrets.token_hex(3)
        self.netns = f"{NETNS_PREFIX}{os.getpid()}-{token}"
        self.host_if = VETH_HOST_PREFIX + token
        self.ns_if = VETH_NS_PREFIX + token
        self.subnet: int | None = None
        self.registry: Service | None = None
        self.proxy: Service | None = None
        self.proxy_port: int | None = None
        self._created_netns = False
        self._created_veth = False
        self.current_rate: str | None = None

    # addresses
    @property
    def host_ip(self) -> str:
        return f"{SUBNET}.{self.subnet}.1"

    @property
    def registry_ip(self) -> str:
        return f"{SUBNET}.{self.subnet}.2"

    @property
    def push_host(self) -> str:
        return f"{self.registry_ip}:{REGISTRY_PORT}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.proxy_port}" if self.proxy_port else self.push_host

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def describe(self) -> str:
        rate = self.current_rate or "unlimited"
        delay = f", +{self.delay_ms:g} ms round trip (proxy {self.host})" if self.delay_ms else ""
        return f"registry {self.push_host} in netns {self.netns}, link {rate}{delay}"

    # lifecycle
    def __enter__(self) -> ShapedRegistry:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> ShapedRegistry:
        if os.geteuid() != 0:
            raise NetworkError("the shaped network needs root (ip netns, tc)")
        for tool in ("ip", "tc", "docker-registry"):
            if not _which(tool):
                raise NetworkError(f"{tool} is missing (Debian packages iproute2, docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        cleanup_stale(self.log)
        with _net_lock():
            used = _used_subnets()
            free = [x for x in range(256) if x not in used]
            if not free:
                raise NetworkError(f"every {SUBNET}.X.0/24 is in use on this host")
            self.subnet = free[0]
            _ip("netns", "add", self.netns)
            self._created_netns = True
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._created_veth = True
            _ip("link", "set", self.ns_if, "netns", self.netns)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
        _ip("-n", self.netns, "addr", "add", f"{self.registry_ip}/30", "dev", self.ns_if)
        _ip("-n", self.netns, "link", "set", self.ns_if, "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        self.shape(self.rate)
        self._start_registry()
        if self.delay_ms > 0:
            self._start_proxy()
        return self

    def _start_registry(self) -> None:
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{self.registry_ip}:{REGISTRY_PORT}", "secret": "lazysnap-bench"},
        }
        cfg = self.workdir / "registry.yml"
        cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.registry = Service(
            "docker-registry",
            ["ip", "netns", "exec", self.netns, "docker-registry", "serve", str(cfg)],
            self.log_path,
        )
        self.registry.start()
        self.registry.wait_ready(self._answers, timeout=20, what=f"answering on {self.push_host}")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.push_host}/v2/", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _start_proxy(self) -> None:
        self.proxy_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.network",
            "delay-proxy",
            "--listen",
            f"127.0.0.1:{self.proxy_port}",
            "--target",
            self.push_host,
            "--delay-ms",
            str(self.delay_ms),
            "--parent",
            str(os.getpid()),
        ]
        env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.proxy = Service("delay-proxy", argv, self.workdir / "delay-proxy.log", env=env)
        self.proxy.start()
        port = self.proxy_port
        self.proxy.wait_ready(lambda: port_open(port), timeout=15, what=f"listening on 127.0.0.1:{port}")

    def shape(self, rate: str | None) -> None:
        """Set the link's rate now (None: unlimited, no qdisc)."""
        rate = parse_rate(rate) if rate is not None else None
        tc = ["ip", "netns", "exec", self.netns, "tc", "qdisc"]
        if rate is None:
            _cmd([*tc, "del", "dev", self.ns_if, "root"], check=False)  # no qdisc: nothing to delete
        else:
            _cmd(
                [
                    *tc,
                    "replace",
                    "dev",
                    self.ns_if,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "64kb",
                    "latency",
                    "50ms",
                ]
            )
        self.current_rate = rate

    def qdisc(self) -> str:
        return _cmd(
            ["ip", "netns", "exec", self.netns, "tc", "qdisc", "show", "dev", self.ns_if]
        ).stdout.strip()

    def close(self) -> None:
        """Stop the processes by PID, then remove the namespace and the veth (and so the qdisc)."""
        errors = []
        for service in (self.proxy, self.registry):
            if service is not None:
                try:
                    service.stop(grace=5)
                except Exception as e:  # keep removing the rest
                    errors.append(f"stopping {service.name} (pid {service.pid}): {e}")
        self.proxy = self.registry = None
        if self._created_netns:
            if error := _delete(["netns", "del", self.netns], lambda: self.netns in namespaces()):
                errors.append(error)
            self._created_netns = False
        if self._created_veth:
            # normally gone with the namespace's end of the pair, which the kernel removes a little later
            if error := _delete(["link", "del", self.host_if], lambda: self.host_if in host_veths()):
                errors.append(error)
            self._created_veth = False
        if errors:
            raise NetworkError("cleaning up the shaped network: " + "; ".join(errors))

    # accounting
    def _wire_rx(self) -> int:
        try:
            return int(Path(f"/sys/class/net/{self.host_if}/statistics/rx_bytes").read_text())
        except (OSError, ValueError):
            return 0

    def mark(self) -> Mark:
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        return Mark(size, self._wire_rx(), time.monotonic())

    def traffic(self, since: Mark) -> Traffic:
        """What the registry sent since the mark (its access log is written as each response ends)."""
        with open(self.log_path, "rb") as f:
            f.seek(since.log_offset)
            text = f.read().decode(errors="replace")
        return Traffic.from_lines(parse_access_log(text), self._wire_rx() - since.wire_bytes)


def _which(tool: str) -> bool:
    from shutil import which

    return which(tool) is not None


# --- the delay proxy ------------------------------------------------------------------------------


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    """Copy src to dst, each chunk sent `delay` seconds after it arrived; EOF passed on as a half-close.
    At most PROXY_BUFFER_CHUNKS chunks are held: beyond that, reading pauses (TCP backpressure)."""
    send, receive = trio.open_memory_channel[tuple[float, bytes]](PROXY_BUFFER_CHUNKS)

    async def reader() -> None:
        async with send:
            while True:
                data = await src.receive_some(PROXY_CHUNK)
                await send.send((trio.current_time() + delay, data))
                if not data:
                    return

    async def writer() -> None:
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                if not data:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await dst.send_eof()
                    return
                await dst.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _handle(client: trio.SocketStream, target: tuple[str, int], one_way: float) -> None:
    try:
        upstream = await trio.open_tcp_stream(*target)
    except OSError:
        await client.aclose()
        return
    async with client, upstream:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, upstream, one_way)
                nursery.start_soon(_pipe, upstream, client, one_way)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side went away: the connection ends


async def serve_delay_proxy(
    listen: tuple[str, int],
    target: tuple[str, int],
    delay_ms: float,
    *,
    parent: int | None = None,
    max_seconds: float = PROXY_MAX_SECONDS,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on `listen`, relay to `target` adding `delay_ms` of round trip; return when `parent` is no
    longer this process's parent or after `max_seconds`. Started with `nursery.start`, it gives the port
    it listens on (useful with port 0)."""
    one_way = delay_ms / 2000.0
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    async with trio.open_nursery() as nursery:

        async def handler(stream: trio.SocketStream) -> None:
            await _handle(stream, target, one_way)

        nursery.start_soon(trio.serve_listeners, handler, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])
        deadline = trio.current_time() + max_seconds
        while trio.current_time() < deadline and (parent is None or os.getppid() == parent):
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    proxy = sub.add_parser("delay-proxy", help="a TCP relay adding round-trip latency")
    proxy.add_argument("--listen", required=True, help="HOST:PORT")
    proxy.add_argument("--target", required=True, help="HOST:PORT")
    proxy.add_argument("--delay-ms", type=float, required=True, help="added round trip, ms")
    proxy.add_argument("--parent", type=int, help="exit when this PID is no longer the parent")
    proxy.add_argument("--max-seconds", type=float, default=PROXY_MAX_SECONDS)
    sub.add_parser("cleanup", help="remove namespaces and veths left by killed runs")
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        cleanup_stale()
        return 0
    trio.run(
        lambda: serve_delay_proxy(
            _host_port(args.listen),
            _host_port(args.target),
            args.delay_ms,
            parent=args.parent,
            max_seconds=args.max_seconds,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
