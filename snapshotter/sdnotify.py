"""systemd's service protocols, both sides, in one place.

- A service tells its manager about itself with datagrams to ``$NOTIFY_SOCKET``: newline-separated
  ``KEY=VALUE`` lines (``READY=1``, ``STOPPING=1``, ``MAINPID=<pid>``), and hands it descriptors to keep
  with ``FDSTORE=1`` + ``FDNAME=<name>`` and the descriptors as SCM_RIGHTS (``FDSTOREREMOVE=1`` +
  ``FDNAME=`` drops them again).
- The manager hands kept descriptors to the next process it starts as fds 3, 4, ... with
  ``LISTEN_FDS=<n>``, ``LISTEN_FDNAMES=<name>:<name>...`` and ``LISTEN_PID=<that process>``.

`lazysnap serve` speaks the service side to systemd, or to `lazysnap supervise` (the holder for hosts
without systemd, `snapshotter.supervise`), which speaks the manager side with the same functions here.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Mapping, Sequence

log = logging.getLogger("lazysnap.sdnotify")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID = "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"
LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first descriptor handed over
MAX_DATAGRAM = 4096  # a notification is a few short lines (systemd reads at most PIPE_BUF)
MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD


def valid_fdname(name: str) -> bool:
    """systemd's rule for FDNAME: 1-255 printable ASCII characters, no ':' (the list separator)."""
    return 0 < len(name) <= 255 and all(0x20 < ord(c) < 0x7F for c in name) and ":" not in name


def format_message(fields: Mapping[str, str]) -> bytes:
    for key, value in fields.items():
        if "\n" in key or "=" in key or "\n" in str(value):
            raise ValueError(f"notification field {key!r} cannot hold a newline or '='")
    return "".join(f"{k}={v}\n" for k, v in fields.items()).encode()


def parse_message(datagram: bytes) -> dict[str, str]:
    """The fields of a notification; lines without '=' are ignored, as systemd does."""
    fields = {}
    for line in datagram.decode("utf-8", errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


def _address(raw: str) -> str | bytes:
    return "\0" + raw[1:] if raw.startswith("@") else raw  # a leading @ names an abstract socket


def notify(fields: Mapping[str, str], fds: Sequence[int] = ()) -> bool:
    """Send one notification (with `fds` as SCM_RIGHTS) to $NOTIFY_SOCKET. False when no manager
    watches (no NOTIFY_SOCKET) or the send failed (logged): a manager is never required."""
    raw = os.environ.get(NOTIFY_SOCKET)
    if not raw:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            s.sendmsg([format_message(fields)], rights, 0, _address(raw))
        except OSError as e:
            log.warning("cannot notify the service manager (%s): %s", raw.lstrip("@\0"), e)
            return False
    return True


def listen_fds(environ: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """The descriptors the manager handed this process, as (name, fd), fd from 3 up, each made
    close-on-exec; the LISTEN_* variables are removed so that children do not take them for theirs.
    Empty when they were meant for another process (LISTEN_PID) or are malformed (logged)."""
    env = os.environ if environ is None else environ
    count, names, pid = env.pop(LISTEN_FDS, None), env.pop(LISTEN_FDNAMES, ""), env.pop(LISTEN_PID, None)
    if count is None:
        return []
    try:
        n = int(count)
        if pid is not None and int(pid) != os.getpid():
            return []
    except ValueError:
        log.warning("ignoring malformed %s=%r %s=%r", LISTEN_FDS, count, LISTEN_PID, pid)
        return []
    labels = names.split(":") if names else []
    out = []
    for i in range(max(n, 0)):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            log.warning("%s says %d descriptors, but fd %d is not open", LISTEN_FDS, n, fd)
            continue
        out.append((labels[i] if i < len(labels) else "unknown", fd))
    return out


def listen_environment(names: Sequence[str], pid: int) -> dict[str, str]:
    """What the manager sets for a process `pid` it hands descriptors named `names` (at 3, 4, ...)."""
    return {LISTEN_FDS: str(len(names)), LISTEN_FDNAMES: ":".join(names), LISTEN_PID: str(pid)}
