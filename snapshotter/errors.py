"""The errors every command shares: a bad setting (ConfigError), a process that cannot start
(StartupError), and the snapshot errors containerd tells apart (errdefs), without any transport: the
gRPC service maps each to its status code (`snapshotter.daemon.service.STATUS_OF`).

Every error says what failed, for which snapshot key, file or setting, and what to do.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration file, value or flag; the message names the file, line and key."""


class StartupError(Exception):
    """A daemon (`serve`, `convertd`) cannot start; the message says why and what to fix."""


class SnapshotError(Exception):
    """A snapshot request that cannot be served (containerd sees it as an unknown error)."""


class InvalidArgument(SnapshotError):
    pass


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass
