"""The daemon's gRPC servers on unix sockets (containerd's snapshots API, the CRI proxy), opened one way:
the path checked first (its directory created 0700, a stale socket file replaced, a live one or a
non-socket refused), the socket born 0600, and at stop removed only while it is still ours (a successor
may already listen on the same path)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path

import grpc

from snapshotter.errors import StartupError

log = logging.getLogger("lazysnap.daemon")

MAX_MESSAGE = 16 << 20  # each way: containerd's and kubelet's clients allow 16 MiB


def prepare_socket(address: Path, setting: str = "--address") -> None:
    """Create the socket's directory; remove a stale socket file; refuse a live one. `setting` names
    where the path comes from, for the message."""
    parent = address.parent
    if not parent.is_dir():
        try:
            parent.mkdir(mode=0o700, parents=True)
        except OSError as e:
            raise StartupError(f"cannot create the socket directory {parent}: {e.strerror}") from None
    try:
        st = address.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{address} exists and is not a socket; remove it or choose another {setting}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(address))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise StartupError(f"cannot check whether {address} is in use: {e.strerror}") from None
        else:
            raise StartupError(
                f"socket {address} is in use by a live server; stop it or choose another {setting}"
            )
    log.info("replacing stale socket %s (nothing listens on it)", address)
    address.unlink()


class UnixServer:
    """A started grpc.Server on `address`: `register(server)` adds the services (or `handlers`)."""

    def __init__(
        self,
        address: Path,
        *,
        workers: int,
        thread_prefix: str,
        setting: str = "--address",
        register: Callable[[grpc.Server], None] | None = None,
        handlers: Sequence[grpc.GenericRpcHandler] = (),
    ):
        self.address = Path(address)
        prepare_socket(self.address, setting)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_prefix),
            handlers=list(handlers) or None,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        if register is not None:
            register(server)
        old_umask = os.umask(0o177)  # the socket is born 0600
        try:
            server.add_insecure_port(f"unix:{self.address}")
        except RuntimeError as e:
            raise StartupError(f"cannot listen on {self.address} ({setting}): {e}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.address, 0o600)
        self._ino = self.address.stat().st_ino
        server.start()
        self.server = server

    def stop(self, grace: float) -> None:
        """Stop accepting calls, give those in flight `grace` seconds, remove the socket if ours."""
        self.server.stop(grace).wait()
        try:
            if self.address.stat().st_ino == self._ino:
                self.address.unlink()
        except FileNotFoundError:
            pass
