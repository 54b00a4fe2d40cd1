"""A container reading lazy files in a loop while the daemon is restarted, and a host reader timing
reads of the same files through the FUSE mount, with page caches dropped all along so the reads reach
the daemon: what the restart tests (tests/e2e/test_daemon_restart.py) and the restart benchmark
(bench/restart.py) measure."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fuse.mount import FUSE_CONNECTIONS
from snapshotter import host

from . import images as im
from .containerd import Containerd
from .containers import BUSYBOX
from .snapshotter import PLUGIN, Lazysnap

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


def restart_pause(load: Load, snapshotter: Lazysnap, signum: int) -> tuple[float, float]:
    """Signal the daemon, wait for its successor, let the container make two full passes: the longest
    host read that waited across the restart, and the longest in the 0.3 s before the signal (the
    baseline)."""
    time.sleep(0.3)  # reads going on before the signal
    signalled = time.monotonic()
    old = snapshotter.signal_daemon(signum)
    snapshotter.wait_new_daemon(old)
    serving = time.monotonic()
    load.wait_passes(load.passes() + 2)
    return load.blocked(signalled, serving), load.blocked(signalled - 0.3, signalled - 0.01)


@contextlib.contextmanager
def fusectl() -> Iterator[Path]:
    """The fuse control filesystem (per-connection counters), mounted meanwhile if it is not."""
    path = Path(FUSE_CONNECTIONS)
    mounted = host.is_mountpoint(path)
    if not mounted:
        host.mount("fusectl", path, "fusectl")
    try:
        yield path
    finally:
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
