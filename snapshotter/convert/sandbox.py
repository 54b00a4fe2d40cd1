"""`python -m snapshotter.convert.sandbox SPEC`: the first process of `lazysnap convert --optimize`'s
workload, in its new mount and PID namespaces: mount the writable overlay root over the lazily mounted
image and the API filesystems, chroot, exec `/bin/sh -c COMMAND` (see `snapshotter.convert.optimize`)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from snapshotter.host import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT, mount

DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}


def sandbox(spec_file: Path) -> int:
    """The workload's first process, in its new mount and PID namespaces: mount the writable root over
    the lazily mounted tree and the API filesystems, chroot, exec `/bin/sh -c COMMAND`. What fails before
    the exec is written to `sandbox.error` beside the spec, and the exit status is 125."""
    spec = json.loads(spec_file.read_text())
    work_fd = os.open(spec_file.parent, os.O_RDONLY | os.O_DIRECTORY)  # still reachable after the chroot
    try:
        _enter_root(spec)
        try:
            os.execve("/bin/sh", ["/bin/sh", "-c", spec["command"]], spec["env"])
        except OSError as e:
            raise OSError(e.errno, f"cannot run /bin/sh in the image: {e.strerror}") from None
    except OSError as e:
        message = e.strerror or str(e)
        if e.filename is not None:
            message += f": {e.filename}"
        fd = os.open("sandbox.error", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=work_fd)
        os.write(fd, message.encode(errors="replace"))
        os.close(fd)
        return 125


def _enter_root(spec: dict) -> None:
    root = spec["root"]
    options = f"lowerdir={spec['lower']},upperdir={spec['upper']},workdir={spec['work']}"
    mount("overlay", root, "overlay", 0, options)
    os.umask(0o022)
    if proc := _mount_dir(root, "proc"):
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # of the new PID namespace
    if dev := _mount_dir(root, "dev"):
        mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m")
        for name, (major, minor) in DEVICES.items():
            os.mknod(f"{dev}/{name}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(f"{dev}/{name}", 0o666)
        for name, target in DEV_LINKS.items():
            os.symlink(target, f"{dev}/{name}")
        os.mkdir(f"{dev}/shm")
        mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    if sys_dir := _mount_dir(root, "sys"):
        try:
            mount("sysfs", sys_dir, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:  # not allowed here: the host's, bound read-only
            mount("/sys", sys_dir, None, MS_BIND | MS_REC)
            mount("/sys", sys_dir, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    for name, mode in (("tmp", "1777"), ("run", "755")):
        if path := _mount_dir(root, name):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode}")
    os.chroot(root)
    os.makedirs(spec["cwd"], exist_ok=True)
    os.chdir(spec["cwd"])


def _mount_dir(root: str, name: str) -> str | None:
    """root/name as a directory to mount on; None when the image has something else there (a symlink
    would lead outside the root)."""
    path = os.path.join(root, name)
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        return None
    os.makedirs(path, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1:
        return sandbox(Path(args[0]))
    print("usage: python -m snapshotter.convert.sandbox SPEC (used by lazysnap convert --optimize)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
