"""`lazysnap supervise -- COMMAND...`: a tiny service manager for hosts and pods without systemd. It runs
COMMAND (normally `lazysnap serve ...`), restarts it at once whenever it exits unless told to stop, and
keeps the descriptors the service stores with it, handing them to every restart, with systemd's own
protocol (`snapshotter.sdnotify`): the service sees $NOTIFY_SOCKET and LISTEN_FDS exactly as under
systemd with `FileDescriptorStoreMax=`. That is what lets the daemon's FUSE connection outlive the
daemon: while this process holds a copy of /dev/fuse, readers of lazy files block during a restart
instead of failing.

- SIGTERM / SIGINT: the service gets SIGINT (`lazysnap serve`: stop for good, unmount; its SIGTERM
  means "stop, the next one takes over"); once it has exited (SIGKILL after --stop-timeout), the stored
  descriptors are closed and this process exits with the service's status.
- SIGHUP: forwarded to the service (`lazysnap serve` then hands over to a new copy of itself, which
  announces itself with MAINPID=; this process is a child subreaper, so it reaps that one too).
- A stored descriptor that reports POLLERR/POLLHUP (a FUSE connection the kernel aborted) is dropped.
- Restarts are immediate; more than `BURST` starts within `BURST_WINDOW` seconds back off (up to 10 s).
The notify socket lives in a private 0700 directory, so only this user's processes can talk to it.
"""

from __future__ import annotations

import argparse
import array
import errno
import logging
import os
import platform
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from fuse.syscalls import libc
from snapshotter import logs, sdnotify

log = logging.getLogger("lazysnap.supervise")

PR_SET_CHILD_SUBREAPER = 36
BURST, BURST_WINDOW, MAX_BACKOFF = 10, 10.0, 10.0  # more starts than BURST in BURST_WINDOW s back off
# kcmp(2): the same open file description? (systemd's same_fd); its number differs per architecture
KCMP_SYSCALLS = {"x86_64": 312, "aarch64": 272, "ppc64le": 354, "s390x": 343, "riscv64": 272}
SYS_KCMP = KCMP_SYSCALLS.get(platform.machine())
KCMP_FILE = 0


@dataclass
class Stored:
    name: str
    fd: int


def same_file(pid: int, a: int, b: int) -> bool:
    """Whether fds `a` and `b` of process `pid` share one open file description (kcmp(2); where it is
    unknown or forbidden, by device and inode: /dev/fuse copies then count as one, as they are here)."""
    if SYS_KCMP is not None:
        result = libc.syscall(SYS_KCMP, pid, pid, KCMP_FILE, a, b)
        if result >= 0:
            return result == 0
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino, sa.st_rdev) == (sb.st_dev, sb.st_ino, sb.st_rdev)


class Supervisor:
    def __init__(self, command: list[str], *, max_fds: int = 16, stop_timeout: float = 60.0):
        self.command = command
        self.max_fds, self.stop_timeout = max_fds, stop_timeout
        self.store: list[Stored] = []
        self.main_pid: int | None = None
        self._main_fd: int | None = None  # pidfd of main_pid: tells its exit even when not our child
        self.status = 0
        self.stopping = False
        self._starts: list[float] = []
        self._dir = tempfile.mkdtemp(prefix="lazysnap-supervise-")  # 0700
        self.socket_path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.socket_path)
        self.sock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals: list[int] = []

    # --- the service -------------------------------------------------------------------------

    def start(self) -> None:
        self._starts = [t for t in self._starts if time.monotonic() - t < BURST_WINDOW]
        if len(self._starts) >= BURST:
            delay = min(MAX_BACKOFF, 2.0 ** (len(self._starts) - BURST))
            log.warning("service restarting too often: waiting %.0f s", delay)
            self._sleep(delay)
            if self.stopping:
                return
        self._starts.append(time.monotonic())
        names = [s.name for s in self.store]
        fds = [s.fd for s in self.store]
        pid = os.fork()
        if pid == 0:  # the child: descriptors to 3, 4, ..., environment, exec
            try:
                self._exec_child(names, fds)
            finally:
                os._exit(127)
        self._watch(pid)
        log.info("started", extra={"fields": {"pid": pid, "fds": ",".join(names) or "-"}})

    def _exec_child(self, names: list[str], fds: list[int]) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        high = [os.dup(fd) for fd in fds]  # out of the way of 3, 4, ... first
        for i, fd in enumerate(high):
            os.dup2(fd, sdnotify.LISTEN_FDS_START + i, inheritable=True)
        env = dict(os.environ)
        env[sdnotify.NOTIFY_SOCKET] = self.socket_path
        if names:
            env.update(sdnotify.listen_environment(names, os.getpid()))
        os.execvpe(self.command[0], self.command, env)

    def _watch(self, pid: int) -> None:
        if self._main_fd is not None:
            os.close(self._main_fd)
            self._main_fd = None
        self.main_pid = pid
        try:
            self._main_fd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone: the next reap tells how
            self._main_fd = None

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("cannot become a child subreaper: an upgraded daemon would not be reaped here")
        self.start()
        deadline: float | None = None
        while True:
            if self.stopping and self.main_pid is None:
                break
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._poll(timeout)
            self._handle_signals()
            self._reap()
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.stop_timeout
            if deadline is not None and self.main_pid is not None and time.monotonic() >= deadline:
                log.error("service did not stop within %.0f s: killing it", self.stop_timeout)
                self._kill(signal.SIGKILL)
                deadline = time.monotonic() + 5
            if not self.stopping and self.main_pid is None:
                self.start()
        self.close()
        return self.status

    def _poll(self, timeout: float | None) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        if self._main_fd is not None:
            poller.register(self._main_fd, select.POLLIN)
        for s in self.store:
            poller.register(s.fd, 0)  # POLLERR and POLLHUP are always reported
        try:
            events = poller.poll(None if timeout is None else timeout * 1000)
        except InterruptedError:
            return
        for fd, mask in events:
            if fd == self.sock.fileno():
                self._receive()
            elif fd == self._wake_r:
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
            elif fd == self._main_fd:
                self._main_exited()
            elif mask & (select.POLLERR | select.POLLHUP):
                self._drop([s for s in self.store if s.fd == fd], "its connection ended")

    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    log.info("%s received: stopping the service", signal.Signals(signum).name)
                self.stopping = True
                self._kill(signal.SIGINT)  # for good: `lazysnap serve` then unmounts
            elif signum == signal.SIGHUP:
                log.info("SIGHUP received: passed to the service (pid %s)", self.main_pid)
                self._kill(signal.SIGHUP)

    def _kill(self, signum: int) -> None:
        if self.main_pid is not None:
            try:
                os.kill(self.main_pid, signum)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.main_pid:
                self._ended(os.waitstatus_to_exitcode(status))

    def _main_exited(self) -> None:
        """The main process is gone (pidfd readable); reap it if it is our child (else its parent did)."""
        pid = self.main_pid
        try:
            got, status = os.waitpid(pid, os.WNOHANG) if pid is not None else (0, 0)
        except ChildProcessError:
            got, status = pid, 0
        if got == pid:
            self._ended(os.waitstatus_to_exitcode(status) if status else 0)

    def _ended(self, code: int) -> None:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        level = logging.INFO if self.stopping or code == 0 else logging.WARNING
        log.log(level, "service ended (%s)%s", how, "" if self.stopping else ": restarting")
        self.status = 128 - code if code < 0 else code
        if self._main_fd is not None:
            os.close(self._main_fd)
            self._main_fd = None
        self.main_pid = None

    # --- notifications -----------------------------------------------------------------------

    def _receive(self) -> None:
        space = socket.CMSG_SPACE(sdnotify.MAX_FDS_PER_MESSAGE * 4)
        while True:
            try:
                msg, ancillary, _flags, _addr = self.sock.recvmsg(sdnotify.MAX_DATAGRAM, space)
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("notify socket: %s", e)
                return
            fds = []
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", data[: len(data) - len(data) % 4])
            self.handle(sdnotify.parse_message(msg), fds)

    def handle(self, fields: dict[str, str], fds: list[int]) -> None:
        """One notification, as systemd takes it (NotifyAccess=all)."""
        if fields.get("FDSTORE") == "1" and fds:
            name = fields.get("FDNAME", "stored")
            if not sdnotify.valid_fdname(name):
                log.warning("refusing descriptors with an invalid FDNAME %r", name)
            else:
                for fd in fds:
                    self._keep(name, fd)
                fds = []
        for fd in fds:  # descriptors not asked to be stored are not kept (as systemd does)
            os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1":
            name = fields.get("FDNAME", "")
            self._drop([s for s in self.store if s.name == name], "the service asked")
        if "MAINPID" in fields:
            try:
                pid = int(fields["MAINPID"])
            except ValueError:
                log.warning("ignoring MAINPID=%r", fields["MAINPID"])
            else:
                if pid != self.main_pid and pid > 0:
                    log.info("main process is now pid %d (was %s)", pid, self.main_pid)
                    self._watch(pid)
                    if self.stopping:  # a stop during a hand-over is for the new main process too
                        self._kill(signal.SIGINT)
        if fields.get("READY") == "1":
            log.info("service ready", extra={"fields": {"pid": self.main_pid}})

    def _keep(self, name: str, fd: int) -> None:
        me = os.getpid()
        if any(same_file(me, s.fd, fd) for s in self.store):
            os.close(fd)  # already stored: one copy is enough
            return
        if len(self.store) >= self.max_fds:
            log.warning("descriptor store full (%d): not keeping %s", self.max_fds, name)
            os.close(fd)
            return
        os.set_inheritable(fd, False)
        self.store.append(Stored(name, fd))
        log.info("keeping descriptor", extra={"fields": {"name": name, "stored": len(self.store)}})

    def _drop(self, entries: list[Stored], why: str) -> None:
        for s in entries:
            self.store.remove(s)
            os.close(s.fd)
            log.info("dropped descriptor %s: %s", s.name, why)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            select.select([self._wake_r], [], [], end - time.monotonic())
            self._handle_signals()

    def close(self) -> None:
        self._drop(list(self.store), "stopping")
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-fds", type=int, default=16, help="descriptors kept at most (default 16)")
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="SIGKILL the service this long after SIGTERM (default 60)",
    )
    parser.add_argument("--log-level", choices=list(logs.LEVELS), default="info")
    parser.add_argument("service", nargs=argparse.REMAINDER, help="the service: -- lazysnap serve ...")


def run(args: argparse.Namespace) -> int:
    command = args.service[1:] if args.service[:1] == ["--"] else args.service
    if not command:
        print("lazysnap supervise: give the command to run, e.g. -- lazysnap serve", file=sys.stderr)
        return 2
    if shutil.which(command[0]) is None:
        print(f"lazysnap supervise: {command[0]}: command not found", file=sys.stderr)
        return 2
    logs.setup(args.log_level, "logfmt")
    try:
        return Supervisor(command, max_fds=args.max_fds, stop_timeout=args.stop_timeout).run()
    except OSError as e:
        if e.errno == errno.EPERM:
            print(f"lazysnap supervise: {e}", file=sys.stderr)
            return 1
        raise
