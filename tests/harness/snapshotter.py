"""`lazysnap serve` as a test service, a gRPC client for its socket, and containerd-style mounting.

- :class:`Lazysnap` starts the real daemon (the installed `lazysnap` console script) on a unix socket and
  a state root inside the test's workdir, waits until it answers, and stops it by PID (SIGTERM; or
  :meth:`Lazysnap.kill` for a crash). Its log (logfmt, debug level) is ``<workdir>/lazysnap.log``.
- :class:`SnapshotsClient` calls the ten RPCs directly, as containerd's proxy plugin does.
- :func:`mount_all` mounts what Prepare/View/Mounts return the way containerd's `mount.All` does,
  including its compaction of an over-long ``lowerdir`` (chdir to the common parent, relative paths);
  :class:`Mounts` remembers targets so a test can always unmount them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from snapshotter.api.containerd.types import mount_pb2
from snapshotter.daemon.config import load as load_config

from .procs import Service

PLUGIN = "lazysnap"


def lazysnap_command() -> list[str]:
    """The `lazysnap` console script next to the running interpreter (the venv's), else the module."""
    script = Path(sys.executable).with_name("lazysnap")
    return [str(script)] if script.exists() else [sys.executable, "-m", "snapshotter.cli"]


class Lazysnap:
    """One `lazysnap serve` process. Root and socket default to <workdir>/<name> and <workdir>/<name>.sock;
    with `config`, what the file sets is used unless given here too (flags override the file)."""

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "lazysnap",
        root: Path | None = None,
        address: Path | None = None,
        config: Path | None = None,
        log_level: str | None = "debug",
        env: Mapping[str, str] | None = None,
        supervised: bool = False,
    ):
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        args = ["serve"]
        if config is not None:  # paths not given here come from the file
            args += ["--config", str(config)]
            from_file = load_config(config)
            self.root, self.address = Path(from_file.root), Path(from_file.address)
        else:
            self.root, self.address = workdir / name, workdir / f"{name}.sock"
        if root is not None or config is None:
            self.root = root or self.root
            args += ["--root", str(self.root)]
        if address is not None or config is None:
            self.address = address or self.address
            args += ["--address", str(self.address)]
        if log_level is not None:
            args += ["--log-level", log_level]
        argv = [*lazysnap_command(), *args]
        if supervised:  # `lazysnap supervise` keeps the FUSE descriptor and restarts the daemon
            argv = [*lazysnap_command(), "supervise", "--", *argv]
        self.supervised = supervised
        self.service = Service(name, argv, self.log_path, env=dict(env or {}))
        self._channel: grpc.Channel | None = None

    @property
    def pid(self) -> int:
        return self.service.pid

    def start(self, env: Mapping[str, str] | None = None) -> Lazysnap:
        """Start (again), with `env` added to the environment of this run; wait until it answers."""
        if env is not None:
            self.service.env = dict(env)
        self.service.start()
        self.service.wait_ready(self._answers, timeout=20, what="serving on its socket")
        return self

    def _answers(self) -> bool:
        if not self.address.exists():
            return False
        with grpc.insecure_channel(f"unix:{self.address}") as channel:
            stub = snapshots_pb2_grpc.SnapshotsStub(channel)
            try:
                list(stub.List(pb.ListSnapshotsRequest(snapshotter=PLUGIN, filters=["name==-"]), timeout=2))
            except grpc.RpcError:
                return False
        return True

    def client(self) -> SnapshotsClient:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.address}")
        return SnapshotsClient(self._channel)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after the grace period); the exit code."""
        self._close_channel()
        return self.service.stop()

    def kill(self) -> None:
        """SIGKILL, as a crash; returns once the process is gone."""
        self._close_channel()
        proc = self.service.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.service.stop()

    def daemon_pid(self) -> int | None:
        """The pid of the `lazysnap serve` holding the state root (from its lock file), if any."""
        try:
            text = (self.root / "lock").read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    def wait_new_daemon(self, old_pid: int | None, timeout: float = 30) -> int:
        """Wait until a daemon other than `old_pid` holds the root and answers on its socket; its pid."""
        deadline = time.monotonic() + timeout
        while True:
            pid = self.daemon_pid()
            if pid is not None and pid != old_pid and _alive(pid) and self._answers():
                return pid
            if time.monotonic() > deadline:
                raise TimeoutError(f"no new lazysnap daemon after {old_pid} within {timeout} s")
            time.sleep(0.05)

    def signal_daemon(self, signum: int) -> int:
        """Send `signum` to the daemon itself (not its supervisor); the pid signalled."""
        pid = self.daemon_pid()
        assert pid is not None, "no daemon holds the state root"
        os.kill(pid, signum)
        return pid

    def wait_exit(self, timeout: float = 15) -> int:
        """Wait for the process to exit by itself (a failpoint's kill, a signal sent by the test)."""
        assert self.service.proc is not None
        code = self.service.proc.wait(timeout)
        self._close_channel()
        self.service.stop()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def snapshot_dirs(self) -> set[str]:
        """Names of the entries under <root>/snapshots."""
        d = self.root / "snapshots"
        return set(os.listdir(d)) if d.exists() else set()

    def record_ids(self) -> set[str]:
        """Ids of the snapshot records in the metadata database (read directly: a white-box check)."""
        with contextlib.closing(sqlite3.connect(self.root / "metadata.db", timeout=10)) as db:
            return {str(row[0]) for row in db.execute("SELECT id FROM snapshots")}

    def assert_consistent(self) -> None:
        """Every snapshot directory has a record and every record its directory."""
        dirs, ids = self.snapshot_dirs(), self.record_ids()
        assert dirs == ids, (
            f"directories without a record: {sorted(dirs - ids)}; records without one: {sorted(ids - dirs)}"
        )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SnapshotsClient:
    """The snapshots API over a channel; errors surface as grpc.RpcError (code() and details())."""

    def __init__(self, channel: grpc.Channel, snapshotter: str = PLUGIN):
        self.stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.name = snapshotter

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list:
        req = pb.PrepareSnapshotRequest(snapshotter=self.name, key=key, parent=parent, labels=labels or {})
        return list(self.stub.Prepare(req, timeout=60).mounts)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list:
        req = pb.ViewSnapshotRequest(snapshotter=self.name, key=key, parent=parent, labels=labels or {})
        return list(self.stub.View(req, timeout=60).mounts)

    def mounts(self, key: str) -> list:
        return list(self.stub.Mounts(pb.MountsRequest(snapshotter=self.name, key=key), timeout=60).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = pb.CommitSnapshotRequest(snapshotter=self.name, name=name, key=key, labels=labels or {})
        self.stub.Commit(req, timeout=60)

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(snapshotter=self.name, key=key), timeout=60)

    def stat(self, key: str) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(snapshotter=self.name, key=key), timeout=60).info

    def update(self, info: pb.Info, *paths: str) -> pb.Info:
        req = pb.UpdateSnapshotRequest(snapshotter=self.name, info=info)
        req.update_mask.paths.extend(paths)
        return self.stub.Update(req, timeout=60).info

    def list(self, *filters: str) -> list[pb.Info]:
        req = pb.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters))
        return [info for resp in self.stub.List(req, timeout=60) for info in resp.info]

    def names(self, *filters: str) -> list[str]:
        return sorted(info.name for info in self.list(*filters))

    def usage(self, key: str) -> pb.UsageResponse:
        return self.stub.Usage(pb.UsageRequest(snapshotter=self.name, key=key), timeout=60)

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter=self.name), timeout=60)


# --- mounting as containerd does ------------------------------------------------------------------

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _compact_lowerdir(options: Sequence[str]) -> tuple[str | None, list[str]]:
    """containerd's trick for long lowerdirs: the common parent of the lower dirs as working directory
    and paths relative to it."""
    index = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), None)
    if index is None:
        return None, list(options)
    lowers = options[index].removeprefix("lowerdir=").split(":")
    if len(lowers) < 2:
        return None, list(options)
    common = os.path.commonpath(lowers)
    if common == "/":
        return None, list(options)
    relative = [os.path.relpath(d, common) for d in lowers]
    out = list(options)
    out[index] = "lowerdir=" + ":".join(relative)
    return common, out


def mount_all(mounts: Iterable[mount_pb2.Mount], target: Path) -> None:
    """Mount containerd mounts on `target`, in order, with `mount(8)` as root."""
    for m in mounts:
        options = list(m.options)
        cwd = None
        if m.type == "overlay" and len(",".join(options)) >= PAGE_SIZE - 512:
            cwd, options = _compact_lowerdir(options)
        argv = ["mount"]
        if m.type != "bind":
            argv += ["-t", m.type]
        argv += ["-o", ",".join(options), m.source, str(target)]
        p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
        if p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")


def unmount(target: Path) -> None:
    subprocess.run(["umount", "-R", str(target)], check=True, capture_output=True)


class Mounts:
    """Mount points made by a test, unmounted (deepest first) by :meth:`unmount_all` at teardown."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.points: list[Path] = []

    def mount(self, mounts: Iterable[mount_pb2.Mount], target: Path | str) -> Path:
        target = Path(target)
        if not target.is_absolute():
            target = self.workdir / target
        target.mkdir(parents=True, exist_ok=True)
        mount_all(mounts, target)
        self.points.append(target)
        return target

    def unmount(self, target: Path) -> None:
        unmount(target)
        self.points.remove(target)

    def unmount_all(self) -> None:
        for target in reversed(self.points):
            if subprocess.run(["umount", "-R", str(target)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-R", "-l", str(target)], capture_output=True)
        self.points.clear()


def mounts_from_ctr(parsed: list[dict]) -> list[mount_pb2.Mount]:
    """`ctr snapshots view --mounts` JSON as Mount messages."""
    return [
        mount_pb2.Mount(type=m["Type"], source=m["Source"], options=m.get("Options") or []) for m in parsed
    ]
