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
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fuse.mount import FUSE_CONNECTIONS
from snapshotter import host
from tests.harness import images as im
from tests.harness import trees
from tests.harness.containerd import Containerd
from tests.harness.containers import BUSYBOX, RUNTIME_PATHS, container_tree
from tests.harness.procs import free_port
from tests.harness.registry import Registry
from tests.harness.snapshotter import Lazysnap, lazysnap_command

from .test_lazy_pull import PLUGIN, accelerate, layer_bytes, rpull

FILES, FILE_SIZE = 24, 256 << 10
# Each pass checksums every data file and appends one line per file to /out/reads.
LOOP = r"""
while [ ! -e /out/stop ]; do
  for f in /data/*; do
    if s=$(sha256sum "$f"); then echo "ok $s"; else echo "err $f"; fi
  done >> /out/reads
  echo x >> /out/passes
done
echo done > /out/finished
"""


def data_image() -> tuple[im.Image, dict[str, str]]:
    files = {f"data/f{i:02d}": im.pseudo_random(FILE_SIZE, seed=100 + i) for i in range(FILES)}
    image = im.Image(
        [
            im.Layer([im.File("bin/busybox", BUSYBOX, mode=0o755), im.Symlink("bin/sh", "busybox")]),
            im.Layer([im.File(path, data) for path, data in files.items()]),
        ]
    )
    return image, {"/" + p: hashlib.sha256(d).hexdigest() for p, d in files.items()}


def supervised(snapshotter_factory, workdir: Path, **settings) -> Lazysnap:
    config = workdir / "lazysnap.toml"
    lines = [f'root = "{workdir}/state"', f'address = "{workdir}/lazysnap.sock"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    config.write_text("\n".join(lines) + "\n")
    return snapshotter_factory(config=config, supervised=True)


@dataclass
class Load:
    """A container checksumming the data files in a loop, a host reader timing reads of the same files
    through the FUSE mount, and page caches dropped every 0.2 s, until `finish()`."""

    containerd: Containerd
    snapshotter: Lazysnap
    ref: str
    expected: dict[str, str]
    out: Path
    timings: list[tuple[float, float, str | None]] = field(default_factory=list)  # start, seconds, error
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, *, first_pass: bool = True) -> Load:
        """Start the container and the host reader; with `first_pass`, wait for one complete pass."""
        self.out.mkdir()
        self.containerd.ctr(
            "run",
            "-d",
            "--runc-root",
            str(self.containerd.workdir / "runc"),
            "--snapshotter",
            PLUGIN,
            "--mount",
            f"type=bind,src={self.out},dst=/out,options=rbind:rw",
            self.ref,
            "reader",
            "/bin/sh",
            "-c",
            LOOP,
        )
        for target in (self._drop_caches, self._host_reads):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        if first_pass:
            self.wait_passes(1, timeout=120)
        return self

    def passes(self) -> int:
        try:
            return len((self.out / "passes").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def wait_passes(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.passes() < n:
            assert time.monotonic() < deadline, f"the container made {self.passes()} passes, not {n}"
            assert self.running(), "the container stopped"
            time.sleep(0.1)

    def running(self) -> bool:
        tasks = self.containerd.ctr("tasks", "ls").stdout
        return any(line.split()[:1] == ["reader"] and "RUNNING" in line for line in tasks.splitlines())

    def _drop_caches(self) -> None:
        while not self._stop.wait(0.2):
            Path("/proc/sys/vm/drop_caches").write_text("3")

    def _host_reads(self) -> None:
        try:
            self._read_loop()
        except Exception as e:  # the test fails on it (finish)
            self.timings.append((time.monotonic(), 0.0, f"host reader stopped: {e!r}"))

    def _read_loop(self) -> None:
        mnt = self.snapshotter.root / "mnt"
        layers = [p for p in mnt.iterdir() if (p / "data").is_dir()]
        assert layers, (
            f"no layer with data/ under {mnt}: {sorted(os.listdir(mnt))} "
            + "\n".join(line for line in self.snapshotter.log().splitlines() if "rpc" not in line)[-3000:]
        )
        paths = sorted((layers[0] / "data").iterdir())
        i = 0
        while not self._stop.is_set():
            path = paths[i % len(paths)]
            i += 1
            start = time.monotonic()
            error = None
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    posix = os.pread(fd, FILE_SIZE, 0)
                finally:
                    os.close(fd)
                if hashlib.sha256(posix).hexdigest() != self.expected["/data/" + path.name]:
                    error = f"{path.name}: wrong bytes"
            except OSError as e:
                error = f"{path.name}: {e}"
            self.timings.append((start, time.monotonic() - start, error))
            time.sleep(0.005)

    def finish(self) -> list[str]:
        """Stop the loop; the container's result lines, checked: no error, every checksum right."""
        assert self.running(), "the container died"
        (self.out / "stop").touch()
        deadline = time.monotonic() + 60
        while not (self.out / "finished").exists():
            assert time.monotonic() < deadline, "the container did not finish its last pass"
            time.sleep(0.1)
        self._stop.set()
        for t in self._threads:
            t.join(10)
        lines = (self.out / "reads").read_text().splitlines()
        errors = [line for line in lines if not line.startswith("ok ")]
        assert errors == [], f"{len(errors)} failed reads in the container: {errors[:5]}"
        for line in lines:
            _, digest, path = line.split()
            assert self.expected[path] == digest, f"{path}: wrong bytes in the container"
        host_errors = [e for _, _, e in self.timings if e]
        assert host_errors == [], f"{len(host_errors)} failed reads on the host: {host_errors[:5]}"
        return lines

    def blocked(self, start: float, end: float) -> float:
        """The longest host read that was waiting at some point between `start` and `end`."""
        waiting = [d for s, d, _ in self.timings if s <= end and s + d >= start]
        assert waiting, f"no host read overlapped the restart: {[t for t in self.timings if t[2]][:3]}"
        return max(waiting)


def restart_and_measure(load: Load, snapshotter: Lazysnap, signum: int) -> float:
    """Signal the daemon, wait for its successor, let the container make two full passes; the
    longest host read that waited across the restart."""
    time.sleep(0.3)  # reads going on before the signal
    signalled = time.monotonic()
    old = snapshotter.signal_daemon(signum)
    snapshotter.wait_new_daemon(old)
    serving = time.monotonic()
    load.wait_passes(load.passes() + 2)
    print(f"baseline {load.blocked(signalled - 0.3, signalled - 0.01):.3f}", end=" ")
    return load.blocked(signalled, serving)


@pytest.fixture
def fusectl() -> Iterator[Path]:
    """The fuse control filesystem (per-connection counters), mounted for the test if it is not."""
    path = Path(FUSE_CONNECTIONS)
    mounted = host.is_mountpoint(path)
    if not mounted:
        host.mount("fusectl", path, "fusectl")
    yield path
    if not mounted:
        host.umount(path)


def fuse_waiting(snapshotter: Lazysnap) -> int:
    """Requests of the daemon's FUSE connection that wait for an answer (fusectl)."""
    mnt = str(snapshotter.root / "mnt")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == mnt:
            major, minor = map(int, fields[2].split(":"))
            return int(Path(f"{FUSE_CONNECTIONS}/{major << 20 | minor}/waiting").read_text())
    raise AssertionError(f"{mnt} is not mounted")


def test_container_reads_through_sigkills_of_the_daemon(
    registry: Registry, snapshotter_factory, containerd_factory, workdir: Path, fusectl: Path
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
            blocked.append(restart_and_measure(load, snapshotter, signal.SIGKILL))
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
    restarted = restart_and_measure(load, snapshotter, signal.SIGTERM)
    upgraded = [restart_and_measure(load, snapshotter, signal.SIGHUP) for _ in range(2)]
    assert registry.recorder is not None
    registry.recorder.refuse = True  # every chunk was read once: all of it is in the cache
    offline = restart_and_measure(load, snapshotter, signal.SIGKILL)
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
