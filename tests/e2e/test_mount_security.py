"""`lazysnap mount` must not give local users root: an unprivileged user who reaches MOUNTPOINT cannot
gain privileges through the image's setuid files nor open host devices through its device nodes
(nosuid,nodev on the view, for one layer (a bind mount) and for several (overlayfs)), unless
`--allow-suid-dev` says the image is trusted. The private FUSE mount is nosuid,nodev too, and has
default_permissions together with allow_other."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_lazy_pull import accelerate
from tests.harness import images as im
from tests.harness.containers import BUSYBOX
from tests.harness.mount import LazysnapMount
from tests.harness.procs import mounts_under
from tests.harness.registry import Registry

NOBODY = "65534:65534"
# busybox drops a setuid bit for `id` unless its /etc/busybox.conf (root's, 0600) keeps it
SUID_CONF = b"[SUID]\nid = ssx 0.0\n"


def hostile_image(layers: int) -> im.Image:
    """A setuid-root busybox (that keeps root for `id`) and a 0666 character device /dev/zero (1:5)."""
    tools = [
        im.Dir("bin"),
        im.File("bin/busybox", BUSYBOX, mode=0o4755),
        im.File("etc/busybox.conf", SUID_CONF, mode=0o600),
    ]
    device = [im.CharDev("dev-nodes/zero", 1, 5, mode=0o666)]
    if layers == 1:
        return im.Image([im.Layer(tools + device)])
    return im.Image([im.Layer(tools), im.Layer(device)])


def as_nobody(root: Path, *command: str) -> subprocess.CompletedProcess[bytes]:
    """Run a command of the mounted image as uid/gid 65534 with the view as its root (as a local user
    who can reach MOUNTPOINT; chroot only so that busybox reads the image's busybox.conf)."""
    return subprocess.run(
        ["chroot", f"--userspec={NOBODY}", "--groups=", str(root), *command],
        capture_output=True,
        timeout=30,
    )


@pytest.mark.parametrize("layers", [1, 2], ids=["bind", "overlay"])
def test_view_is_nosuid_nodev_unless_allowed(registry: Registry, workdir: Path, layers: int) -> None:
    ref = accelerate(registry, f"mount/hostile{layers}", hostile_image(layers))

    m = LazysnapMount(workdir, ref, name="safe").start()
    try:
        euid = as_nobody(m.mountpoint, "/bin/busybox", "id", "-u")
        assert euid.returncode == 0, euid.stderr
        assert euid.stdout.strip() == b"65534", "a setuid-root file of the image gave a local user root"
        dev = as_nobody(m.mountpoint, "/bin/busybox", "head", "-c", "4", "/dev-nodes/zero")
        assert dev.returncode != 0 and dev.stdout == b"", "a device node of the image opened a host device"
        assert b"Permission denied" in dev.stderr
        view = mount_options(m.mountpoint)
        assert {"ro", "nosuid", "nodev"} <= view, view
        fuse = [p for p in mounts_under(workdir) if ".layers-" in p]
        assert len(fuse) == 1
        options = mount_options(Path(fuse[0])) | super_options(Path(fuse[0]))
        assert {"ro", "nosuid", "nodev", "default_permissions", "allow_other"} <= options, options
    finally:
        assert m.stop() == 0

    # the opt-in lifts both (and proves that the checks above can see a setuid file and a device work)
    trusted = LazysnapMount(workdir, ref, name="trusted", args=("--allow-suid-dev",)).start()
    try:
        euid = as_nobody(trusted.mountpoint, "/bin/busybox", "id", "-u")
        assert euid.stdout.strip() == b"0", euid
        dev = as_nobody(trusted.mountpoint, "/bin/busybox", "head", "-c", "4", "/dev-nodes/zero")
        assert dev.returncode == 0 and dev.stdout == b"\0" * 4, dev
        assert not {"nosuid", "nodev"} & mount_options(trusted.mountpoint)
    finally:
        assert trusted.stop() == 0


def mount_options(point: Path) -> set[str]:
    """The per-mount options of the mount at `point` (mountinfo field 6)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(point):
                return set(fields[5].split(","))
    raise AssertionError(f"{point} is not mounted")


def super_options(point: Path) -> set[str]:
    """The superblock options of the mount at `point` (after the " - " separator of mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(point):
                return set(fields[fields.index("-") + 3].split(","))
    raise AssertionError(f"{point} is not mounted")
