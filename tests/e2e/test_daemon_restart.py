"""A running container does not notice the daemon dying: SIGKILL (with reads in flight), a graceful
restart, an upgrade (SIGHUP), the registry down meanwhile. Real containerd, a real container reading
and checksumming lazy files in a loop, `lazysnap supervise` holding the FUSE descriptor as systemd would;
page caches dropped all along so the reads reach the daemon. And when the connection really is gone,
the next daemon says so and later containers work."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import trees
from tests.harness.containers import RUNTIME_PATHS, container_tree
from tests.harness.procs import free_port
from tests.harness.readload import FILE_SIZE, FILES, Load, data_image, fuse_waiting, fusectl, restart_pause
from tests.harness.registry import Registry
from tests.harness.snapshotter import Lazysnap, lazysnap_command

from .test_lazy_pull import PLUGIN, accelerate, layer_bytes, rpull


def supervised(snapshotter_factory, workdir: Path, **settings) -> Lazysnap:
    config = workdir / "lazysnap.toml"
    lines = [f'root = "{workdir}/state"', f'address = "{workdir}/lazysnap.sock"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    config.write_text("\n".join(lines) + "\n")
    return snapshotter_factory(config=config, supervised=True)


@pytest.fixture
def fusectl_mounted() -> Iterator[Path]:
    with fusectl() as path:
        yield path


def test_container_reads_through_sigkills_of_the_daemon(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path, fusectl_mounted: Path
) -> None:
    """Five SIGKILLs, the first with the registry slow and reads waiting in the dead daemon: zero
    failed reads, right bytes, the container running throughout, reads blocked briefly."""
    snapshotter = supervised(snapshotter_factory, workdir, background=False)
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image, expected = data_image()
    ref = accelerate(registry, "restart/kill", image)
    rpull(containerd, ref)
    assert registry.recorder is not None
    registry.recorder.delay = 0.5  # every fetch is slow: reads are in flight when the daemon dies
    load = Load(containerd, snapshotter, ref, expected, workdir / "out").start(first_pass=False)
    deadline = time.monotonic() + 30
    while fuse_waiting(snapshotter) == 0:  # the daemon holds unanswered reads (the registry is slow)
        assert time.monotonic() < deadline, "no read reached the daemon"
        time.sleep(0.01)
    old = snapshotter.signal_daemon(signal.SIGKILL)
    snapshotter.wait_new_daemon(old)
    registry.recorder.delay = 0
    opened = os.open(next((snapshotter.root / "mnt").glob("*/data/f07")), os.O_RDONLY)
    blocked = []
    try:
        for _ in range(4):  # a file opened before the crashes stays readable through them
            blocked.append(restart_pause(load, snapshotter, signal.SIGKILL)[0])
            Path("/proc/sys/vm/drop_caches").write_text("3")
            digest = hashlib.sha256(os.pread(opened, FILE_SIZE, 0)).hexdigest()
            assert digest == expected["/data/f07"]
    finally:
        os.close(opened)
    lines = load.finish()
    assert len(lines) >= 5 * FILES
    log = snapshotter.log()
    assert log.count("taking over the FUSE mount") == 5, log[-3000:]
    assert "lost their files" not in log
    print(f"\nSIGKILL: longest host read after each kill {[round(b, 3) for b in blocked]} s")
    assert max(blocked) < 5, blocked  # goal 0.5 s (README figure); bounded on a loaded CI machine


def test_graceful_restart_upgrade_and_registry_down(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    """SIGTERM (a restart), SIGHUP (an upgrade: the successor is ready before the old one stops), and a
    SIGKILL while the registry refuses every connection: the container reads on from the cache."""
    snapshotter = supervised(snapshotter_factory, workdir, background=False)
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image, expected = data_image()
    ref = accelerate(registry, "restart/graceful", image)
    rpull(containerd, ref)
    load = Load(containerd, snapshotter, ref, expected, workdir / "out").start()
    restarted = restart_pause(load, snapshotter, signal.SIGTERM)[0]
    upgraded = [restart_pause(load, snapshotter, signal.SIGHUP)[0] for _ in range(2)]
    assert registry.recorder is not None
    registry.recorder.refuse = True  # every chunk was read once: all of it is in the cache
    offline = restart_pause(load, snapshotter, signal.SIGKILL)[0]
    load.finish()
    log = snapshotter.log()
    assert log.count("successor pid") == 2 and "upgrade abandoned" not in log
    assert log.count("taking over the FUSE mount") == 4
    print(
        f"\nrestart {restarted:.3f} s, upgrades {[round(u, 3) for u in upgraded]} s, offline {offline:.3f} s"
    )
    assert max(upgraded) < 2 and restarted < 5 and offline < 5


def test_background_fetch_resumes_after_a_crash(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    """The background fetch, killed half-way, goes on in the next daemon from what is cached: every
    layer ends local, and the registry sent each byte about once."""
    snapshotter = supervised(snapshotter_factory, workdir, background_rate="1MB")
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image, _ = data_image()
    ref = accelerate(registry, "restart/background", image)
    rpull(containerd, ref)

    def fetched() -> float:
        command = [*lazysnap_command(), "status", "--root", str(snapshotter.root), "--json"]
        shown = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if shown.returncode != 0:  # the daemon is restarting
            return -1.0
        return min(layer["fetched"] for layer in json.loads(shown.stdout)["layers"])

    deadline = time.monotonic() + 60
    while not 0.3 < fetched() < 0.8:  # 3 s after the mount, then 1 MB/s
        assert time.monotonic() < deadline, "the background fetch did not get half-way"
        time.sleep(0.2)
    before, total = layer_bytes(registry, ref)
    snapshotter.wait_new_daemon(snapshotter.signal_daemon(signal.SIGKILL))
    deadline = time.monotonic() + 60
    while fetched() < 1.0:
        assert time.monotonic() < deadline, "the background fetch did not finish after the restart"
        time.sleep(0.5)
    sent, _ = layer_bytes(registry, ref)
    assert 0 < before < total and sent < total * 1.2, (before, sent, total)
    shown = subprocess.run(
        [*lazysnap_command(), "status", "--root", str(snapshotter.root)], capture_output=True, text=True
    )
    assert "FUSE mount: taken over from the previous daemon, kept for the next daemon" in shown.stdout


def test_a_lost_connection_is_reported_and_later_containers_work(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path
) -> None:
    """Holder and daemon both killed: nobody keeps the connection, the kernel ends it. The next daemon
    says so (log, metric), mounts afresh, and a new container runs from the same image."""
    port = free_port()
    snapshotter = supervised(snapshotter_factory, workdir, metrics_address=f"127.0.0.1:{port}")
    containerd = containerd_factory(snapshotter_socket=snapshotter.address)
    image, _ = data_image()
    ref = accelerate(registry, "restart/lost", image)
    rpull(containerd, ref)
    daemon = snapshotter.daemon_pid()
    assert daemon is not None
    supervisor = snapshotter.service.proc
    assert supervisor is not None
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait(10)
    os.kill(daemon, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{daemon}").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(OSError):  # the mount is dead
        os.listdir(snapshotter.root / "mnt")
    snapshotter.service.proc = None
    snapshotter.start()
    log = snapshotter.log()
    assert "must be restarted; new containers work" in log, log[-2000:]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert "lazysnap_fuse_connections_lost_total 1.0" in metrics
    assert "lazysnap_fuse_adopted 0.0" in metrics
    containerd.wait_snapshotter(PLUGIN)
    tree = container_tree(containerd, ref, snapshotter=PLUGIN)
    trees.assert_same(image.expected_tree(), tree, ignore=RUNTIME_PATHS)
