"""Processes that tests start and stop by PID, and the bookkeeping that proves nothing is left behind.

Every service a test needs (a registry, containerd, later the snapshotter) is a `Service`: started
with its output in a log file, waited on with a readiness check that fails fast (with the log tail)
if the process dies, and stopped by PID: SIGTERM, then SIGKILL after a grace period.
`running_services()` and `mounts_under()` let the session check that tests cleaned up.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_running: dict[int, Service] = {}


class ServiceError(RuntimeError):
    """A service failed to start or to become ready."""


class Service:
    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # setpriv (util-linux) makes the service get SIGTERM when this test process dies, however it
        # dies: a test runner killed mid-test (a timeout, SIGKILL) leaves no daemon or mount behind
        argv = ["setpriv", "--pdeathsig", "TERM", "--", *self.argv] if shutil.which("setpriv") else self.argv
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env} if self.env else None,
                start_new_session=True,  # a Ctrl-C to pytest does not reach it first
            )
        _running[self.proc.pid] = self
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, ready: Callable[[], bool], timeout: float = 15.0, what: str = "ready") -> None:
        """Poll ready() until it is true; fail with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ServiceError(f"{self.name} exited before it was {what}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} not {what} after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop by PID: SIGTERM, SIGKILL after `grace` seconds. Returns the exit code."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            _running.pop(self.proc.pid, None)
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def running_services() -> list[Service]:
    """Services started by this test process that were not stopped."""
    return [s for s in _running.values() if s.alive()]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def mounts_under(prefix: Path | str) -> list[str]:
    """Mount points at or below prefix, deepest first (the order to unmount them in)."""
    prefix = str(prefix).rstrip("/")
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_all(prefix: Path | str) -> None:
    """Unmount everything below prefix; lazily if a mount is busy."""
    for point in mounts_under(prefix):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def pids_with_cmdline(fragment: str) -> list[int]:
    """PIDs of processes whose command line contains fragment (to find what a daemon spawned)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def kill_pids(pids: Sequence[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_exists(p) for p in pids):
            time.sleep(0.05)


def _exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def peak_rss_mib() -> int:
    """This process's peak resident set (MiB) since it started its program: VmHWM belongs to the
    address space, which execve replaces. (getrusage's ru_maxrss survives execve: a child spawned
    from a large test process would report the parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) >> 10
    raise RuntimeError("no VmHWM in /proc/self/status")


# --- memory cases: a scenario in a child process under an address-space limit ---------------------

REPO = Path(__file__).resolve().parents[2]


def run_limited(module: str, *args: str, timeout: float = 300) -> tuple[str, int]:
    """Run `python -m module args...` (whose `__main__` is `limited_main`): (the scenario's one-line
    outcome, the child's peak RSS in MiB). A regression that needs more memory than the child's
    RLIMIT_AS fails here, with the child's output, instead of taking the machine down."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 2, (
        f"child {module} {' '.join(args)} ended with {proc.returncode}: "
        f"{proc.stdout[-2000:]} {proc.stderr[-3000:]}"
    )
    return lines[0], int(lines[1])


def limited_main(scenarios: dict[str, Callable[..., str]], limit: int) -> None:
    """A test module's `__main__`: cap the address space at `limit` bytes, run the scenario named by
    argv[1] with the rest of argv, print its outcome and the peak RSS (what `run_limited` reads)."""
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(scenarios[sys.argv[1]](*sys.argv[2:]))
    print(peak_rss_mib())
