"""RPC metrics of `lazysnap serve` are exact when many callers hit the gRPC thread pool at once: 50
concurrent callers, every call counted once under its method and status code."""

from __future__ import annotations

import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from snapshotter.daemon import service
from snapshotter.daemon.snapshots import Snapshotter

CALLERS = 50
CALLS = 40  # per caller


def _count(registry: CollectorRegistry, rpc: str, code: str) -> float:
    return registry.get_sample_value("lazysnap_rpcs_total", {"rpc": rpc, "code": code}) or 0.0


@pytest.fixture
def stub(tmp_path: Path):
    snapshotter = Snapshotter(tmp_path / "root", index_off=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(service.SnapshotsService(snapshotter), server)
    socket = tmp_path / "s.sock"
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    channel = grpc.insecure_channel(f"unix://{socket}")
    yield snapshots_pb2_grpc.SnapshotsStub(channel)
    channel.close()
    server.stop(None)
    snapshotter.close()


def test_50_concurrent_callers_are_counted_exactly(stub) -> None:
    registry = CollectorRegistry()
    registry.register(service.RPC_CALLS)
    before = _count(registry, "Stat", "NOT_FOUND"), _count(registry, "List", "OK")
    start = threading.Barrier(CALLERS)
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        try:
            start.wait()
            for n in range(CALLS):
                if n % 2:
                    list(stub.List(pb.ListSnapshotsRequest(snapshotter="lazysnap")))
                    continue
                with pytest.raises(grpc.RpcError) as e:
                    stub.Stat(pb.StatSnapshotRequest(snapshotter="lazysnap", key=f"missing-{i}-{n}"))
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
        except BaseException as e:  # reported below, not lost in a thread
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a non-atomic += loses counts
    try:
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    assert _count(registry, "Stat", "NOT_FOUND") - before[0] == CALLERS * CALLS // 2
    assert _count(registry, "List", "OK") - before[1] == CALLERS * CALLS // 2
