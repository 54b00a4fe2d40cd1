"""How the daemon's FUSE mount survives the daemon: restarts, crashes (SIGKILL, OOM kill) and upgrades.

The mount lives as long as some process holds its /dev/fuse descriptor; readers then wait instead of
failing, and a new daemon can serve the same connection (`fuse.connection`, `FuseMount.adopt`).
- Keeping it: after mounting, the daemon writes the kernel's INIT request to `<root>/fuse-session`
  and hands a copy of the descriptor to its service manager (`FDSTORE=1`, `FDNAME=lazysnap-fuse`):
  systemd with `FileDescriptorStoreMax=`, or `lazysnap supervise` where there is no systemd.
- Taking it over: the manager hands the descriptor back to the next daemon it starts (LISTEN_FDS).
  `take()` adopts it only when it is still connected and is the mount at `<root>/mnt` the session file
  describes; otherwise it says so (log, `lazysnap_fuse_connections_lost_total`), and the daemon mounts
  afresh: containers still running on the old mount are broken and must be restarted.
- A planned upgrade (SIGHUP, `systemctl reload lazysnap`): the running daemon starts its successor (the
  installed, possibly newer, `lazysnap serve` with the same arguments) and passes it the descriptor.
  The successor imports and configures itself, announces itself as the main process (`MAINPID=`), and
  says "ready"; only then does the old daemon stop (no unmount), and the successor, woken by the old
  one's exit (pidfd), takes over at once: readers wait only for that hand-over.
Node ids and file handles are pure functions of (layer slot, TOC entry) (`fuse.fs`), so a new process
answers for everything the kernel still holds; layers are restored from local state only.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from fuse.connection import Connection
from fuse.mount import mount_device
from snapshotter import sdnotify

log = logging.getLogger("lazysnap.handover")

FDNAME = "lazysnap-fuse"
SESSION_FILE = "fuse-session"  # in the state root: {"device": "major:minor", "init": hex}
ENVIRONMENT = "LAZYSNAP_HANDOVER"  # set by an upgrading daemon for its successor: pid=,fuse=,control=
READY = b"ready\n"
SUCCESSOR_TIMEOUT = 120.0  # seconds a successor may take to become ready before the upgrade is abandoned
PREDECESSOR_TIMEOUT = 90.0  # seconds a successor waits for the old daemon to exit before killing it


@dataclass
class Predecessor:
    """The daemon this process replaces in an upgrade: its pid, the FUSE descriptor it passed, and the
    socket to tell it "ready" on."""

    pid: int
    fuse_fd: int
    control: socket.socket


def predecessor(environ: dict[str, str] | None = None) -> Predecessor | None:
    """The upgrade this process was started for, if any (the variable is consumed)."""
    env = os.environ if environ is None else environ
    raw = env.pop(ENVIRONMENT, None)
    if not raw:
        return None
    try:
        fields = dict(part.split("=", 1) for part in raw.split(","))
        pid, fuse_fd, control = int(fields["pid"]), int(fields["fuse"]), int(fields["control"])
        os.set_inheritable(fuse_fd, False)
        return Predecessor(pid, fuse_fd, socket.socket(fileno=control))
    except (ValueError, KeyError, OSError) as e:
        log.error("ignoring %s=%r: %s", ENVIRONMENT, raw, e)
        return None


async def replace(old: Predecessor) -> None:
    """Tell the old daemon we are ready, then wait for it to exit (killing it if it hangs)."""
    sdnotify.notify({"MAINPID": str(os.getpid())})
    try:
        old.control.sendall(READY)
    except OSError as e:
        log.warning("cannot tell the old daemon (pid %d) that its successor is ready: %s", old.pid, e)
    old.control.close()
    waited = await trio.to_thread.run_sync(_wait_exit, old.pid, PREDECESSOR_TIMEOUT)
    log.debug("old daemon (pid %d) exited", old.pid)
    if not waited:
        log.error("old daemon (pid %d) still running after %.0f s: killing it", old.pid, PREDECESSOR_TIMEOUT)
        try:
            os.kill(old.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await trio.to_thread.run_sync(_wait_exit, old.pid, 10.0)


def _wait_exit(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def take(
    root: Path, mountpoint: Path, old: Predecessor | None = None
) -> tuple[Connection | None, str | None]:
    """The live FUSE connection to serve, from an upgrading predecessor or the service manager (None
    on a first start), and why the previous daemon's connection was lost, if it was (logged)."""
    handed = [(FDNAME, old.fuse_fd)] if old is not None else []
    handed += sdnotify.listen_fds()
    fuse_fds = [fd for name, fd in handed if name == FDNAME]
    for name, fd in handed:
        if name != FDNAME:
            log.warning("closing descriptor %d (%s) handed over: not lazysnap's", fd, name)
            os.close(fd)
    if not fuse_fds:
        if mount_device(mountpoint) is None:
            return None, None
        return None, _lost(f"no FUSE descriptor was kept for the mount at {mountpoint} (no holder)")
    fd, extra = fuse_fds[0], fuse_fds[1:]
    for other in extra:  # copies of the same connection (a holder that does not deduplicate)
        os.close(other)
    try:
        session = json.loads((root / SESSION_FILE).read_text())
        device, init = session["device"], bytes.fromhex(session["init"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, _lost(f"the FUSE session record {root / SESSION_FILE} is unusable ({e})", fd)
    conn = Connection(fd, init)
    if not conn.alive():
        return None, _lost("the kernel ended the FUSE connection (aborted, or the mount was removed)", fd)
    if mount_device(mountpoint) != device:
        return None, _lost(f"the FUSE connection handed over is not the mount at {mountpoint}", fd)
    log.info("taking over the FUSE mount %s (device %s)", mountpoint, device)
    return conn, None


def _lost(reason: str, fd: int | None = None) -> str:
    log.error(
        "%s: containers still running on lazily loaded layers have lost their files "
        "(transport endpoint is not connected) and must be restarted; new containers work",
        reason,
    )
    if fd is not None:
        os.close(fd)
    forget()
    return reason


def keep(root: Path, conn: Connection, device: str | None) -> bool:
    """Record the session and give the service manager a copy of the descriptor; whether one took it
    (then a stop leaves the mount to the next daemon)."""
    record = json.dumps({"device": device, "init": conn.init.hex()})
    tmp = root / f".{SESSION_FILE}.tmp"
    tmp.write_text(record)
    os.replace(tmp, root / SESSION_FILE)
    kept = sdnotify.notify({"FDSTORE": "1", "FDNAME": FDNAME}, [conn.fd])
    if kept:
        log.info("FUSE connection handed to the service manager: it survives restarts of this daemon")
    return kept


def held() -> bool:
    """Whether a service manager may hold our FUSE descriptor (then a stop leaves the mount to the next
    daemon). It is the one that handed the descriptor over, or systemd with FileDescriptorStoreMax=;
    a manager that silently keeps nothing costs only what a stop without a holder costs anyway."""
    return bool(os.environ.get(sdnotify.NOTIFY_SOCKET))


def forget() -> None:
    """The mount goes for good: the service manager need not keep the descriptor any more."""
    sdnotify.notify({"FDSTOREREMOVE": "1", "FDNAME": FDNAME})


def successor_command() -> list[str]:
    """The command that started this daemon, to start its successor: the installed (maybe newer) one."""
    script = sys.argv[0]
    if os.access(script, os.X_OK) and not script.endswith(".py"):
        return [script, *sys.argv[1:]]
    return [sys.executable, "-m", "snapshotter.cli", *sys.argv[1:]]


async def start_successor(conn: Connection) -> int | None:
    """Start the successor with the FUSE descriptor and wait until it is ready to take over: its pid,
    or None when it failed (the reason is logged; this daemon goes on serving)."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env[ENVIRONMENT] = f"pid={os.getpid()},fuse={conn.fd},control={theirs.fileno()}"
    for key in (sdnotify.LISTEN_FDS, sdnotify.LISTEN_FDNAMES, sdnotify.LISTEN_PID):
        env.pop(key, None)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(successor_command(), env=env, pass_fds=(conn.fd, theirs.fileno()))
    except OSError as e:
        log.error("upgrade: cannot start the successor: %s", e)
        ours.close()
        return None
    finally:
        theirs.close()
    ours.setblocking(False)
    answer = b""
    with trio.move_on_after(SUCCESSOR_TIMEOUT):
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        while not answer.endswith(b"\n"):
            chunk = await stream.receive_some(64)
            if not chunk:
                break
            answer += chunk
    if answer == READY:
        log.info(
            "upgrade: successor pid %d ready after %.2f s: handing over",
            proc.pid,
            time.monotonic() - started,
        )
        return proc.pid  # `ours` stays open until we exit: the successor watches our pid, not it
    code = proc.poll()
    if code is None:
        proc.kill()
        code = proc.wait()
    sdnotify.notify({"MAINPID": str(os.getpid())})  # it may have announced itself already: we still are
    log.error("upgrade abandoned: the successor did not become ready (exit %s); still serving", code)
    return None
