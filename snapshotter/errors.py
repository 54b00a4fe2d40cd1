"""Errors of the snapshotter, each tied to the gRPC status code containerd maps it from (errdefs).

Every error says what failed, for which snapshot key, and what to do; the service turns them into
statuses with :attr:`SnapshotError.code`, so containerd sees NotFound, AlreadyExists, ... exactly as
from its own snapshotters.
"""

from __future__ import annotations

import grpc


class SnapshotError(Exception):
    """A request that cannot be served; `code` is the gRPC status containerd expects for it."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(SnapshotError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SnapshotError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnapshotError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SnapshotError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class StartupError(Exception):
    """`lazysnap serve` cannot start; the message says why and what to fix."""
