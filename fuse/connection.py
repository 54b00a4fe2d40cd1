"""A FUSE connection that outlives the process serving it.

The kernel keeps a FUSE mount alive, with its readers waiting rather than failing, for as long as any
process holds a descriptor of its /dev/fuse open file description. So lazysnap opens /dev/fuse and
mounts it itself (mount(2), no fusermount), reads the kernel's FUSE_INIT request, and can then:
- serve the connection with pyfuse3 (`serve_with`): libfuse is given a socket pair that delivers that
  INIT, and when libfuse calls `init()` the pair's end is replaced by the real /dev/fuse descriptor
  (dup2), so libfuse's INIT reply and everything after go to the kernel;
- hand a copy of the descriptor to a holder (systemd's descriptor store or `lazysnap supervise`) and,
  in a new process after a crash or restart, adopt it: the stored INIT is replayed to libfuse under a
  unique the kernel never uses (its reply is refused with ENOENT, harmlessly) and FUSE_NOTIFY_RESEND
  asks the kernel to queue again every request the dead process had read but not answered.
libfuse answers EIO to everything before an INIT, and the kernel never sends a second one: hence the
replay. Verified facts behind each step: shared/reference/fuse-restart-facts.md.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from .syscalls import MS_NODEV, MS_NOSUID, MS_RDONLY
from .syscalls import mount as mount_syscall

FUSE_DEVICE = "/dev/fuse"
IN_HEADER = struct.Struct("<IIQQIIII")  # fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, pad
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header: len, error, unique
FUSE_INIT = 26
FUSE_NOTIFY_RESEND = 7  # protocol 7.40, Linux 6.9: requests read but not answered are queued again
RESEND_MINOR = 40  # the kernel's protocol minor from which it takes FUSE_NOTIFY_RESEND
INIT_IN = struct.Struct("<II")  # fuse_init_in starts with the kernel's protocol major and minor
REPLAY_UNIQUE = 1 << 62  # the kernel's request ids count up from 0: never this one
READ_SIZE = (1 << 20) + 4096  # the kernel refuses reads smaller than max_write plus the headers
_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV}


@dataclass
class Connection:
    """One FUSE connection: our descriptor of its /dev/fuse file description and the kernel's INIT."""

    fd: int
    init: bytes

    @property
    def resend_supported(self) -> bool:
        """Whether the kernel takes FUSE_NOTIFY_RESEND (its INIT offers protocol 7.40 or later). Without
        it, a request a dead server had read is never answered: its reader stays blocked."""
        _major, minor = INIT_IN.unpack_from(self.init, IN_HEADER.size)
        return minor >= RESEND_MINOR

    def alive(self) -> bool:
        """False once the kernel has aborted or ended the connection (the device then reports POLLERR)."""
        return connection_alive(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def connection_alive(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    try:
        events = p.poll(0)
    except OSError:
        return False
    return not any(mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _fd, mask in events)


def mount(mountpoint: Path | str, options: tuple[str, ...]) -> Connection:
    """Open /dev/fuse, mount it at `mountpoint` with `options` (libfuse's names: fsname=, subtype=, ro,
    nosuid, nodev, default_permissions, allow_other) and read the kernel's INIT. Raises OSError."""
    source, fstype, flags, data = "fuse", "fuse", 0, []
    for opt in options:
        key, _, value = opt.partition("=")
        if key == "fsname":
            source = value
        elif key == "subtype":
            fstype = f"fuse.{value}"
        elif key in _FLAGS:
            flags |= _FLAGS[key]
        else:
            data.append(opt)
    fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        data = [f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}", *data]
        mount_syscall(source, mountpoint, fstype, flags, ",".join(data))
        init = os.read(fd, READ_SIZE)  # queued by the mount itself
        _check_init(init)
    except BaseException:
        os.close(fd)
        raise
    return Connection(fd, init)


def _check_init(init: bytes) -> None:
    if len(init) < IN_HEADER.size + INIT_IN.size:
        raise OSError(errno.EPROTO, f"short FUSE_INIT request ({len(init)} bytes)")
    length, opcode, *_ = IN_HEADER.unpack_from(init)
    if opcode != FUSE_INIT or length != len(init):
        raise OSError(errno.EPROTO, f"expected FUSE_INIT from the kernel, got opcode {opcode}")


def replayed(init: bytes) -> bytes:
    """The stored INIT under REPLAY_UNIQUE, for a process adopting a live connection."""
    _check_init(init)
    header = list(IN_HEADER.unpack_from(init))
    header[2] = REPLAY_UNIQUE
    return IN_HEADER.pack(*header) + init[IN_HEADER.size :]


class Feeder:
    """The socket pair libfuse starts on: `path` (/dev/fd/N) holds one INIT request; `switch()`, called
    from the filesystem's init(), puts the real connection in its place (and asks for a resend)."""

    def __init__(self, conn: Connection, *, adopting: bool):
        self.conn, self.adopting = conn, adopting
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.send(replayed(conn.init) if adopting else conn.init)
        ours.close()  # the INIT stays queued in `theirs`
        self._fd = theirs.detach()  # libfuse's from now on: it closes it in fuse_session_destroy
        self.switched = False

    @property
    def path(self) -> str:
        return f"/dev/fd/{self._fd}"

    def switch(self) -> None:
        os.dup2(self.conn.fd, self._fd, inheritable=False)
        self.switched = True
        if self.adopting and self.conn.resend_supported:  # never on a new mount: INIT is in flight
            resend(self._fd)


def resend(fd: int) -> bool:
    """FUSE_NOTIFY_RESEND: requests a dead server read but never answered are delivered again. False on
    kernels without it (EINVAL, before Linux 6.9): then those readers stay blocked (state D)."""
    try:
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True
