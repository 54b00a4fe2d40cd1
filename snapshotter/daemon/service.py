"""The gRPC `containerd.services.snapshots.v1.Snapshots` service, over the snapshotter (snapshots.py).

Each RPC translates protobuf to Python and back, maps snapshot errors to the status codes containerd's
errdefs expects (`STATUS_OF`: InvalidArgument, NotFound, AlreadyExists, FailedPrecondition; anything
unexpected is Unknown and logged with its traceback), counts it by method and code (prometheus_client
counters: exact when the 16 gRPC threads count at once), and logs the request and its outcome with timing
at debug level. `List` streams its results in batches, as containerd's own service does.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import empty_pb2
from prometheus_client import Counter

from snapshotter import failpoints
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from snapshotter.api.containerd.types import mount_pb2
from snapshotter.daemon.filters import FilterError, parse_all
from snapshotter.daemon.overlay import Mount
from snapshotter.daemon.snapshots import Snapshotter
from snapshotter.daemon.store import Record
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SnapshotError

log = logging.getLogger("lazysnap.rpc")

LIST_BATCH = 100  # infos per List message, as containerd's service sends them
LIST_BATCH_BYTES = 1 << 20  # and well under gRPC's 4 MiB default message limit


def _fill_info(pb: snapshots_pb2.Info, rec: Record) -> snapshots_pb2.Info:
    pb.name = rec.key
    pb.parent = rec.parent
    pb.kind = rec.kind
    pb.created_at.seconds, pb.created_at.nanos = divmod(rec.created_ns, 1_000_000_000)
    pb.updated_at.seconds, pb.updated_at.nanos = divmod(rec.updated_ns, 1_000_000_000)
    if rec.labels:
        pb.labels.update(rec.labels)
    return pb


def _info_pb(info: Record) -> snapshots_pb2.Info:
    return _fill_info(snapshots_pb2.Info(), info)


def _mounts_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _request_fields(request: Any) -> dict[str, object]:
    fields: dict[str, object] = {}
    for descriptor, value in request.ListFields():
        name = descriptor.name
        if name == "snapshotter":
            continue
        if name == "info":
            fields["name"] = value.name
            if value.labels:
                fields["labels"] = dict(value.labels)
        elif name == "update_mask":
            fields["paths"] = list(value.paths)
        elif name == "labels":
            fields["labels"] = dict(value)
        elif name == "filters":
            fields["filters"] = list(value)
        else:
            fields[name] = value
    return fields


#: The status containerd's errdefs expects for each snapshot error (any other: UNKNOWN).
STATUS_OF: dict[type[SnapshotError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}

#: Calls by (rpc, code) and seconds by rpc; registered in no registry: the daemon's metrics collector
#: exports them (snapshotter.daemon.metrics).
RPC_CALLS = Counter("lazysnap_rpcs", "Snapshots RPCs by method and code", ["rpc", "code"], registry=None)
RPC_SECONDS = Counter("lazysnap_rpc_seconds", "Time spent in RPCs", ["rpc"], registry=None)


def status_of(e: SnapshotError) -> grpc.StatusCode:
    return next((code for kind, code in STATUS_OF.items() if isinstance(e, kind)), grpc.StatusCode.UNKNOWN)


def _log(rpc: str, request: Any, start: float, code: str, **extra: object) -> None:
    RPC_CALLS.labels(rpc, code).inc()
    RPC_SECONDS.labels(rpc).inc(time.perf_counter() - start)
    if log.isEnabledFor(logging.DEBUG):
        fields = {"rpc": rpc, **_request_fields(request), "code": code, **extra}
        fields["ms"] = (time.perf_counter() - start) * 1000
        log.debug("rpc", extra={"fields": fields})


def _unary(method: Callable[..., Any]) -> Callable[..., Any]:
    """Log, time and map errors of a unary RPC handler."""
    rpc = method.__name__

    @functools.wraps(method)
    def handler(self: SnapshotsService, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            failpoints.hit(f"rpc.{rpc}")
            response = method(self, request, context)
        except SnapshotError as e:
            code = status_of(e)
            _log(rpc, request, start, code.name, error=str(e))
            context.abort(code, str(e))
        except Exception as e:
            log.exception("rpc failed", extra={"fields": {"rpc": rpc, **_request_fields(request)}})
            context.abort(grpc.StatusCode.UNKNOWN, f"{rpc} failed unexpectedly: {e}")
        _log(rpc, request, start, "OK")
        return response

    return handler


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter):
        self.snapshotter = snapshotter

    @_unary
    def Prepare(self, request, context):
        mounts = self.snapshotter.prepare(request.key, request.parent, request.labels)
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    @_unary
    def View(self, request, context):
        mounts = self.snapshotter.view(request.key, request.parent, request.labels)
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    @_unary
    def Mounts(self, request, context):
        return snapshots_pb2.MountsResponse(mounts=_mounts_pb(self.snapshotter.mounts(request.key)))

    @_unary
    def Commit(self, request, context):
        self.snapshotter.commit(request.name, request.key, request.labels)
        return empty_pb2.Empty()

    @_unary
    def Remove(self, request, context):
        self.snapshotter.remove(request.key)
        return empty_pb2.Empty()

    @_unary
    def Stat(self, request, context):
        return snapshots_pb2.StatSnapshotResponse(info=_info_pb(self.snapshotter.stat(request.key)))

    @_unary
    def Update(self, request, context):
        info = self.snapshotter.update(
            request.info.name, request.info.labels, list(request.update_mask.paths)
        )
        return snapshots_pb2.UpdateSnapshotResponse(info=_info_pb(info))

    @_unary
    def Usage(self, request, context):
        usage = self.snapshotter.usage(request.key)
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_unary
    def Cleanup(self, request, context):
        removed = self.snapshotter.cleanup()
        if removed:
            log.info("cleanup removed orphaned directories", extra={"fields": {"dirs": len(removed)}})
        return empty_pb2.Empty()

    def List(self, request, context) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        start = time.perf_counter()
        try:
            failpoints.hit("rpc.List")
            filters = parse_all(request.filters)
        except FilterError as e:
            _log("List", request, start, "INVALID_ARGUMENT", error=str(e))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot list snapshots: {e}")
        count = 0
        batch = snapshots_pb2.ListSnapshotsResponse()
        size = 0
        try:
            for info in self.snapshotter.list(filters):
                _fill_info(batch.info.add(), info)
                count += 1
                size += 64 + len(info.key) + len(info.parent)
                if info.labels:
                    size += sum(len(k) + len(v) + 8 for k, v in info.labels.items())
                if len(batch.info) >= LIST_BATCH or size >= LIST_BATCH_BYTES:
                    yield batch
                    batch, size = snapshots_pb2.ListSnapshotsResponse(), 0
            if batch.info:
                yield batch
        except Exception as e:
            log.exception("rpc failed", extra={"fields": {"rpc": "List", **_request_fields(request)}})
            context.abort(grpc.StatusCode.UNKNOWN, f"List failed unexpectedly: {e}")
        _log("List", request, start, "OK", count=count)
