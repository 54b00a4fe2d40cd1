"""Bad requests to a real `lazysnap serve`: each gets containerd's status code and a message naming the
key and what to do, and none changes the store."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.harness.snapshotter import Lazysnap, SnapshotsClient

C = grpc.StatusCode


def status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def state(snapshotter: Lazysnap) -> tuple:
    client = snapshotter.client()
    infos = sorted((i.SerializeToString(deterministic=True) for i in client.list()), key=bytes)
    return infos, snapshotter.snapshot_dirs()


@pytest.fixture
def populated(snapshotter: Lazysnap) -> SnapshotsClient:
    c = snapshotter.client()
    c.prepare("ns/1/extract-1 sha256:base", "", {"containerd.io/snapshot.ref": "sha256:base"})
    c.commit("ns/2/sha256:base", "ns/1/extract-1 sha256:base")
    c.prepare("ns/3/container", "ns/2/sha256:base")
    c.view("ns/4/view", "ns/2/sha256:base")
    return c


def test_bad_requests_get_containerd_codes_and_leave_the_store_intact(
    snapshotter: Lazysnap, populated: SnapshotsClient
) -> None:
    c = populated
    before = state(snapshotter)
    base, active, view = "ns/2/sha256:base", "ns/3/container", "ns/4/view"
    info = pb.Info(name=base)
    cases: list[tuple[Callable[[], object], grpc.StatusCode, list[str]]] = [
        # unknown keys
        (lambda: c.stat("ns/9/nope"), C.NOT_FOUND, ["ns/9/nope", "does not exist"]),
        (lambda: c.mounts("ns/9/nope"), C.NOT_FOUND, ["ns/9/nope"]),
        (lambda: c.usage("ns/9/nope"), C.NOT_FOUND, ["ns/9/nope"]),
        (lambda: c.remove("ns/9/nope"), C.NOT_FOUND, ["ns/9/nope"]),
        (lambda: c.update(pb.Info(name="ns/9/nope")), C.NOT_FOUND, ["ns/9/nope"]),
        (lambda: c.prepare("ns/9/x", "ns/9/no-parent"), C.NOT_FOUND, ["ns/9/no-parent", "parent"]),
        # duplicate keys
        (lambda: c.prepare(active, base), C.ALREADY_EXISTS, [active, "already exists"]),
        (lambda: c.view(active, base), C.ALREADY_EXISTS, [active]),
        (lambda: c.prepare(base), C.ALREADY_EXISTS, [base]),
        # commits
        (lambda: c.commit("ns/9/c", "ns/9/missing"), C.NOT_FOUND, ["ns/9/missing"]),
        (lambda: c.commit("ns/9/c", base), C.FAILED_PRECONDITION, [base, "only active snapshots"]),
        (lambda: c.commit("ns/9/c", view), C.FAILED_PRECONDITION, [view, "view"]),
        (lambda: c.commit(base, active), C.ALREADY_EXISTS, [base, "already exists"]),
        (lambda: c.commit("", active), C.INVALID_ARGUMENT, ["name is empty"]),
        # chains
        (
            lambda: c.prepare("ns/9/x", active),
            C.INVALID_ARGUMENT,
            [active, "not committed", "commit it first"],
        ),
        (lambda: c.remove(base), C.FAILED_PRECONDITION, [base, "remove its children first", active]),
        (lambda: c.mounts(base), C.FAILED_PRECONDITION, [base, "committed"]),
        (lambda: c.prepare(""), C.INVALID_ARGUMENT, ["key is empty"]),
        # updates of immutable fields
        (lambda: c.update(info, "parent"), C.INVALID_ARGUMENT, ["'parent'", "labels"]),
        (lambda: c.update(info, "kind"), C.INVALID_ARGUMENT, ["'kind'"]),
        (lambda: c.update(info, "name"), C.INVALID_ARGUMENT, ["'name'"]),
        # malformed filters
        (lambda: c.list("name=="), C.INVALID_ARGUMENT, ["invalid filter", "name=="]),
        (lambda: c.list("name==a b"), C.INVALID_ARGUMENT, ["unexpected input"]),
        (lambda: c.list('labels."unterminated==x'), C.INVALID_ARGUMENT, ["invalid filter"]),
        (lambda: c.list("kind=~active"), C.INVALID_ARGUMENT, ["unsupported operator"]),
        (lambda: c.list("name~=(unclosed"), C.INVALID_ARGUMENT, ["regular expression"]),
        (lambda: c.list("kind==view", "@bad"), C.INVALID_ARGUMENT, ["@bad"]),
        # absurd label sizes
        (lambda: c.prepare("ns/9/x", base, {"k": "v" * 4096}), C.INVALID_ARGUMENT, ["4096", "shorten"]),
        (lambda: c.prepare("ns/9/x", base, {"k" * 5000: ""}), C.INVALID_ARGUMENT, ["4096"]),
        (lambda: c.view("ns/9/x", base, {"big": "x" * (5 << 20)}), C.INVALID_ARGUMENT, ["4096"]),
        (lambda: c.commit("ns/9/c", active, {"k": "v" * 10000}), C.INVALID_ARGUMENT, [active, "4096"]),
        (
            lambda: c.update(pb.Info(name=base, labels={"k": "v" * 5000}), "labels.k"),
            C.INVALID_ARGUMENT,
            [base, "4096"],
        ),
    ]
    for call, code, words in cases:
        got_code, message = status(call)
        assert got_code == code, (words, got_code, message)
        for word in words:
            assert word in message, (word, message)
    assert state(snapshotter) == before
    c.cleanup()
    assert state(snapshotter) == before
    snapshotter.assert_consistent()

    # the failures are in the debug log with their codes; the daemon serves on
    log = snapshotter.log()
    assert "rpc=Remove key=ns/2/sha256:base code=FAILED_PRECONDITION" in log
    assert 'rpc=Stat key=ns/9/nope code=NOT_FOUND error="cannot stat' in log
    assert c.stat(base).kind == pb.COMMITTED


def test_labels_at_the_limit_are_accepted(snapshotter: Lazysnap) -> None:
    c = snapshotter.client()
    key = "k" * 96
    c.prepare("a", "", {key: "v" * (4096 - len(key)), "empty": ""})
    assert dict(c.stat("a").labels) == {key: "v" * (4096 - len(key))}  # empty values are dropped
