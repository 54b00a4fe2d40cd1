"""The snapshot store and the snapshotter's operations over it, without gRPC: containerd's error
semantics, transactions, crash safety (a real SIGKILL at each step, in a child process, then a restart),
injected errors between steps, and concurrent writers from threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from snapshotter import failpoints
from snapshotter.daemon.filters import parse_all
from snapshotter.daemon.snapshots import MAX_LABEL_BYTES, Snapshotter
from snapshotter.daemon.store import Kind, Store
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture
def root(workdir: Path) -> Path:
    return workdir / "root"


@pytest.fixture
def sn(root: Path):
    s = Snapshotter(root, index_off=True)
    yield s
    s.close()
    failpoints.disable_all()


def layout_is_consistent(s: Snapshotter) -> None:
    """Every record has its directory, every directory has its record."""
    ids = s.store.ids()
    assert s.check() == []
    assert s.layout.orphans(ids) == []


# --- semantics -----------------------------------------------------------------------------------


def test_prepare_commit_stat_remove(sn: Snapshotter) -> None:
    m = sn.prepare("ns/1/extract-1 sha256:aa", "", {"containerd.io/snapshot.ref": "sha256:aa"})
    assert [(x.type, x.options) for x in m] == [("bind", ("rw", "rbind"))]
    fs = Path(m[0].source)
    assert fs.is_dir() and oct(fs.stat().st_mode & 0o777) == "0o755"
    assert (fs.parent / "work").is_dir() and oct((fs.parent / "work").stat().st_mode & 0o777) == "0o711"
    (fs / "data").write_bytes(b"x" * 10000)
    sn.commit("ns/2/sha256:aa", "ns/1/extract-1 sha256:aa", {"l": "1"})
    info = sn.stat("ns/2/sha256:aa")
    assert (info.kind, info.parent, dict(info.labels)) == (Kind.COMMITTED, "", {"l": "1"})
    assert info.created_ns == info.updated_ns
    usage = sn.usage("ns/2/sha256:aa")
    assert usage.inodes == 2 and usage.size >= 10000
    with pytest.raises(NotFound):
        sn.stat("ns/1/extract-1 sha256:aa")
    sn.remove("ns/2/sha256:aa")
    assert not fs.parent.exists()
    assert list(sn.list(parse_all([]))) == []
    layout_is_consistent(sn)


def test_errors_follow_containerd(sn: Snapshotter) -> None:
    sn.prepare("a", "")
    sn.view("v", "")
    with pytest.raises(AlreadyExists):
        sn.prepare("a", "")
    with pytest.raises(AlreadyExists):
        sn.view("a", "")
    with pytest.raises(NotFound):
        sn.prepare("b", "missing")
    with pytest.raises(InvalidArgument, match="not committed"):
        sn.prepare("b", "a")  # a parent must be committed
    with pytest.raises(InvalidArgument):
        sn.prepare("", "")
    with pytest.raises(NotFound):
        sn.commit("c", "missing")
    with pytest.raises(FailedPrecondition):
        sn.commit("c", "v")  # a view cannot be committed
    sn.commit("c", "a")
    with pytest.raises(NotFound):
        sn.commit("c2", "a")  # the key is gone once committed
    sn.prepare("a2", "c")
    with pytest.raises(AlreadyExists):
        sn.commit("c", "a2")
    with pytest.raises(FailedPrecondition):
        sn.commit("c3", "c")  # committed: not active
    with pytest.raises(FailedPrecondition, match="remove its children first"):
        sn.remove("c")
    with pytest.raises(FailedPrecondition):
        sn.mounts("c")
    with pytest.raises(NotFound):
        sn.mounts("nope")
    with pytest.raises(NotFound):
        sn.remove("nope")
    with pytest.raises(NotFound):
        sn.usage("nope")
    with pytest.raises(NotFound):
        sn.update("nope", {}, [])
    with pytest.raises(InvalidArgument, match="parent"):
        sn.update("c", {}, ["parent"])
    assert sorted(i.key for i in sn.list(parse_all([]))) == ["a2", "c", "v"]
    layout_is_consistent(sn)


def test_labels_limits_and_empty_values(sn: Snapshotter) -> None:
    ok = {"k": "v" * (MAX_LABEL_BYTES - 1), "empty": ""}
    sn.prepare("a", "", ok)
    assert dict(sn.stat("a").labels) == {"k": ok["k"]}  # empty values are not stored, as in containerd
    with pytest.raises(InvalidArgument, match="4096"):
        sn.prepare("b", "", {"k": "v" * MAX_LABEL_BYTES})
    with pytest.raises(InvalidArgument):
        sn.commit("c", "a", {"ü" * 2049: ""})  # bytes, not characters
    with pytest.raises(InvalidArgument):
        sn.update("a", {"x": "y" * 5000}, ["labels.x"])
    assert sn.store.get("b") is None and not sn.layout.orphans(sn.store.ids())


def test_update_field_paths(sn: Snapshotter) -> None:
    sn.prepare("a", "", {"l1": "v1", "l2": "v2", "l3": "v3"})
    before = sn.stat("a")
    info = sn.update("a", {"l1": "new", "l4": "v4"}, ["labels.l1", "labels.l2"])
    assert dict(info.labels) == {"l1": "new", "l3": "v3"}
    assert info.created_ns == before.created_ns and info.updated_ns > before.updated_ns
    assert dict(sn.update("a", {"x": "1"}, []).labels) == {"x": "1"}
    assert dict(sn.update("a", {"y": "2"}, ["labels"]).labels) == {"y": "2"}
    assert dict(sn.stat("a").labels) == {"y": "2"}


def test_list_uses_index_lookups_and_full_filter(sn: Snapshotter) -> None:
    ref = "containerd.io/snapshot.ref"
    sn.prepare("x1", "", {ref: "sha256:1"})
    sn.commit("sha256:1", "x1", {ref: "sha256:1"})
    sn.prepare("x2", "sha256:1", {ref: "sha256:2"})
    sn.commit("sha256:2", "x2", {ref: "sha256:2"})

    def names(*filters: str) -> list[str]:
        return sorted(i.key for i in sn.list(parse_all(filters)))

    assert names(f'labels."{ref}"==sha256:2,parent=="sha256:1"') == ["sha256:2"]
    assert names(f'labels."{ref}"==sha256:2,parent==""') == []
    assert names(f'labels."{ref}"==sha256:1,parent==""') == ["sha256:1"]
    assert names("name==sha256:1", f'labels."{ref}"==sha256:2') == ["sha256:1", "sha256:2"]
    assert names("kind==committed") == ["sha256:1", "sha256:2"]


def test_mounts_of_chains(sn: Snapshotter) -> None:
    sn.prepare("a", "")
    sn.commit("c1", "a")
    sn.prepare("b", "c1")
    sn.commit("c2", "b")
    fs = {k: str(sn.layout.fs(sn.store.get(k).id)) for k in ("c1", "c2")}
    active = sn.prepare("top", "c2")
    top = sn.store.get("top").id
    assert [(m.type, m.source, m.options) for m in active] == [
        (
            "overlay",
            "overlay",
            (
                "index=off",
                f"workdir={sn.layout.work(top)}",
                f"upperdir={sn.layout.fs(top)}",
                f"lowerdir={fs['c2']}:{fs['c1']}",
            ),
        )
    ]
    assert sn.mounts("top") == active
    assert [(m.type, m.source, m.options) for m in sn.view("v1", "c1")] == [
        ("bind", fs["c1"], ("ro", "rbind"))
    ]
    assert [m.options for m in sn.view("v2", "c2")] == [("index=off", f"lowerdir={fs['c2']}:{fs['c1']}")]
    assert not sn.layout.work(sn.store.get("v2").id).exists()  # views have no work dir


def test_child_fs_is_owned_like_its_parent(sn: Snapshotter) -> None:
    fs = Path(sn.prepare("a", "")[0].source)
    os.chown(fs, 1234, 5678)
    sn.commit("c", "a")
    child = sn.store.get(sn.prepare("b", "c") and "b")
    st = sn.layout.fs(child.id).stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)


# --- transactions and injected failures ------------------------------------------------------------


def test_write_transaction_rolls_back(root: Path) -> None:
    root.mkdir()
    store = Store(root / "metadata.db")
    try:
        with pytest.raises(RuntimeError), store.write() as tx:
            tx.insert(Kind.ACTIVE, "a", None, {"l": "v"}, 1)
            raise RuntimeError("boom")
        assert store.get("a") is None and store.count() == 0
        with store.write() as tx:
            tx.insert(Kind.ACTIVE, "a", None, {"l": "v"}, 1)
        assert store.get("a").labels == {"l": "v"}
    finally:
        store.close()
        store.close()  # closing twice is fine


@pytest.mark.parametrize("point", ["create.after-insert", "create.before-commit"])
def test_error_while_creating_leaves_nothing(sn: Snapshotter, point: str) -> None:
    sn.prepare("base", "")
    sn.commit("c", "base")
    failpoints.enable(point, "error")
    with pytest.raises(failpoints.InjectedFault):
        sn.prepare("a", "c")
    failpoints.disable_all()
    assert sn.store.get("a") is None
    layout_is_consistent(sn)
    sn.prepare("a", "c")  # and the key and id are usable again
    layout_is_consistent(sn)


def test_error_in_commit_or_remove_changes_nothing(sn: Snapshotter) -> None:
    sn.prepare("a", "")
    failpoints.enable("commit.before-commit", "error")
    with pytest.raises(failpoints.InjectedFault):
        sn.commit("c", "a")
    assert sn.stat("a").kind == Kind.ACTIVE and sn.store.get("c") is None
    failpoints.enable("remove.before-commit", "error")
    with pytest.raises(failpoints.InjectedFault):
        sn.remove("a")
    assert sn.stat("a").kind == Kind.ACTIVE
    layout_is_consistent(sn)


# --- crashes: SIGKILL at each step in a child process, then a restart ------------------------------

CHILD = """
import sys
from pathlib import Path
from snapshotter import failpoints
from snapshotter.daemon.snapshots import Snapshotter

failpoints.load_from_environment()
s = Snapshotter(Path(sys.argv[1]), index_off=True)
op = sys.argv[2]
if op == "prepare":
    s.prepare("new", "c1", {"l": "v"})
elif op == "commit":
    s.commit("c2", "a1", {"l": "v"})
elif op == "remove":
    s.remove("a1")
print("survived")
"""


def _crash(root: Path, op: str, point: str) -> None:
    env = {**os.environ, failpoints.ENV: f"{point}=kill"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(root), op], env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr)


@pytest.mark.parametrize(
    ("op", "point", "after"),
    [
        ("prepare", "create.after-insert", False),
        ("prepare", "create.before-commit", False),
        ("prepare", "create.after-commit", True),
        ("commit", "commit.after-usage", False),
        ("commit", "commit.before-commit", False),
        ("remove", "remove.before-commit", False),
        ("remove", "remove.after-commit", True),
    ],
)
def test_crash_at_every_step(root: Path, op: str, point: str, after: bool) -> None:
    s = Snapshotter(root, index_off=True)
    fs = Path(s.prepare("c1-a", "")[0].source)
    (fs / "committed-file").write_bytes(b"must survive")
    s.commit("c1", "c1-a")
    active = Path(s.prepare("a1", "c1")[0].options[2].removeprefix("upperdir="))
    (active / "file").write_bytes(b"in a1")
    s.close()

    _crash(root, op, point)

    s = Snapshotter(root, index_off=True)  # the restart: what `lazysnap serve` does first
    try:
        removed = s.cleanup()
        layout_is_consistent(s)
        names = sorted(i.key for i in s.list(parse_all([])))
        expected = {
            ("prepare", False): ["a1", "c1"],
            ("prepare", True): ["a1", "c1", "new"],
            ("commit", False): ["a1", "c1"],
            ("remove", False): ["a1", "c1"],
            ("remove", True): ["c1"],
        }[(op, after)]
        assert names == expected
        assert (s.layout.fs(s.store.get("c1").id) / "committed-file").read_bytes() == b"must survive"
        if point in ("create.before-commit", "remove.after-commit"):
            assert removed, "the crash should have left an orphaned directory"
        if "a1" in names:
            assert (s.layout.fs(s.store.get("a1").id) / "file").read_bytes() == b"in a1"
        # the store works on: the next operations succeed
        s.prepare("after-restart", "c1")
        layout_is_consistent(s)
    finally:
        s.close()


# --- concurrency ---------------------------------------------------------------------------------


def test_concurrent_chains_from_threads(sn: Snapshotter) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            parent = ""
            for i in range(15):
                key = f"ns/{n}/extract-{i} sha256:{n}-{i}"
                sn.prepare(key, parent, {"containerd.io/snapshot.ref": f"sha256:{n}-{i}"})
                sn.stat(key)
                list(sn.list(parse_all([f'labels."containerd.io/snapshot.ref"==sha256:{n}-{i}'])))
                parent = f"ns/{n}/sha256:{n}-{i}"
                sn.commit(parent, key)
                sn.usage(parent)
            sn.view(f"ns/{n}/view", parent)
            sn.remove(f"ns/{n}/view")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    infos = list(sn.list(parse_all(["kind==committed"])))
    assert len(infos) == 8 * 15
    assert all(
        i.parent == "" or i.parent.startswith(i.key.split("/")[0] + "/" + i.key.split("/")[1]) for i in infos
    )
    layout_is_consistent(sn)


def test_racing_writers_on_the_same_keys(sn: Snapshotter) -> None:
    sn.prepare("base", "")
    sn.commit("c", "base")
    results: dict[str, list[str]] = {"prepare": [], "commit": []}
    barrier = threading.Barrier(8)

    def racer(n: int) -> None:
        barrier.wait()
        try:
            sn.prepare("same", "c")
            results["prepare"].append("ok")
        except AlreadyExists:
            results["prepare"].append("exists")
        barrier.wait()
        try:
            sn.commit(f"name-{n}", "same")
            results["commit"].append("ok")
        except (NotFound, FailedPrecondition):
            results["commit"].append("lost")

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results["prepare"]) == ["exists"] * 7 + ["ok"]
    assert sorted(results["commit"]) == ["lost"] * 7 + ["ok"]
    assert len(list(sn.list(parse_all(["kind==committed"])))) == 2
    layout_is_consistent(sn)


def test_cleanup_removes_orphans_but_not_snapshots(sn: Snapshotter) -> None:
    sn.prepare("a", "")
    for name in ("999", "trash-7-abc", "new-123", "12x"):
        d = sn.layout.snapshots / name
        (d / "fs").mkdir(parents=True)
        (d / "fs" / "file").write_bytes(b"orphan")
    removed = sorted(p.name for p in sn.cleanup())
    assert removed == ["12x", "999", "new-123", "trash-7-abc"]
    assert sn.layout.snapshots.exists() and len(os.listdir(sn.layout.snapshots)) == 1
    layout_is_consistent(sn)
