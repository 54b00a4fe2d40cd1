"""`lazysnap mount` as a test service: started on a mountpoint in the test's workdir, stopped by PID
(SIGTERM: it unmounts and exits), with a fallback unmount so nothing stays mounted."""

from __future__ import annotations

import sys
from pathlib import Path

from .procs import Service, mounts_under, unmount_all

LAZYSNAP = str(Path(sys.executable).parent / "lazysnap")


class LazysnapMount:
    def __init__(
        self,
        workdir: Path,
        image: str,
        *,
        name: str = "mnt",
        args: tuple[str, ...] = (),
        cache: Path | None = None,
    ):
        self.mountpoint = workdir / name
        self.cache = cache or workdir / f"{name}-cache"
        argv = [
            LAZYSNAP,
            "mount",
            "--plain-http",
            "--cache",
            str(self.cache),
            *args,
            image,
            str(self.mountpoint),
        ]
        self.service = Service(f"lazysnap mount {image}", argv, workdir / f"{name}.log")

    def start(self, timeout: float = 60) -> LazysnapMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.service.start()
        self.service.wait_ready(
            lambda: str(self.mountpoint) in mounts_under(self.mountpoint), timeout, "mounted"
        )
        return self

    def stop(self) -> int | None:
        code = self.service.stop(grace=15)
        if mounts_under(self.mountpoint):  # it did not clean up: fail loudly, but leave nothing behind
            unmount_all(self.mountpoint)
            raise AssertionError(f"lazysnap mount left {self.mountpoint} mounted:\n{self.service.log_tail()}")
        return code
