"""`lazysnap serve` as a process: permissions of its socket and state, start-up errors that say what to
fix, stale and live sockets, one daemon per root, graceful shutdown with in-flight RPCs, restart with
orphans removed, concurrent clients, and the debug log of every request."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from snapshotter import failpoints
from tests.harness.snapshotter import Lazysnap, lazysnap_command


def run_serve(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """`lazysnap serve` expected to stop by itself (a start-up error)."""
    return subprocess.run(
        [*lazysnap_command(), "serve", *args], capture_output=True, text=True, timeout=timeout
    )


def test_socket_0600_root_0700_and_database_private(snapshotter: Lazysnap) -> None:
    assert oct(os.stat(snapshotter.address).st_mode & 0o777) == "0o600"
    assert oct(os.stat(snapshotter.root).st_mode & 0o777) == "0o700"
    db = snapshotter.root / "metadata.db"
    assert os.stat(db).st_mode & 0o077 == 0
    assert "msg=serving" in snapshotter.log() and f"address={snapshotter.address}" in snapshotter.log()


def test_socket_directory_is_created(snapshotter_factory: Callable[..., Lazysnap], workdir: Path) -> None:
    snap = snapshotter_factory(address=workdir / "run" / "lazysnap" / "s.sock", root=workdir / "var" / "root")
    assert oct(os.stat(workdir / "run" / "lazysnap").st_mode & 0o777) == "0o700"
    assert snap.client().list() == []


def test_stale_socket_is_replaced(snapshotter_factory: Callable[..., Lazysnap], workdir: Path) -> None:
    stale = workdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens
    snap = snapshotter_factory(address=stale)
    assert snap.client().list() == []
    assert "replacing stale socket" in snap.log()


def test_live_socket_and_used_root_are_refused(snapshotter: Lazysnap, workdir: Path) -> None:
    p = run_serve("--root", str(workdir / "other-root"), "--address", str(snapshotter.address))
    assert p.returncode == 1
    assert "in use by a live server" in p.stderr and str(snapshotter.address) in p.stderr
    p = run_serve("--root", str(snapshotter.root), "--address", str(workdir / "other.sock"))
    assert p.returncode == 1
    assert f"in use by another lazysnap (pid {snapshotter.pid})" in p.stderr
    assert not (workdir / "other.sock").exists()
    assert snapshotter.client().list() == []  # the first one serves on


def test_unusable_roots_and_sockets(workdir: Path) -> None:
    sock = str(workdir / "s.sock")
    (workdir / "a-file").write_text("x")
    p = run_serve("--root", str(workdir / "a-file"), "--address", sock)
    assert p.returncode == 1 and "is not a directory" in p.stderr, p.stderr
    p = run_serve("--root", str(workdir / "a-file" / "below"), "--address", sock)
    assert p.returncode == 1 and "cannot create state root" in p.stderr, p.stderr
    p = run_serve("--root", str(workdir / "root"), "--address", str(workdir / "a-file"))
    assert p.returncode == 1 and "is not a socket" in p.stderr, p.stderr

    (workdir / "not-ours").mkdir()
    (workdir / "not-ours" / "precious").write_text("keep")
    p = run_serve("--root", str(workdir / "not-ours"), "--address", sock)
    assert p.returncode == 1 and "is not empty (precious) and holds no lazysnap state" in p.stderr
    assert oct(os.stat(workdir / "not-ours").st_mode & 0o777) == "0o755"  # left alone

    ovl = workdir / "ovl"  # overlayfs refuses an upper dir on overlayfs
    for d in ("l", "u", "w", "m"):
        (ovl / d).mkdir(parents=True)
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={ovl}/l,upperdir={ovl}/u,workdir={ovl}/w",
            f"{ovl}/m",
        ],
        check=True,
    )
    try:
        p = run_serve("--root", str(ovl / "m" / "root"), "--address", sock)
        assert p.returncode == 1 and "overlayfs cannot use state root" in p.stderr, p.stderr
        assert not list((ovl / "m" / "root").glob(".overlay-check-*"))
    finally:
        subprocess.run(["umount", f"{ovl}/m"], check=True)

    ro = workdir / "ro"
    (ro / "root").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        p = run_serve("--root", str(ro / "root"), "--address", sock)
        assert p.returncode == 1 and "is not writable" in p.stderr and "Read-only file system" in p.stderr
        p = run_serve("--root", str(ro / "new"), "--address", sock)
        assert p.returncode == 1 and "cannot create state root" in p.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert not os.path.exists(sock)


def test_config_file_and_its_errors(snapshotter_factory: Callable[..., Lazysnap], workdir: Path) -> None:
    bad = workdir / "bad.toml"
    bad.write_text(f'root = "{workdir}/r"\nadress = "/x.sock"\n')
    p = run_serve("--config", str(bad))
    assert p.returncode == 2
    assert f"config file {bad}, line 2: unknown key 'adress'" in p.stderr
    good = workdir / "good.toml"
    good.write_text(
        f'root = "{workdir}/from-config"\naddress = "{workdir}/ignored.sock"\nlog_level = "info"\n'
    )
    # root and log level come from the file, the address flag overrides the file's
    snap = snapshotter_factory(config=good, address=workdir / "flag.sock", log_level=None)
    assert snap.client().list() == []
    assert (workdir / "from-config" / "metadata.db").exists()
    assert not (workdir / "ignored.sock").exists()
    assert "rpc=" not in snap.log()  # log_level = "info": no debug lines


def test_sigterm_finishes_in_flight_rpcs_and_exits_0(snapshotter_factory: Callable[..., Lazysnap]) -> None:
    snap = snapshotter_factory(env={failpoints.ENV: "rpc.Stat=sleep:3"})
    client = snap.client()
    client.prepare("a")
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(client.stat("a").name))
    t.start()
    deadline = time.monotonic() + 10
    while "failpoint rpc.Stat: sleep:3" not in snap.log():  # the Stat is in flight
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(snap.pid, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(
        snap.pid, signal.SIGTERM
    )  # a second signal while stopping changes nothing (containerd's CloseTwice)
    deadline = time.monotonic() + 5
    while True:  # no new RPCs once stopping
        try:
            client.usage("a")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            break
        assert time.monotonic() < deadline, "still accepting RPCs after SIGTERM"
        time.sleep(0.05)
    assert t.is_alive()  # while the Stat is still running
    t.join(10)
    assert result == ["a"]  # the in-flight Stat completed
    assert snap.wait_exit() == 0
    assert not snap.address.exists()
    assert "SIGTERM received again: already stopping" in snap.log() and "msg=stopped" in snap.log()

    snap.start(env={})  # restarts on the same state
    assert snap.client().stat("a").name == "a"


def test_sigint_stops_too(snapshotter: Lazysnap) -> None:
    os.kill(snapshotter.pid, signal.SIGINT)
    assert snapshotter.wait_exit() == 0


def test_restart_keeps_snapshots_and_removes_orphans(snapshotter: Lazysnap) -> None:
    c = snapshotter.client()
    (m,) = c.prepare("ns/1/a")
    Path(m.source, "file").write_text("kept")
    c.commit("ns/2/c", "ns/1/a", {"l": "v"})
    (active,) = c.prepare("ns/3/b", "ns/2/c")
    before = {i.name: i for i in c.list()}
    assert snapshotter.stop() == 0

    orphans = ["99", "trash-5-deadbeef", "new-123"]
    for name in orphans:
        (snapshotter.root / "snapshots" / name / "fs").mkdir(parents=True)
    snapshotter.start()
    assert {i.name: i for i in snapshotter.client().list()} == before
    assert snapshotter.client().mounts("ns/3/b") == [active]  # the same directories
    assert "removed 3 orphaned snapshot directories" in snapshotter.log()
    snapshotter.assert_consistent()
    assert Path(active.options[-1].removeprefix("lowerdir="), "file").read_text() == "kept"


def test_concurrent_clients(snapshotter: Lazysnap) -> None:
    errors: list[BaseException] = []

    def chain(n: int) -> None:
        try:
            c = snapshotter.client()
            parent = ""
            for i in range(10):
                key = f"ns/{n}/extract-{i} sha256:{n}{i}"
                c.prepare(key, parent, {"containerd.io/snapshot.ref": f"sha256:{n}{i}"})
                parent = f"ns/{n}/sha256:{n}{i}"
                c.commit(parent, key)
                assert (
                    c.names(f'labels."containerd.io/snapshot.ref"==sha256:{n}{i}') == []
                )  # Commit replaces labels
                c.stat(parent)
                c.usage(parent)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=chain, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(snapshotter.client().list("kind==committed")) == 120
    snapshotter.assert_consistent()


def test_debug_log_has_every_request_with_outcome_and_timing(snapshotter: Lazysnap) -> None:
    c = snapshotter.client()
    c.prepare("ns/1/extract-7 sha256:x", "", {"containerd.io/snapshot.ref": "sha256:x"})
    with pytest.raises(grpc.RpcError):
        c.commit("n", "missing")
    lines = [line for line in snapshotter.log().splitlines() if "msg=rpc" in line]
    prepare = next(line for line in lines if "rpc=Prepare" in line)
    assert 'key="ns/1/extract-7 sha256:x"' in prepare and "code=OK" in prepare and " ms=" in prepare
    assert 'labels="{\\"containerd.io/snapshot.ref\\":\\"sha256:x\\"}"' in prepare
    failed = next(line for line in lines if "rpc=Commit" in line)
    assert "code=NOT_FOUND" in failed and "error=" in failed and "missing" in failed
